"""The memory plan: micro-batch, accumulation and checkpointing, fitted to free GPU memory."""

from __future__ import annotations

from dataclasses import dataclass

from forge.progress import ProgressWriter
from forge.train.config import TrainConfig


@dataclass
class MemoryPlan:
    """Micro-batch, accumulation and checkpointing: the config's, or the memory planner's on a GPU."""

    per_device: int
    accumulation: int
    checkpointing: bool
    memory_plan: dict | None = None


def plan_memory(config: TrainConfig, model, on_cuda: bool, liger: bool, writer: ProgressWriter) -> MemoryPlan:
    """On a GPU, fit micro-batch/accumulation/checkpointing to free memory, keeping the effective batch."""
    chosen = MemoryPlan(config.per_device_train_batch_size, config.gradient_accumulation_steps,
                   config.gradient_checkpointing)
    if not (on_cuda and config.memory_plan):
        return chosen
    import torch

    from forge.planner import ModelShape, plan

    free, _ = torch.cuda.mem_get_info()
    # a preference step runs chosen and rejected (and the reference pass): plan for twice the tokens
    length = config.max_length * (2 if config.preference else 1)
    fit = plan(ModelShape.from_config(model.config.to_dict()), "qlora" if config.four_bit else "lora", length,
               chosen.per_device, chosen.accumulation, free + torch.cuda.memory_allocated(), liger, config.lora_r)
    memory_plan = fit.as_dict()
    writer({"event": "plan", **memory_plan})
    return MemoryPlan(fit.per_device_train_batch_size, fit.gradient_accumulation_steps,
                 chosen.checkpointing or fit.gradient_checkpointing, memory_plan)
