"""A LoRA adapter alone as a GGUF, for Ollama's ``ADAPTER`` (and llama.cpp's ``--lora``).

llama.cpp's ``convert_lora_to_gguf.py`` (from the same llama-cpp-python sdist as the HF converter) turns the
PEFT adapter into ``RUN/gguf/<name>-lora-f16.gguf``. The base it runs on is a GGUF too: the GGUF the run
started from when it did (the very weights the adapter was trained on, dequantized), else the base model
converted to f16 once and cached under ``$FORGE_HOME/cache/base-gguf/``. Verified by loading the base with
the adapter through llama-cpp-python and comparing its logits with base + adapter in PEFT; then
``Modelfile.adapter`` (``FROM`` the base GGUF, ``ADAPTER`` the LoRA) is written beside it.

Run: ``forge lora-gguf --adapter-dir RUN/adapter``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import check_input_dir, check_output, checked, fresh_temp, open_output, read_text
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import PROGRESS_FILE, find_run_dir, load_stages, record_stage
from forge.workspace import artifact, cache_dir

LORA_STAGE = "lora_gguf"
# Bound on |llama.cpp(base GGUF + LoRA GGUF) - PEFT(base + adapter)| logits, relative to the largest
# logit (at least 1.0), by the base GGUF's type: f16 rounds each weight once; a quantized base GGUF is
# what the HF base was dequantized from, stored in bf16, so it differs by bf16 rounding.
BOUND = {"MOSTLY_F16": 2e-2, "ALL_F32": 2e-2, "MOSTLY_BF16": 6e-2}
DEFAULT_BOUND = 6e-2
CHECK_PROMPT = [{"role": "user", "content": "Hello! What can you do?"}]


class LoraGgufConfig(StageConfig):
    adapter_dir: Path = Field(description="The adapter dir forge train wrote (RUN/adapter).")
    base_gguf: Path | None = Field(None, description=(
        "The base model as a GGUF; default the GGUF the run started from, or the base converted to f16 (cached)."))
    outtype: Literal["f16", "bf16", "f32", "q8_0"] = Field("f16", description="The LoRA GGUF's tensor type.")
    verify: bool = Field(True, description="Compare llama.cpp's logits (base + LoRA) with PEFT's.")
    force: bool = Field(False, description="Replace an existing LoRA GGUF.")


def _train_record(adapter_dir: Path) -> dict:
    run_dir = find_run_dir(adapter_dir)
    return (load_stages(run_dir).get("train") or {}) if run_dir else {}


def _check_adapter(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ForgeError(Codes.ADAPTER_NOT_FOUND, f"{adapter_dir} holds no adapter_config.json",
                         "pass the adapter dir forge train wrote (<run dir>/adapter)")
    config = json.loads(read_text(path, "adapter config"))
    if config.get("trainable_token_indices") or config.get("modules_to_save"):
        raise ForgeError(Codes.ADAPTER_INVALID,
                         "this adapter also trains token embeddings (tokens a chat template added), which a "
                         "llama.cpp LoRA GGUF cannot carry",
                         "use the merged model's GGUF instead: forge merge, then forge quantize")
    return config


def _base_dir(adapter_config: dict, trained: dict) -> Path:
    from forge.model_ref import resolve_base

    ref = trained.get("base_model_dir") or resolve_base(trained.get("base_model")
                                                        or adapter_config["base_model_name_or_path"])[0]
    if not (Path(ref) / "config.json").is_file():
        raise ForgeError(Codes.BASE_MODEL_NOT_FOUND, f"the base model {ref} is not a local model dir",
                         "download the base model and pass its dir as the run's base, or pass base_gguf=")
    return check_input_dir(ref, "base model")


def _cache_key(base_dir: Path) -> str:
    """The base model's files by name, size and modification time: a changed file is a new key."""
    files = sorted(p for p in base_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".model"))
    described = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return hashlib.sha256(json.dumps([str(base_dir.resolve()), described]).encode()).hexdigest()[:32]


def _base_gguf(config: LoraGgufConfig, base_dir: Path, trained: dict, writer: ProgressWriter) -> tuple[Path, str]:
    """The base GGUF to run the adapter on, and where it came from."""
    from forge.quantize import convert

    if config.base_gguf is not None:
        return checked(config.base_gguf, "base GGUF"), "given"
    started_from = (trained.get("base_gguf") or {}).get("source")
    if started_from and Path(started_from).is_file():
        return checked(started_from, "base GGUF"), "the GGUF the run started from"
    target = cache_dir() / "base-gguf" / _cache_key(base_dir) / f"{base_dir.name}-f16.gguf"
    if target.is_file():
        return target, "cached f16 conversion of the base"
    writer.stage("converting_base")
    target.parent.mkdir(parents=True, exist_ok=True)
    convert(base_dir, target, "f16", None, target.parent / "convert.log")
    return target, "f16 conversion of the base (cached)"


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str) -> None:
    """llama.cpp's convert_lora_to_gguf.py in a subprocess, written to a temp name and renamed."""
    import os

    from forge.converter import ensure_converter

    converter = ensure_converter()
    fh, tmp = fresh_temp(out.parent, f".{out.name}.")
    fh.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter), str(converter / "gguf-py")])}
    proc = subprocess.run([sys.executable, str(converter / "convert_lora_to_gguf.py"), "--base", str(base_dir),
                           "--outfile", str(tmp), "--outtype", outtype, str(adapter_dir)],
                          capture_output=True, text=True, env=env)
    log = out.parent / "convert_lora.log"
    with open_output(log, "converter log") as fh:
        fh.write((proc.stdout + proc.stderr).encode("utf-8", "replace"))
    if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join(proc.stderr.strip().splitlines()[-4:])
        raise ForgeError(Codes.CONVERSION_FAILED, f"LoRA conversion of {adapter_dir} failed: {tail}",
                         f"see {log}; the merged model's GGUF (forge quantize) works for every adapter")
    tmp.replace(out)


