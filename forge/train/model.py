"""The base model: resolved (a GGUF converted first), loaded with an attention kernel that keeps packed records
apart (4-bit for qlora), liger-kernel's choice, and room in the vocabulary for a chat template's new tokens."""

from __future__ import annotations

import logging

from forge.errors import Codes, ForgeError
from forge.packing import register_varlen_attention
from forge.progress import ProgressWriter
from forge.train.config import TrainConfig


def resolve_base_model(config: TrainConfig, writer: ProgressWriter) -> tuple[str, dict | None]:
    """The base model to load; a GGUF is turned into a model dir first (once), and the run says so."""
    from forge.model_ref import resolve_base

    if str(config.base_model).endswith(".gguf"):
        writer.stage("converting_gguf")
    model_ref, gguf = resolve_base(config.base_model)
    if gguf is not None:
        how = "converted" if gguf["converted_now"] else "found converted (cached by sha256)"
        writer({"event": "warning", "message": (  # the consequence first: a status shows a line's start
            f"base weights dequantized from a GGUF ({gguf.get('file_type')}), not the original full-precision "
            f"ones; {how} at {model_ref}")})
    return model_ref, gguf


def _attn_implementation(config: TrainConfig, on_cuda: bool) -> str:
    """Kernels that honour packed-record boundaries: sdpa, eager and flex_attention all build the
    block-diagonal mask from position ids; flex_attention has no backward on CPU."""
    if config.attn_implementation in ("flex_attention", "flash_attention_2") and not on_cuda:
        raise ForgeError(Codes.CUDA_REQUIRED, f"attn_implementation={config.attn_implementation} needs a CUDA GPU",
                         "use attn_implementation=auto (sdpa on CPU)")
    if config.attn_implementation == "forge_varlen" or (
            config.attn_implementation == "auto" and not on_cuda and config.packing == "padding_free"):
        return register_varlen_attention()
    if config.attn_implementation != "auto":
        return config.attn_implementation
    if on_cuda:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
            return "flex_attention"
        except ImportError:
            return "sdpa"
    return "sdpa"


def use_liger(config: TrainConfig, on_cuda: bool) -> bool:
    if config.use_liger_kernel and not on_cuda:
        raise ForgeError(Codes.CUDA_REQUIRED, "liger-kernel's Triton kernels need a CUDA GPU",
                         "leave use_liger_kernel unset (it turns on by itself on CUDA when installed)")
    if config.use_liger_kernel is not None:
        return config.use_liger_kernel
    if not on_cuda:
        return False
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def load_model(config: TrainConfig, model_ref: str):
    import torch
    from transformers import AutoModelForCausalLM

    from forge.hardware import device_kind, train_dtype

    dtype = train_dtype()
    on_cuda = device_kind() == "cuda"
    kwargs: dict = {"dtype": dtype, "attn_implementation": _attn_implementation(config, on_cuda)}
    if config.four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        )
        kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_compute_dtype
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
        except (ValueError, ImportError) as exc:
            if config.attn_implementation != "auto" or kwargs["attn_implementation"] == "sdpa":
                raise
            # auto chose flex_attention and this model or install refuses it: sdpa also keeps records apart
            logging.getLogger("forge.train").warning("flex_attention unavailable (%s); using sdpa", exc)
            kwargs["attn_implementation"] = "sdpa"
            model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    except torch.OutOfMemoryError as exc:
        raise ForgeError(Codes.OUT_OF_MEMORY, f"loading {model_ref} ran out of GPU memory",
                         "use method=qlora, or a smaller model", retryable=True) from exc
    if config.four_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return model


def grow_vocabulary(model, tokenizer) -> None:
    """Room in the embeddings for the tokens a chat template added, and generation stopping at its end
    of turn."""
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def new_token_modules(model, tokenizer, added: list[str]) -> dict | None:
    """PEFT's trainable_token_indices for tokens a chat template added: the input embedding's rows, and the
    output head's too unless it is tied to the embedding (then PEFT trains both as one)."""
    if not added:
        return None
    ids = tokenizer.convert_tokens_to_ids(added)
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    targets = {names[model.get_input_embeddings()]: ids}
    head = model.get_output_embeddings()
    if head is not None and not getattr(model.config, "tie_word_embeddings", False):
        targets[names[head]] = ids
    return targets
