"""Merged HF model → GGUF (llama.cpp's converter) → quantized GGUFs (llama_model_quantize) → verified.

Every output is checked: GGUF header (architecture, file type, chat template), loaded with
llama_cpp.Llama, a few tokens generated through its chat template; the float GGUF's logits are
compared with the HF model's on fixed token ids.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from forge import disk, llama_tools
from forge._gguf_convert import FALLBACK_MARKER
from forge.config import StageConfig
from forge.converter import ensure_converter, gguf_fields, gguf_module
from forge.errors import Codes, ForgeError
from forge.paths import check_input_dir, check_output, fresh_temp, open_output
from forge.progress import ProgressCallback, ProgressWriter
from forge.quant_plan import AUTO, AUTO_CANDIDATES
from forge.runs import Outcome, find_run_dir, progress_path, record_stage_near
from forge.workspace import artifact, refuse_existing

# llama.cpp pre-tokenizer to assume for a model type when the converter does not know the
# tokenizer's hash (e.g. a tokenizer trained locally). Used only when asked for or defaulted, and logged.
PRE_TOKENIZER_BY_MODEL_TYPE = {
    "qwen2": "qwen2", "qwen2_moe": "qwen2", "qwen3": "qwen2", "qwen3_moe": "qwen2",
    "llama": "llama-bpe", "gpt2": "gpt-2", "olmo": "olmo", "starcoder2": "starcoder", "phi3": "llama-bpe",
}
VERIFY_PROMPT = [{"role": "user", "content": "Hello! What can you do?"}]
LOGIT_IDS = [5, 17, 42, 99, 123, 7, 64, 200]  # fixed token ids: any valid ids do, every vocab has them
# Bound on |float GGUF logits - HF logits|, relative to the largest HF logit (at least 1.0). The
# conversion rounds each weight once to the GGUF's type (f16 about 1e-3 relative, bf16 and q8_0
# coarser) and llama.cpp sums in another order; the bounds leave headroom over what the tests see.
LOGIT_RELATIVE_BOUND = {"f16": 2e-2, "bf16": 6e-2, "q8_0": 1e-1}


def quant_ftype(name: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}", None)
    if value is None:
        known = sorted(k.removeprefix("LLAMA_FTYPE_MOSTLY_") for k in dir(llama_cpp)
                       if k.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ForgeError(Codes.INVALID_ARGUMENT, f"{name[:40]!r} is not a llama.cpp quantization type",
                         f"use one of: auto, {', '.join(known)} (Q4_K_M is the usual choice; Q8_0 the safest)",
                         details=[f"types: auto, {', '.join(known)}"])
    return value


class QuantizeConfig(StageConfig):
    model_dir: Path = Field(description="Merged Hugging Face model dir (from forge merge).")
    output_dir: Path | None = Field(None, description="Where the GGUFs go; default <model dir>/../gguf.")
    gguf_name: str | None = Field(None, description="File name stem of the GGUFs; default the run dir's name.")
    outtype: Literal["f16", "bf16", "q8_0"] = Field("f16", description="Type of the converted (unquantized) GGUF.")
    quantizations: list[str] = Field(["Q4_K_M"], description=(
        "llama.cpp quant types made from it, e.g. Q4_K_M, Q8_0; or [\"auto\"]: the smallest within max_kld."))
    imatrix: str = Field("auto", max_length=4096, description=(
        "Importance matrix for the types that use one: 'auto' (llama.cpp computes it from the run's training "
        "records), 'off', or the path of one llama-imatrix wrote."))
    imatrix_tokens: int = Field(32768, ge=64, le=2_000_000, description="Training tokens it is computed on, at most.")
    compare_imatrix: bool = Field(True, description=(
        "Also make the chosen (or first) type without the matrix and measure both, to show what it bought."))
    measure: bool = Field(True, description=(
        "Measure each GGUF against the f16 one: KL divergence, same top token, perplexity, bits per weight."))
    measure_dataset: Path | None = Field(None, description="JSONL records to measure on; default the run's eval split.")
    max_kld: float = Field(0.05, gt=0, le=10, description="auto: the largest mean KL divergence from the f16 kept.")
    min_same_top: float | None = Field(None, ge=0, le=100, description=(
        "auto: also the smallest share of positions (%) where it picks the f16's top token."))
    candidates: list[str] = Field(list(AUTO_CANDIDATES), min_length=1, max_length=12, description=(
        "auto: the types tried, large to small."))
    keep_candidates: bool = Field(False, description="Keep the files auto did not choose and the no-imatrix one.")
    pre_tokenizer: str | None = Field(
        None, description="llama.cpp pre-tokenizer to use when the tokenizer's hash is unknown; default from the "
        "model type; 'none' turns the fallback off.")
    verify: bool = Field(True, description="Check each GGUF's header, load it and generate a few tokens.")
    force: bool = Field(False, description="Replace existing GGUF files.")

    @field_validator("quantizations")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        upper = [v.upper() for v in value]
        if AUTO in upper:
            if len(upper) > 1:
                raise ForgeError(Codes.CONFIG_INVALID, "'auto' picks one type by itself: pass it alone",
                                 "use quantizations=[\"auto\"], or list the types you want")
            return [AUTO]
        for name in value:
            quant_ftype(name)
        return upper

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, value: list[str]) -> list[str]:
        for name in value:
            quant_ftype(name)
        return [v.upper() for v in value]

    @property
    def auto(self) -> bool:
        return self.quantizations == [AUTO]

    def planned(self) -> list[str]:
        """The types made: the list given, or auto's candidates."""
        return list(dict.fromkeys(self.candidates)) if self.auto else self.quantizations

    def gguf_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.model_dir).resolve().parent / "gguf"

    def stem(self) -> str:
        return self.gguf_name or Path(self.model_dir).resolve().parent.name


