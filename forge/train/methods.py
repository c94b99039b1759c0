"""The trainer per method: TRL's trainer and config class for lora/qlora (SFT), dpo and orpo, the arguments
Forge passes them, and the trainer built with its LoRA config and Forge's callbacks."""

from __future__ import annotations

import os
from pathlib import Path

from forge.packing import ROW_LENGTHS_KEY
from forge.progress import ProgressWriter
from forge.train.callbacks import StopFlag, progress_callback
from forge.train.config import TrainConfig
from forge.train.inputs import TrainData
from forge.train.launch import in_launched_rank
from forge.train.memory import MemoryPlan
from forge.train.model import new_token_modules


def _count_tokens(inputs) -> tuple[int, int]:
    """Real (non-pad) tokens and all token slots of a CPU-side batch, whatever the trainer's batch keys
    (input_ids; chosen_/rejected_input_ids); prompt-only keys are parts of those sequences."""
    rows = inputs.pop(ROW_LENGTHS_KEY, None)
    ids = [v for k, v in inputs.items() if k.endswith("input_ids") and not k.startswith("prompt_")]
    masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and not k.startswith("prompt_")]
    slots = sum(int(v.numel()) for v in ids)
    if rows is not None:
        return int(rows.sum()), slots
    return (sum(int(m.sum()) for m in masks) if masks else slots), slots


def _trainer_class(method: str):
    """TRL's trainer for the method, counting real training tokens on the CPU-side batch before it moves to
    the device (no device syncs)."""
    if method == "dpo":
        from trl import DPOTrainer as Base
    elif method == "orpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental
        from trl.experimental.orpo import ORPOTrainer as Base
    else:
        from trl import SFTTrainer as Base

    class ForgeTrainer(Base):
        real_tokens = {"tokens": 0}
        plain_loss = False  # set when the LM head itself is trained (new chat tokens; SFT only)

        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens, slots = _count_tokens(inputs)
            self.real_tokens["tokens"] += tokens
            self.real_tokens["slots"] = self.real_tokens.get("slots", 0) + slots
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs.pop(ROW_LENGTHS_KEY, None)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.plain_loss:
                # TRL's fused LM head multiplies by lm_head.weight directly, which would skip the trained
                # rows of new tokens: take the model's own forward and loss instead.
                from transformers import Trainer

                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return ForgeTrainer


def _config_class(method: str):
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig
    if method == "orpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig
    from trl import SFTConfig

    return SFTConfig


# TrainConfig fields named like TRL's SFTConfig fields that Forge sets itself instead of passing through.
FORGE_SETS = {"output_dir", "run_name", "packing", "use_liger_kernel", "assistant_only_loss", "report_to",
              "per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing"}


def _eval_strategy(config: TrainConfig, eval_set, on_cuda: bool) -> str:
    if eval_set is None:
        return "no"
    if config.four_bit and not on_cuda:
        # bitsandbytes (0.50, CPU) repacks 4-bit weights for inference on eval and training then
        # fails on them; evaluate once, after training, instead of at each epoch end.
        return "no"
    return "epoch"


def trainer_arguments(config: TrainConfig, plan: MemoryPlan, checkpoints_dir: Path, eval_set, on_cuda: bool,
                      dtype, liger: bool):
    """TRL's config for the method (SFTConfig, DPOConfig, ORPOConfig): the fields TrainConfig shares with it
    by name pass straight through; the rest are what Forge decides (plan, device, packing, distributed)."""
    import dataclasses

    import torch

    config_class = _config_class(config.method)
    fields = {f.name for f in dataclasses.fields(config_class)}
    shared = fields & set(TrainConfig.model_fields) - FORGE_SETS
    launched = in_launched_rank()
    decided = dict(
        output_dir=str(checkpoints_dir), data_seed=config.seed, save_strategy="steps",
        per_device_train_batch_size=plan.per_device, per_device_eval_batch_size=plan.per_device,
        gradient_accumulation_steps=plan.accumulation, gradient_checkpointing=plan.checkpointing,
        use_liger_kernel=liger, eval_strategy=_eval_strategy(config, eval_set, on_cuda),
        bf16=on_cuda and dtype == torch.bfloat16, fp16=on_cuda and dtype == torch.float16,
        optim="adamw_torch_fused" if on_cuda else "adamw_torch", report_to=config.report_to or "none",
        disable_tqdm=True,
        dataloader_pin_memory=on_cuda, use_cpu=not on_cuda,
        ddp_backend=("nccl" if on_cuda else "gloo") if launched else None,
        ddp_find_unused_parameters=False if launched else None,
        fsdp="full_shard auto_wrap" if launched and config.distributed == "fsdp" else "",
    )
    if config.method in ("lora", "qlora"):
        decided.update(dataset_kwargs={"skip_prepare_dataset": True} if config.packing != "none" else None,
                       remove_unused_columns=config.packing == "none")
    elif config.method == "orpo":
        decided.update(remove_unused_columns=False)  # its collator reads the prompt/chosen/rejected columns
    return config_class(**{name: getattr(config, name) for name in sorted(shared)}, **decided)


def build_trainer(config: TrainConfig, model, data: TrainData, args, writer: ProgressWriter, stop: StopFlag):
    from peft import LoraConfig
    from transformers import PrinterCallback

    new_tokens = new_token_modules(model, data.tokenizer, data.template["added_tokens"])
    peft_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules, use_rslora=config.use_rslora, task_type="CAUSAL_LM",
        trainable_token_indices=new_tokens,  # the template's new tokens: embedding and output rows are learned
    )
    # DPO's reference is the base with the adapter switched off (TRL does this when given a peft_config and
    # no ref_model): no second copy of the weights.
    trainer = _trainer_class(config.method)(
        model=model, args=args, train_dataset=data.train_set, eval_dataset=data.eval_set,
        processing_class=data.tokenizer, peft_config=peft_config,
        **({} if data.collator is None else {"data_collator": data.collator}))
    trainer.real_tokens = {"tokens": 0}
    trainer.plain_loss = new_tokens is not None
    trainer.remove_callback(PrinterCallback)  # progress.jsonl replaces its printed dicts
    trainer.add_callback(progress_callback(writer, stop, trainer.real_tokens))
    return trainer
