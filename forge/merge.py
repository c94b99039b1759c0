"""Merge a LoRA adapter into its base: merged safetensors in the base dtype, tokenizer and chat
template carried over, then a logits parity check against the adapter on the base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.seal import record_stage_near
from forge.progress import ProgressCallback, ProgressWriter
from forge.workspace import atomic_dir, dir_artifacts, refuse_existing

# Parity bound per saved dtype, relative to the largest reference logit (at least 1.0): the merged
# weights are rounded to the saved dtype once, so the bound is that dtype's rounding, with headroom.
PARITY_RELATIVE_BOUND = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
PARITY_INPUTS = ["Hello! What can you do?", "Convert kilometres to metres.\n\n12 km", "1 2 3 4 5 6 7 8"]
QUANTIZATION_KEYS = ("quantization_config", "quantization")


class MergeConfig(StageConfig):
    adapter_dir: Path = Field(description="Adapter dir written by `forge train` (adapter_config.json inside).")
    base_model: str | None = Field(None, description="Base model; default the one recorded in the adapter.")
    output_dir: Path | None = Field(None, description="Merged model dir; default <run dir>/merged.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Saved dtype; auto = the base model's own dtype.")
    device: str = Field("cpu", description="Where to merge; cpu needs no GPU memory.")
    parity_check: bool = Field(True, description="Compare merged logits with the adapter on the base.")
    force: bool = Field(False, description="Replace an existing output dir.")

    def merged_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(self.adapter_dir).parent / "merged"


def _adapter_base(adapter_dir: Path) -> str:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ForgeError(Codes.ADAPTER_NOT_FOUND, f"{adapter_dir} has no adapter_config.json",
                         "pass the adapter dir written by forge train (<run dir>/adapter)")
    return json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""


def _base_dtype(model_ref: str) -> str:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_ref)
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    return str(dtype).replace("torch.", "")


def _logits(model, tokenizer, texts: list[str]):
    import torch

    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits.float() for t in texts]


def _strip_quantization(config_path: Path) -> list[str]:
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    removed = [k for k in QUANTIZATION_KEYS if cfg.pop(k, None) is not None]
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return removed


def parity(merged_dir: Path, adapter_dir: Path, base_ref: str, dtype: str) -> dict:
    """Max |logit difference| between the merged model and base + adapter, both computed in fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=torch.float32).eval()
    base_logits = _logits(base, tokenizer, PARITY_INPUTS)
    reference = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ref_logits = _logits(reference, tokenizer, PARITY_INPUTS)
    del reference, base
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    merged_logits = _logits(merged, tokenizer, PARITY_INPUTS)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(merged_logits, ref_logits))
    effect = max(float((a - b).abs().max()) for a, b in zip(base_logits, ref_logits))
    scale = max(1.0, max(float(r.abs().max()) for r in ref_logits))
    bound = PARITY_RELATIVE_BOUND.get(dtype, 3e-2) * scale
    return {"max_abs_diff": max_diff, "bound": bound, "adapter_effect": effect, "dtype": dtype,
            "inputs": len(PARITY_INPUTS), "passed": max_diff <= bound}


def merge(config: MergeConfig, on_progress: ProgressCallback | None = None) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from forge.models import resolve_model

    adapter_dir = Path(config.adapter_dir)
    base_ref = resolve_model(config.base_model or _adapter_base(adapter_dir))
    merged_dir = config.merged_dir()
    refuse_existing(merged_dir, config.force)
    writer = ProgressWriter(adapter_dir.parent / "merge_progress.jsonl", on_progress)
    dtype = _base_dtype(base_ref) if config.dtype == "auto" else config.dtype

    with atomic_dir(merged_dir, force=config.force) as tmp:
        writer.stage("loading_model", base_model=base_ref, dtype=dtype, step=0, total_steps=4)
        base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=getattr(torch, dtype), device_map=config.device)
        try:
            model = PeftModel.from_pretrained(base, str(adapter_dir))
        except Exception as exc:  # safetensors/PEFT raise many types for a damaged or mismatched adapter
            raise ForgeError(Codes.ADAPTER_INVALID, f"cannot load the adapter in {adapter_dir} onto {base_ref}: {exc}",
                             "check the adapter files are complete and base_model is the model it was trained on"
                             ) from exc
        writer.stage("merging", step=1, total_steps=4)
        merged = model.merge_and_unload()
        writer.stage("saving", step=2, total_steps=4)
        merged.save_pretrained(tmp)
        # The adapter dir holds the tokenizer and chat template used in training: they come along.
        tokenizer_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_ref
        AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(base_ref).save_pretrained(tmp)
        except OSError:
            pass  # a base without generation_config.json: the merged model has none either
        removed = _strip_quantization(tmp / "config.json")
        del merged, model, base
        report = None
        if config.parity_check:
            writer.stage("verifying", step=3, total_steps=4)
            report = parity(tmp, adapter_dir, base_ref, dtype)
            if not report["passed"]:
                raise ForgeError(
                    Codes.PARITY_FAILED,
                    f"merged logits differ from the adapter's by {report['max_abs_diff']:.3g}, beyond the "
                    f"bound {report['bound']:.3g} for {dtype}",
                    "check that base_model is the model the adapter was trained on; try dtype=float32",
                )
    writer({"event": "done", "merged_dir": str(merged_dir)})
    result = {"status": "succeeded", "merged_dir": str(merged_dir), "base_model": base_ref, "dtype": dtype,
              "parity": report, "stripped_config_keys": removed, "artifacts": dir_artifacts(merged_dir, "merged"),
              "config": config.model_dump(mode="json")}
    record_stage_near(merged_dir, "merge", result)
    return result
