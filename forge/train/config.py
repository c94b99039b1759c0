"""What a training run is asked to do: ``TrainConfig`` (fields named as in TRL's SFTConfig and PEFT's
LoraConfig), the methods it knows, and the optimizer steps a config plans on a dataset (refused past the
limit before it queues)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from forge.config import StageConfig
from forge.data import FormatName
from forge.errors import Codes, ForgeError
from forge.runs import runs_dir

Method = Literal["lora", "qlora", "dpo", "orpo"]
PREFERENCE_METHODS = ("dpo", "orpo")
Tracker = Literal["tensorboard", "mlflow", "trackio"]
METHOD_HELP = "lora; qlora (4-bit base); dpo or orpo (LoRA on chosen/rejected pairs)."


class TrainConfig(StageConfig):
    """Training config. Field names follow TRL's SFTConfig / PEFT's LoraConfig where they exist."""

    base_model: str = Field(description="Local model dir or hub id to fine-tune.")
    dataset: Path = Field(description=(
        "JSONL dataset: alpaca, messages (with tools/tool_calls), prompt/completion, preference or sharegpt."))
    output_dir: Path | None = Field(None, description="Run dir; default $FORGE_HOME/runs/<run_name>.")
    chat_template: str | None = Field(None, description=(
        "A family (chatml, llama3, gemma, phi3, phi4, mistral; with tools: qwen2.5, llama3.1, mistral-tools) or a "
        "Jinja file: needed by a base model, and replaces an instruct model's own (with a warning); tokens it "
        "needs are added and trained."))
    run_name: str | None = Field(None, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 description="Name of the run dir under $FORGE_HOME/runs (letters, digits, '.', "
                                 "'_', '-'; e.g. support-bot-v2).")
    method: Method = Field("lora", description=METHOD_HELP)
    load_in_4bit: bool = Field(False, description="dpo/orpo on a 4-bit NF4 base (as qlora).")
    beta: float = Field(0.1, gt=0, le=100, description=(
        "dpo: TRL's beta (lower = drift further); orpo: odds-ratio weight."))
    dataset_format: FormatName = Field("auto", description="Dataset record format.")
    system_prompt: str | None = Field(None, description="System message added to records without one.")
    eval_dataset: Path | None = Field(None, description=(
        "JSONL records held out for eval (loss, scored answers); default an eval_fraction share of dataset."))
    num_train_epochs: float | None = Field(None, gt=0, le=1000, description="Passes over the data; default by size.")
    max_steps: int = Field(-1, ge=-1, le=10_000_000, description="Steps to stop at; -1 = use epochs.")
    learning_rate: float | None = Field(None, gt=0, le=1, description="Peak rate; default by model size.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_steps: float = Field(0.03, ge=0, le=10_000_000,
                                description="Warm-up: steps, or a fraction of all steps if < 1.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay (0 to 1).")
    per_device_train_batch_size: int = Field(4, gt=0, le=4096, description="Records per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, le=4096, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, gt=0, le=1_048_576, description=(
        "Tokens per record; longer are cut."))
    lora_r: int | None = Field(None, gt=0, le=1024, description="LoRA rank; default 16 (32 past 10k records).")
    lora_alpha: int | None = Field(None, gt=0, le=65536, description="Updates scale by alpha / r; default 2r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on LoRA inputs.")
    lora_target_modules: list[str] | str = Field(
        "all-linear", description="Modules to adapt; all-linear = every linear layer but the head.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    assistant_only_loss: bool = Field(
        True, description="Loss on assistant turns only (their end-of-turn token included).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share held out for eval loss.")
    save_steps: int = Field(50, gt=0, le=10_000_000, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, gt=0, le=100, description="Keep at most K checkpoints (1 to 100).")
    logging_steps: int = Field(1, gt=0, le=10_000_000, description="Log loss every N steps.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    packing: Literal["padding_free", "bfd", "none"] = Field("padding_free", description=(
        "padding_free: each micro-batch's records joined into one row, positions restarting per record "
        "(the same records and loss as padded batches, without computing pads). bfd: records packed "
        "best-fit into rows of max_length, per_device_train_batch_size rows a step (fewer, fuller "
        "steps). none: padded batches. Records never attend to each other."))
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "forge_varlen"] = Field(
        "auto", description="Attention kernel; auto = flex_attention on CUDA (sdpa if unavailable); on CPU "
        "forge_varlen (sdpa record by record) for padding-free batches, else sdpa.")
    use_liger_kernel: bool | None = Field(
        None, description="liger-kernel fused CE/RMSNorm/RoPE/SwiGLU; default on when on CUDA and installed.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed.")
    resume: bool = Field(False, description="Continue from the highest-numbered checkpoint in the run dir.")
    resume_from: Path | None = Field(None, description=(
        "Another run's checkpoint dir to continue from in this (new) run dir; it is copied first, the run it "
        "came from is left as it is."))
    memory_plan: bool = Field(True, description=(
        "On a GPU, choose micro-batch, accumulation (same effective batch) and checkpointing to fit free memory."))
    num_processes: int = Field(1, ge=1, le=64, description="One per GPU (torchrun).")
    max_failures: int | None = Field(None, ge=0, le=100, description=(
        "On Ray: restarts from the last checkpoint after a lost node (default 0)."))
    report_to: list[Tracker] = Field(default_factory=list, description=(
        "Experiment trackers (transformers' report_to), writing inside RUN/trackers/, no network: tensorboard, "
        "mlflow (a file store), trackio (a local project)."))
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Multi-process strategy: ddp, or fsdp to shard.")

    @property
    def four_bit(self) -> bool:
        return self.method == "qlora" or self.load_in_4bit

    @property
    def preference(self) -> bool:
        return self.method in PREFERENCE_METHODS

    def run_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return runs_dir() / (self.run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}")


MAX_STEPS_ENV = "FORGE_MAX_TRAIN_STEPS"
DEFAULT_MAX_STEPS = 1_000_000


Records = int | list | None  # a count, or the records themselves (their groups decide the split)


def training_records(config: TrainConfig, records: Records = None) -> int:
    """Records the run trains on: the dataset's, less the eval split (none is split off with an eval_dataset).
    Given only a count, records carrying groups are counted as if they had none."""
    from forge.data import load_dataset, split

    if records is None:
        records = load_dataset(config.dataset, config.dataset_format).conversations
    if config.eval_dataset is not None:
        return len(records) if isinstance(records, list) else records
    items = records if isinstance(records, list) else list(range(records))
    return len(split(items, config.eval_fraction, config.seed)[0])


def with_defaults(config: TrainConfig, records: Records = None) -> tuple[TrainConfig, dict]:
    """The config with the hyperparameters left unset chosen from the data's and the model's size, and what
    was chosen and why (``forge.train.defaults``)."""
    from forge.train import defaults

    config = defaults.inherited(config)
    if all(getattr(config, k) is not None for k in (*defaults.CHOSEN, "lora_alpha")):
        return config, {}
    return defaults.apply(config, training_records(config, records))


def planned_steps(config: TrainConfig, records: int | list) -> int:
    """Optimizer steps a config asks for on ``records`` records (before a memory plan reshapes batches)."""
    import math

    if config.max_steps > 0:
        return config.max_steps
    config, _ = with_defaults(config, records)
    train_records = training_records(config, records)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.num_processes
    return math.ceil(math.ceil(train_records / per_step) * config.num_train_epochs)


def check_plan(config: TrainConfig, records: int | list) -> int:
    """Refuse a plan of more optimizer steps than FORGE_MAX_TRAIN_STEPS (default 1,000,000) before it
    takes a slot in the queue; return the planned steps."""
    config, _ = with_defaults(config, records)
    steps = planned_steps(config, records)
    limit = int(os.environ.get(MAX_STEPS_ENV) or DEFAULT_MAX_STEPS)
    if steps > limit:
        raise ForgeError(Codes.PLAN_TOO_LARGE,
                         f"this run would take {steps:,} optimizer steps "
                         f"({len(records) if isinstance(records, list) else records:,} records, "
                         f"num_train_epochs={config.num_train_epochs:g}, max_steps={config.max_steps}), over the "
                         f"limit of {limit:,}",
                         f"lower num_train_epochs or set max_steps; a limit this run truly needs is raised with "
                         f"{MAX_STEPS_ENV} where Forge runs", details=[f"planned_steps: {steps}", f"limit: {limit}"])
    return steps