def _model_type(model_dir: Path) -> str:
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise ForgeError(Codes.MODEL_NOT_FOUND, f"{model_dir} has no config.json",
                         "pass the merged model dir written by forge merge")
    return json.loads(cfg.read_text(encoding="utf-8")).get("model_type", "")


def _origin_pre_tokenizer(model_dir: Path) -> str | None:
    """The pre-tokenizer the GGUF a model came from declared (a base given as GGUF), if there was one: the
    tokenizer rebuilt from it splits text the same way, whatever hash it has now."""
    from forge import gguf_import
    from forge.runs import find_run_dir, load_stages

    found = gguf_import.origin(model_dir)
    if found is None:
        run_dir = find_run_dir(model_dir)
        found = (load_stages(run_dir).get("train", {}).get("base_gguf") or {}) if run_dir else {}
    return found.get("pre_tokenizer")


def convert(model_dir: Path, out_path: Path, outtype: str, pre_tokenizer: str | None, log_path: Path) -> dict:
    """Run the converter in a subprocess; write to a temp name, rename on success."""
    converter_dir = ensure_converter()
    if pre_tokenizer == "none":
        fallback = "-"  # no fallback: an unknown tokenizer hash is an error
    else:
        fallback = (pre_tokenizer or _origin_pre_tokenizer(model_dir)
                    or PRE_TOKENIZER_BY_MODEL_TYPE.get(_model_type(model_dir)) or "-")
    fh, tmp = fresh_temp(out_path.parent, f".{out_path.name}.")  # unguessable: no planted link is written through
    fh.close()
    cmd = [sys.executable, "-m", "forge._gguf_convert", str(converter_dir), fallback, "--",
           str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    with open_output(log_path, "converter log") as log:
        log.write((proc.stdout + proc.stderr).encode("utf-8", "replace"))
    used = re.search(rf"^{FALLBACK_MARKER} (\S+)$", proc.stderr, re.M)
    if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        if "BPE pre-tokenizer was not recognized" in proc.stderr:
            raise ForgeError(Codes.UNKNOWN_PRE_TOKENIZER,
                             "llama.cpp's converter does not know this tokenizer's pre-tokenizer hash",
                             "pass --pre-tokenizer NAME (e.g. qwen2, llama-bpe, gpt-2) naming the model family "
                             "the tokenizer was built like")
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ForgeError(Codes.CONVERSION_FAILED, f"GGUF conversion of {model_dir} failed: {tail}",
                         f"see the converter log at {log_path}")
    tmp.replace(out_path)
    return {"pre_tokenizer_fallback": used.group(1) if used else None, "log": str(log_path)}


@contextlib.contextmanager
def _stderr_to(log_path: Path):
    """llama.cpp's C code logs straight to fd 2: send it to the stage's log file instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open_output(log_path, "log", append=True) as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize_file(src: Path, dst: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_ftype(quant)
    params.nthread = 0  # all cores
    fh, tmp = fresh_temp(dst.parent, f".{dst.name}.")
    fh.close()
    with _stderr_to(dst.parent / "quantize.log"):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        if disk.free_bytes(dst.parent) < disk.LOW_WATER:
            raise disk.disk_full(dst.parent, None, f"quantizing to {quant}")
        hint = f"see {dst.parent / 'quantize.log'}"
        if "_K" in quant.upper():
            hint += "; K-quants need every quantized row (hidden and intermediate size) divisible by 256: try Q8_0"
        raise ForgeError(Codes.QUANTIZATION_FAILED, f"llama_model_quantize to {quant} failed (code {rc})", hint)
    tmp.replace(dst)


def read_header(path: Path) -> dict:
    """Architecture, file type, chat template and tensor types from a GGUF's header."""
    gguf = gguf_module()
    keys = {"architecture": gguf.Keys.General.ARCHITECTURE, "file_type": gguf.Keys.General.FILE_TYPE,
            "chat_template": gguf.Keys.Tokenizer.CHAT_TEMPLATE, "pre_tokenizer": gguf.Keys.Tokenizer.PRE,
            "eos_token_id": gguf.Keys.Tokenizer.EOS_ID}
    fields, tensors = gguf_fields(path, tuple(keys.values()))
    header = {name: fields[key] for name, key in keys.items()}
    if header["file_type"] is not None:
        header["file_type"] = gguf.LlamaFileType(header["file_type"]).name
    tensor_types: dict[str, int] = {}
    for tensor in tensors:
        tensor_types[tensor.tensor_type.name] = tensor_types.get(tensor.tensor_type.name, 0) + 1
    return {**header, "tensor_types": tensor_types, "tensor_count": len(tensors)}


def load_llama(path: Path, **kwargs):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=kwargs.pop("n_ctx", 512), verbose=False, **kwargs)


