"""Merge a LoRA adapter into its base: merged safetensors in the base dtype, tokenizer and chat
template carried over, then a logits parity check against the adapter on the base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from forge import disk
from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import check_input_dir, check_output
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import Outcome, progress_path, record_stage_near
from forge.workspace import atomic_dir, dir_artifacts, refuse_existing

# Parity bound per saved dtype, relative to the largest reference logit (at least 1.0): the merged
# weights are rounded to the saved dtype once, so the bound is that dtype's rounding, with headroom.
# bfloat16 keeps 8 bits of mantissa (a rounding of up to 0.4 % a weight): the tiny demo model, trained
# hard, measured 4.0 % on a CPU with AMX-BF16, so the bound is 6 %; a wrong base or a lost adapter moves
# logits by the adapter's effect, far past it (tests check the effect dwarfs the difference).
PARITY_RELATIVE_BOUND = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 6e-2}
PARITY_INPUTS = ["Hello! What can you do?", "Convert kilometres to metres.\n\n12 km", "1 2 3 4 5 6 7 8"]
QUANTIZATION_KEYS = ("quantization_config", "quantization")


class MergeConfig(StageConfig):
    adapter_dir: Path = Field(description="Adapter dir written by `forge train` (adapter_config.json inside).")
    base_model: str | None = Field(None, description="Base model; default the one recorded in the adapter.")
    output_dir: Path | None = Field(None, description="Merged model dir; default <run dir>/merged.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Saved dtype; auto = the base model's own dtype.")
    device: str = Field("cpu", description="Where to merge (PEFT strategy); cpu needs no GPU memory.")
    strategy: Literal["auto", "streaming", "peft"] = Field(
        "auto", description="streaming: shard by shard, peak memory ~2 shards; peft: merge_and_unload in memory; "
        "auto: streaming when the adapter allows it (plain LoRA on linear layers), else peft.")
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


def load_base(base_ref: str, adapter_dir: Path, **kwargs):
    """The base model as the adapter expects it: with room for the tokens its chat template added (their
    rows come from the adapter, which saved the resized embeddings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_ref, **kwargs)
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        if len(tokenizer) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            base.config.eos_token_id = tokenizer.eos_token_id
    return base


def parity(merged_dir: Path, adapter_dir: Path, base_ref: str, dtype: str) -> dict:
    """Max |logit difference| between the merged model and base + adapter, both computed in fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base = load_base(base_ref, adapter_dir, dtype=torch.float32).eval()
    base_logits = _logits(base, tokenizer, PARITY_INPUTS)
    reference = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ref_logits = _logits(reference, tokenizer, PARITY_INPUTS)
    del reference, base
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    merged_logits = _logits(merged, tokenizer, PARITY_INPUTS)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(merged_logits, ref_logits, strict=True))
    effect = max(float((a - b).abs().max()) for a, b in zip(base_logits, ref_logits, strict=True))
    scale = max(1.0, max(float(r.abs().max()) for r in ref_logits))
    bound = PARITY_RELATIVE_BOUND.get(dtype, 3e-2) * scale
    return {"max_abs_diff": max_diff, "bound": bound, "adapter_effect": effect, "dtype": dtype,
            "inputs": len(PARITY_INPUTS), "passed": max_diff <= bound}


def _peft_merge(adapter_dir: Path, base_ref: str, out: Path, dtype: str, device: str, writer) -> None:
    """The in-memory path: PEFT's merge_and_unload (holds the whole model)."""
    import torch
    from peft import PeftModel

    base = load_base(base_ref, adapter_dir, dtype=getattr(torch, dtype), device_map=device)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as exc:  # safetensors/PEFT raise many types for a damaged or mismatched adapter
        raise ForgeError(Codes.ADAPTER_INVALID, f"cannot load the adapter in {adapter_dir} onto {base_ref}: {exc}",
                         "check the adapter files are complete and base_model is the model it was trained on"
                         ) from exc
    writer.stage("merging", step=1, total_steps=4)
    merged = model.merge_and_unload()
    writer.stage("saving", step=2, total_steps=4)
    merged.save_pretrained(out)


# ---- streaming merge: shard by shard, never the whole model in memory ----

def streaming_unsupported(adapter_dir: Path, base_ref: str) -> str | None:
    """Why the streaming merge cannot handle this adapter/base, or None when it can."""
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.is_file():
        return None  # merge() reports the missing adapter itself
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    checks = [
        (cfg.get("peft_type", "LORA") != "LORA", f"adapter type {cfg.get('peft_type')} is not LoRA"),
        (cfg.get("use_dora"), "DoRA adapters need the weight norm PEFT computes"),
        (cfg.get("modules_to_save"), f"modules_to_save {cfg.get('modules_to_save')} are fully trained copies"),
        (cfg.get("rank_pattern") or cfg.get("alpha_pattern"), "per-module rank/alpha patterns"),
        (cfg.get("bias", "none") != "none", f"bias={cfg.get('bias')} trains biases too"),
        (cfg.get("fan_in_fan_out"), "fan_in_fan_out layers (Conv1D)"),
        (not Path(base_ref).is_dir(), f"base {base_ref} is not a local dir"),
    ]
    for failed, why in checks:
        if failed:
            return why
    if not (list(Path(base_ref).glob("*.safetensors"))):
        return f"base {base_ref} has no safetensors weights"
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                odd = [k for k in f.keys() if not k.endswith((".lora_A.weight", ".lora_B.weight"))]  # noqa: SIM118 (not iterable)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ForgeError(Codes.ADAPTER_INVALID, f"cannot read {weights}: {exc}",
                             "the adapter files are damaged; train again or restore them") from exc
        if odd:
            return f"adapter holds tensors other than Linear LoRA A/B (e.g. {odd[0]})"
    return None


