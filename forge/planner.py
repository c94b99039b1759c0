"""A memory planner for training on a GPU: from free memory, model shape, method and sequence length,
choose the micro-batch, the gradient accumulation (keeping the effective batch asked for) and whether
gradient checkpointing is needed.

The estimate is a sum of parts, with coefficients fitted to peak memory measured on an H200 for a
Qwen2-7B shape at 4 x 2048 tokens (../shared/GPU.md; tests check the fit stays within 20%):
weights + LoRA states + activations (all layers, or checkpoints plus one layer when checkpointing)
+ logits (unless liger-kernel's fused linear cross-entropy avoids them) + a fixed overhead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1024**3
BYTES_PER_LOGIT = 11.0  # bf16 logits, their fp32 upcast and gradient, measured
ACT_HIDDEN, ACT_INTERMEDIATE = 32, 4  # per token per layer: (32·hidden + 4·intermediate) bf16 values
QLORA_LAYER_BYTES = 1.5  # NF4 layer weights with their quant states and dequant buffers, measured
LORA_STATE_BYTES = 16  # fp32 weight + grad + two Adam moments per adapter parameter
OVERHEAD = 0.5 * GIB
HEADROOM = 0.9  # plan to use at most this share of free memory


@dataclass
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        return cls(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                   vocab=cfg["vocab_size"], heads=cfg["num_attention_heads"],
                   kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"])

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_params(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return self.layers * (2 * h * h + 2 * h * kv + 3 * h * i)

    def embedding_params(self) -> int:
        return 2 * self.vocab * self.hidden  # input embeddings and the LM head

    def lora_params(self, r: int) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
        return self.layers * per_layer


@dataclass
class Plan:
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    estimate_bytes: int
    free_bytes: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def estimate(shape: ModelShape, method: str, tokens: int, checkpointing: bool, liger: bool, lora_r: int = 16) -> int:
    """Peak bytes for one micro-batch of ``tokens`` tokens."""
    if method == "qlora":
        weights = shape.layer_params() * QLORA_LAYER_BYTES + shape.embedding_params() * 4  # fp32 after prepare
    else:
        weights = (shape.layer_params() + shape.embedding_params()) * 2
    per_layer = tokens * (ACT_HIDDEN * shape.hidden + ACT_INTERMEDIATE * shape.intermediate) * 2
    if checkpointing:
        activations = shape.layers * tokens * shape.hidden * 2 + per_layer
    else:
        activations = shape.layers * per_layer
    logits = 0 if liger else tokens * shape.vocab * BYTES_PER_LOGIT
    return int(weights + shape.lora_params(lora_r) * LORA_STATE_BYTES + activations + logits + OVERHEAD)


def plan(shape: ModelShape, method: str, seq_len: int, per_device: int, accumulation: int, free_bytes: int,
         liger: bool, lora_r: int = 16) -> Plan:
    """The fastest setting that fits: no checkpointing at the largest micro-batch, else checkpointing.
    The micro-batch is a divisor of the effective batch, so the effective batch never changes."""
    effective = per_device * accumulation
    budget = free_bytes * HEADROOM
    micro_sizes = [m for m in range(effective, 0, -1) if effective % m == 0]
    for checkpointing in (False, True):
        for micro in micro_sizes:
            need = estimate(shape, method, micro * seq_len, checkpointing, liger, lora_r)
            if need <= budget:
                why = (f"{micro} x {seq_len} tokens a micro-batch needs ~{need / GIB:.1f} GiB of "
                       f"{free_bytes / GIB:.1f} GiB free" + ("; gradient checkpointing on" if checkpointing else ""))
                return Plan(micro, effective // micro, checkpointing, need, free_bytes, why)
    need = estimate(shape, method, seq_len, True, liger, lora_r)
    from forge.errors import Codes, ForgeError

    raise ForgeError(Codes.OUT_OF_MEMORY,
                     f"even one {seq_len}-token sequence with gradient checkpointing needs ~{need / GIB:.1f} GiB, "
                     f"and {free_bytes / GIB:.1f} GiB is free",
                     "use method=qlora, a shorter max_length, a smaller model, or a bigger GPU")