def gguf_logits(path: Path, token_ids: list[int]):
    """Logits for every position of ``token_ids`` from llama.cpp."""
    import numpy as np

    llm = load_llama(path, logits_all=True)
    llm.eval(token_ids)
    return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def hf_logits(model_dir: Path, token_ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def verify_gguf(path: Path, messages: list[dict] | None = None, max_tokens: int = 8) -> dict:
    header = read_header(path)
    problems = []
    if not header["architecture"]:
        problems.append("general.architecture is missing")
    if not header["chat_template"]:
        problems.append("tokenizer.chat_template is missing, so chat clients cannot format prompts")
    llm = load_llama(path)
    reply = llm.create_chat_completion(messages=messages or VERIFY_PROMPT, max_tokens=max_tokens, temperature=0.0)
    choice = reply["choices"][0]
    # The reply shows the GGUF runs through its chat template; an answer that ends its turn at once is an
    # answer too (how good it is, is the evaluate stage's to say): its finish_reason is recorded.
    if problems:
        raise ForgeError(Codes.VERIFICATION_FAILED, f"{path.name}: " + "; ".join(problems),
                         "check the merged model dir has tokenizer files and a chat template, then quantize again")
    header["chat_template_chars"] = len(header.pop("chat_template"))
    return {"header": header, "generated": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "completion_tokens": reply["usage"]["completion_tokens"]}


def logits_check(model_dir: Path, gguf_path: Path, outtype: str) -> dict:
    """The float GGUF's logits through llama.cpp against the HF model's, within a stated bound."""
    import numpy as np

    ref, got = hf_logits(model_dir, LOGIT_IDS), gguf_logits(gguf_path, LOGIT_IDS)
    max_diff = float(np.abs(ref - got).max())
    bound = LOGIT_RELATIVE_BOUND[outtype] * max(1.0, float(np.abs(ref).max()))
    if max_diff > bound:
        raise ForgeError(Codes.VERIFICATION_FAILED,
                         f"{gguf_path.name}: logits differ from the HF model's by {max_diff:.3g}, beyond the bound "
                         f"{bound:.3g} for {outtype}",
                         "the converter may not support this architecture well; try outtype=f16, or report it")
    return {"max_abs_diff": max_diff, "bound": bound, "outtype": outtype, "passed": True}


def _make_types(quant_paths: dict, base_path: Path, matrix: dict | None, log_path: Path, writer, total: int):
    """Each type from the float GGUF: with the importance matrix where the type uses one (llama-quantize),
    else through the binding."""
    from forge import imatrix as imx
    from forge import quant_plan

    made = []
    for i, (quant, path) in enumerate(quant_paths.items(), start=2):
        writer.stage("quantizing", quant=quant, step=i, total_steps=total)
        with_matrix = matrix is not None and imx.uses_imatrix(quant)
        if with_matrix:
            quant_plan.quantize_with_tools(base_path, path, quant, Path(matrix["path"]), log_path)
        else:
            quantize_file(base_path, path, quant)
        made.append({"quant": quant, "path": path, "imatrix": with_matrix})
    return made


def _measure_and_keep(config: QuantizeConfig, plan, base_path: Path, scored, compare: bool, writer,
                      total: int) -> None:
    """Measure every file against the float GGUF, let auto choose, and settle the type made without the matrix."""
    def twin(step: int) -> None:
        if plan.compared() is not None:
            writer.stage("quantizing", quant=f"{plan.compared()['quant']} without imatrix", step=step,
                         total_steps=total)
            plan.add_twin(base_path, quantize_file, config.force)

    if compare and not config.auto:  # the type to compare is known now: one measuring pass for all
        twin(total - 3)
    writer.stage("measuring", step=total - 2, total_steps=total)
    plan.measure(base_path, scored)
    if config.auto:
        plan.choose(config.max_kld, config.min_same_top, config.keep_candidates)
        if compare:  # auto's choice, made again without the matrix
            twin(total - 2)
            plan.measure(base_path, scored)
    plan.settle_twin(config.keep_candidates)


def _verified_outputs(config: QuantizeConfig, plan, model_dir: Path, base_path: Path, writer, total: int):
    """The kept files as artifacts, each checked in llama.cpp, the float one's logits against the HF model's."""
    outputs = []
    for entry in plan.kept:
        out = {"quant": entry["quant"], **artifact(entry["path"], "gguf"), "imatrix": entry["imatrix"]}
        if "quality" in entry:
            out["quality"] = entry["quality"]
        if config.verify:
            writer.stage("verifying", file=entry["path"].name, step=total - 1, total_steps=total)
            out["verification"] = verify_gguf(entry["path"])
        outputs.append(out)
    if config.verify:
        outputs[0]["verification"]["logits_vs_hf"] = logits_check(model_dir, base_path, config.outtype)
    return outputs


def quantize(config: QuantizeConfig, on_progress: ProgressCallback | None = None) -> dict:
    from forge import quant_plan

    model_dir = check_input_dir(Path(config.model_dir), "model_dir")
    _model_type(model_dir)
    out_dir = config.gguf_dir()
    check_output(out_dir / config.stem(), "GGUF")
    planned = config.planned()
    setting = quant_plan.imatrix_plan(config, planned)
    out_dir.mkdir(parents=True, exist_ok=True)
    twins = 1 if setting != "off" and config.compare_imatrix else 0
    disk.ensure_space(out_dir, disk.quantize_bytes(model_dir, config.outtype, planned + planned[:twins]),
                      "conversion and quantization")
    stem = config.stem()
    base_path = out_dir / f"{stem}-{config.outtype}.gguf"
    quant_paths = {q: out_dir / f"{stem}-{q}.gguf" for q in planned}
    matrix_path = [out_dir / f"{stem}.imatrix.gguf"] if setting == "auto" else []
    for path in [base_path, *quant_paths.values(), *matrix_path]:
        refuse_existing(path, config.force)
    writer = ProgressWriter(progress_path(base_path), on_progress)
    run_dir = find_run_dir(model_dir)
    total = 4 + len(quant_paths) + twins  # convert, imatrix, each type, its no-imatrix twin, measure, verify
    log_path = out_dir / "quantize.log"

    writer.stage("converting", step=0, total_steps=total)
    conv = convert(model_dir, base_path, config.outtype, config.pre_tokenizer, out_dir / "convert.log")
    warnings = []
    if conv["pre_tokenizer_fallback"]:
        warnings.append(f"llama.cpp did not recognise the tokenizer's pre-tokenizer hash; used "
                        f"'{conv['pre_tokenizer_fallback']}' (--pre-tokenizer / model type default)")
        writer({"event": "warning", "message": warnings[-1]})
    scored, found = quant_plan.measure_set_for(config, model_dir, run_dir)
    warnings += found
    if setting == "auto" and llama_tools.find_tools() is None and not os.environ.get(llama_tools.ENV_DIR):
        writer.stage("building_llama_tools", step=1, total_steps=total)  # once: a few minutes of compiling
    writer.stage("computing_imatrix", step=1, total_steps=total)
    matrix, found = quant_plan.importance_matrix(config, setting, base_path, model_dir, run_dir, log_path)
    warnings += found
    made = _make_types(quant_paths, base_path, matrix, log_path, writer, total)
    plan = quant_plan.Kept([{"quant": config.outtype, "path": base_path, "imatrix": False}, *made])
    if scored is not None:
        _measure_and_keep(config, plan, base_path, scored, matrix is not None and twins, writer, total)
        warnings += plan.warnings
    outputs = _verified_outputs(config, plan, model_dir, base_path, writer, total)
    writer({"event": "done", "files": [o["path"] for o in outputs]})
    artifacts = [{k: o[k] for k in ("kind", "path", "bytes", "sha256")} for o in outputs]
    if matrix is not None and matrix.get("source") != "given":
        artifacts.append({"kind": "imatrix", "path": matrix["path"], "bytes": matrix["bytes"],
                          "sha256": matrix["sha256"]})
    result = {"status": Outcome.SUCCEEDED, "gguf_dir": str(out_dir), "outputs": outputs, "warnings": warnings,
              "pre_tokenizer_fallback": conv["pre_tokenizer_fallback"], "convert_log": conv["log"],
              "measured_on": scored.basis if scored is not None else None,
              "imatrix": plan.imatrix_record(matrix, setting), "artifacts": artifacts,
              "config": config.model_dump(mode="json"), **plan.auto_record()}
    record_stage_near(base_path, "quantize", result)
    return result