def _lora_pairs(adapter_dir: Path) -> dict[str, tuple]:
    """Base weight name → (A, B) from the adapter file (PEFT's 'base_model.model.' prefix removed)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    except Exception as exc:
        raise ForgeError(Codes.ADAPTER_INVALID, f"cannot read {adapter_dir}/adapter_model.safetensors: {exc}",
                         "the adapter files are damaged; train again or restore them") from exc
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        module, kind = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        pairs.setdefault(f"{module}.weight", {})[kind.split(".")[0]] = tensor
    return {name: (p["A"], p["B"]) for name, p in pairs.items()}


def lora_scaling(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def merge_weight(weight, a, b, scaling: float):
    """W + scaling·(B@A), with the same casts and order of operations as PEFT's merge on CPU."""
    import torch

    low = b.dtype in (torch.float16, torch.bfloat16)
    delta = (b.float() @ a.float() if low else b @ a) * scaling
    if low:
        delta = delta.to(b.dtype)
    weight += delta
    return weight


def stream_merge(adapter_dir: Path, base_dir: Path, out: Path, dtype: str) -> list[str]:
    """Read the base shard by shard, merge the LoRA pairs that land in it, write it out."""
    import shutil

    import torch

    from forge.safetensors_stream import DTYPES, StreamWriter, iter_tensors, read_header

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    scaling = lora_scaling(cfg)
    pairs = _lora_pairs(adapter_dir)
    index = base_dir / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else [p.name for p in sorted(base_dir.glob("*.safetensors"))]
    target = getattr(torch, dtype)
    merged = []
    for shard in shards:
        # Tensor by tensor: read (no mmap), merge, cast, write — peak ~ the largest tensor, not the shard.
        header, _ = read_header(base_dir / shard)
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        layout = [(name, dtype if DTYPES[e["dtype"]].startswith(("float", "bfloat")) else DTYPES[e["dtype"]],
                   e["shape"]) for name, e in entries]
        writer = StreamWriter(out / shard, layout, {**header.get("__metadata__", {}), "format": "pt"})
        for key, tensor in iter_tensors(base_dir / shard):
            if key in pairs:
                a, b = pairs.pop(key)
                tensor = merge_weight(tensor, a, b, scaling)
                merged.append(key)
            writer.write(key, tensor.to(target) if tensor.is_floating_point() else tensor)
            del tensor
        writer.close()
    if pairs:
        raise ForgeError(Codes.ADAPTER_INVALID,
                         f"{len(pairs)} adapter weight(s) have no match in the base, e.g. {next(iter(pairs))}",
                         "base_model must be the model the adapter was trained on")
    for name in ("config.json", "model.safetensors.index.json"):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    config_path = out / "config.json"
    model_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    model_cfg["dtype"] = dtype
    model_cfg.pop("torch_dtype", None)
    config_path.write_text(json.dumps(model_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return merged


def merge(config: MergeConfig, on_progress: ProgressCallback | None = None) -> dict:
    from transformers import AutoTokenizer, GenerationConfig

    from forge.model_ref import resolve_base

    adapter_dir = check_input_dir(Path(config.adapter_dir), "adapter_dir")
    base_ref = resolve_base(config.base_model or _adapter_base(adapter_dir))[0]  # a GGUF: its converted dir
    merged_dir = check_output(config.merged_dir(), "merged model dir")
    refuse_existing(merged_dir, config.force)
    writer = ProgressWriter(progress_path(merged_dir), on_progress)
    dtype = _base_dtype(base_ref) if config.dtype == "auto" else config.dtype
    if Path(base_ref).is_dir():
        disk.ensure_space(merged_dir.parent, disk.merge_bytes(Path(base_ref), dtype), "the merge")

    reason = streaming_unsupported(adapter_dir, base_ref) if config.strategy != "peft" else "strategy=peft asked for"
    if config.strategy == "streaming" and reason:
        raise ForgeError(Codes.ADAPTER_INVALID, f"streaming merge is not possible here: {reason}",
                         "use strategy=auto or strategy=peft")
    strategy = "peft" if reason else "streaming"
    if reason and config.strategy == "auto":
        writer({"event": "warning", "message": f"merging with PEFT in memory, not streaming: {reason}"})
    with atomic_dir(merged_dir, force=config.force) as tmp:
        writer.stage("loading_model", base_model=base_ref, dtype=dtype, strategy=strategy, step=0, total_steps=4)
        if strategy == "streaming":
            writer.stage("merging", step=1, total_steps=4)
            stream_merge(adapter_dir, Path(base_ref), tmp, dtype)
        else:
            _peft_merge(adapter_dir, base_ref, tmp, dtype, config.device, writer)
        # The adapter dir holds the tokenizer and chat template used in training: they come along.
        tokenizer_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_ref
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
        tokenizer.save_pretrained(tmp)
        try:
            generation = GenerationConfig.from_pretrained(base_ref)
        except OSError:
            generation = None  # a base without generation_config.json: the merged model has none either
        if generation is not None:
            stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else \
                [t for t in [generation.eos_token_id] if t is not None]
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
                generation.eos_token_id = [tokenizer.eos_token_id, *stops]  # a template's own end of turn
            generation.save_pretrained(tmp)
        removed = _strip_quantization(tmp / "config.json")
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
    result = {"status": Outcome.SUCCEEDED, "merged_dir": str(merged_dir), "base_model": base_ref, "dtype": dtype,
              "strategy": strategy, "fallback_reason": reason if config.strategy == "auto" else None,
              "parity": report, "stripped_config_keys": removed, "artifacts": dir_artifacts(merged_dir, "merged"),
              "config": config.model_dump(mode="json")}
    record_stage_near(merged_dir, "merge", result)
    return result