def check_logits(base_gguf: Path, lora_gguf: Path, base_dir: Path, adapter_dir: Path) -> dict:
    """llama.cpp with the LoRA against PEFT base + adapter (fp32) on a chat prompt, within a bound; and the
    adapter's own effect, so a LoRA llama.cpp ignored cannot pass."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from forge.merge import load_base
    from forge.quantize import load_llama, read_header

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    text = tokenizer.apply_chat_template(CHECK_PROMPT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = PeftModel.from_pretrained(load_base(str(base_dir), adapter_dir, dtype=torch.float32), str(adapter_dir))
    with torch.no_grad():
        ref = model.eval()(torch.tensor([ids])).logits[0].numpy()
    del model
    scores = {}
    for name, lora in (("with", lora_gguf), ("without", None)):
        llm = load_llama(base_gguf, n_ctx=max(64, len(ids) + 8), logits_all=True,
                         **({"lora_path": str(lora)} if lora else {}))
        llm.eval(ids)
        scores[name] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        llm.close()
    max_diff = float(np.abs(scores["with"] - ref).max())
    effect = float(np.abs(scores["with"] - scores["without"]).max())
    file_type = read_header(base_gguf).get("file_type")
    bound = BOUND.get(str(file_type), DEFAULT_BOUND) * max(1.0, float(np.abs(ref).max()))
    result = {"max_abs_diff": max_diff, "bound": bound, "adapter_effect": effect, "tokens": len(ids),
              "base_file_type": file_type, "passed": max_diff <= bound and effect > max_diff}
    if not result["passed"]:
        raise ForgeError(Codes.VERIFICATION_FAILED,
                         f"{lora_gguf.name}: llama.cpp's logits with the LoRA differ from PEFT's by {max_diff:.3g} "
                         f"(bound {bound:.3g}; the adapter itself moves them by {effect:.3g})",
                         "use the merged model's GGUF (forge merge, forge quantize), or report it")
    return result


def lora_gguf(config: LoraGgufConfig, on_progress: ProgressCallback | None = None) -> dict:
    """Convert an adapter to a LoRA GGUF, verify it on its base GGUF, and write Modelfile.adapter."""
    from forge.modelfile import ModelfileConfig, write_modelfile

    adapter_dir = check_input_dir(Path(config.adapter_dir), "adapter dir")
    adapter_config = _check_adapter(adapter_dir)
    trained = _train_record(adapter_dir)
    run_dir = find_run_dir(adapter_dir) or adapter_dir.parent
    out = check_output(run_dir / "gguf" / f"{run_dir.name}-lora-{config.outtype}.gguf", "LoRA GGUF")
    if out.exists() and not config.force:
        raise ForgeError(Codes.OUTPUT_EXISTS, f"{out} already exists",
                         "use it as it is (its Modelfile.adapter is beside it), or convert again with "
                         "forge lora-gguf --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = ProgressWriter(run_dir / PROGRESS_FILE, on_progress)
    base_dir = _base_dir(adapter_config, trained)
    writer.stage("converting_lora", step=0, total_steps=3)
    convert_lora(adapter_dir, base_dir, out, config.outtype)
    base, base_source = _base_gguf(config, base_dir, trained, writer)
    verification = None
    if config.verify:
        writer.stage("verifying", step=1, total_steps=3)
        verification = check_logits(base, out, base_dir, adapter_dir)
    writer.stage("writing_modelfile", step=2, total_steps=3)
    modelfile = write_modelfile(ModelfileConfig(gguf=base, adapter=out, output=out.parent / "Modelfile.adapter",
                                                keep_existing=True))
    result = {"status": "succeeded", "run_dir": str(run_dir), "gguf_dir": str(out.parent), "lora_gguf": str(out),
              "base_gguf": {**artifact(base, "base_gguf"), "source": base_source},
              "outputs": [{"quant": f"lora-{config.outtype}", **artifact(out, "gguf")}],
              "verification": verification, "modelfile": modelfile["path"],
              "ollama_create": modelfile["ollama_create"],
              "artifacts": [artifact(out, "gguf"), *modelfile["artifacts"]], "config": config.model_dump(mode="json")}
    writer({"event": "done", "step": 3, "total_steps": 3, "percent": 100.0})
    record_stage(run_dir, LORA_STAGE, result)
    return result
