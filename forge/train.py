"""Train a LoRA or QLoRA adapter with TRL + PEFT: supervised (SFTTrainer), or on preference pairs
(DPOTrainer; ORPOTrainer), the reference model being the base itself with the adapter switched off.

``train`` reads as its phases: run dir → data → model → memory plan → trainer arguments → run →
adapter and metrics. Run dir layout: see ``forge.runs``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from forge import disk
from forge.config import StageConfig
from forge.data import FormatName
from forge.errors import Codes, ForgeError
from forge.packing import (
    ROW_LENGTHS_KEY,
    PackedCollator,
    labels_from_mask,
    pack,
    register_varlen_attention,
    single_rows,
    truncate_records,
)
from forge.paths import check_output, open_output
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import PROGRESS_FILE, STAGES_DIR, TRAIN_CONFIG_FILE, Outcome, record_stage, runs_dir
from forge.workspace import atomic_dir, atomic_write_json, dir_artifacts

Method = Literal["lora", "qlora", "dpo", "orpo"]
PREFERENCE_METHODS = ("dpo", "orpo")
Tracker = Literal["tensorboard", "mlflow", "trackio"]
METHOD_HELP = "lora; qlora (4-bit base); dpo or orpo (LoRA on chosen/rejected pairs)."


class TrainConfig(StageConfig):
    """Training config. Field names follow TRL's SFTConfig / PEFT's LoraConfig where they exist."""

    base_model: str = Field(description="Local model dir or hub id to fine-tune.")
    dataset: Path = Field(description="JSONL dataset (alpaca, messages or prompt/completion).")
    output_dir: Path | None = Field(None, description="Run dir; default $FORGE_HOME/runs/<run_name>.")
    chat_template: str | None = Field(None, description=(
        "For a base model without one: a family (chatml, llama3, gemma, phi3, phi4, mistral) or a Jinja file; "
        "tokens it needs are added and trained."))
    run_name: str | None = Field(None, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 description="Name of the run dir under $FORGE_HOME/runs (letters, digits, '.', "
                                 "'_', '-'; e.g. support-bot-v2).")
    method: Method = Field("lora", description=METHOD_HELP)
    load_in_4bit: bool = Field(False, description="dpo/orpo on a 4-bit NF4 base (as qlora).")
    beta: float = Field(0.1, gt=0, le=100, description=(
        "dpo: TRL's beta (lower = drift further); orpo: odds-ratio weight."))
    dataset_format: FormatName = Field("auto", description="Dataset record format.")
    system_prompt: str | None = Field(None, description="System message added to records without one.")
    num_train_epochs: float = Field(1.0, gt=0, le=1000, description=(
        "Passes over the data."))
    max_steps: int = Field(-1, ge=-1, le=10_000_000, description="Steps to stop at; -1 = use epochs.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak rate, e.g. 2e-4.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_steps: float = Field(0.03, ge=0, le=10_000_000,
                                description="Warm-up: steps, or a fraction of all steps if < 1.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay (0 to 1).")
    per_device_train_batch_size: int = Field(4, gt=0, le=4096, description="Records per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, le=4096, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, gt=0, le=1_048_576, description=(
        "Tokens per record; longer are cut."))
    lora_r: int = Field(16, gt=0, le=1024, description="LoRA rank, e.g. 16.")
    lora_alpha: int = Field(32, gt=0, le=65536, description="Updates scale by alpha / r.")
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
    memory_plan: bool = Field(True, description=(
        "On a GPU, choose micro-batch, accumulation (same effective batch) and checkpointing to fit free memory."))
    num_processes: int = Field(1, ge=1, le=64, description="One per GPU (torchrun).")
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


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The highest-numbered checkpoint, in numeric order (checkpoint-1000 after checkpoint-200)."""
    found = []
    for path in Path(checkpoints_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


STOP_FILE = "STOP"  # written into the run dir to stop ranks that no signal reaches (Ray Train workers)


class _StopFlag:
    """Set by SIGTERM, or by a STOP file in the run dir; the callback then saves a checkpoint and ends
    training cleanly. With several ranks, all of them agree on the step they stop at."""

    def __init__(self, run_dir: Path | None = None):
        self.requested = False
        self.stop_file = run_dir / STOP_FILE if run_dir else None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))

    def check(self, device) -> bool:
        if self.stop_file is not None and self.stop_file.exists():
            self.requested = True
        if _in_launched_rank():
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank stopping alone would hang the others
            self.requested = bool(flag.item())
        return self.requested


def _progress_callback(writer: ProgressWriter, stop: _StopFlag, counter: dict):
    from transformers import TrainerCallback

    class ForgeProgress(TrainerCallback):
        """Progress every step (no device syncs: token counts come from CPU-side batches)."""

        def __init__(self):
            self.last_loss = None
            self.preference = {}  # the last logged reward figures (dpo, orpo)
            self.start_time = None
            self.start_step = 0
            self.last_write = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_time = time.time()
            self.start_step = state.global_step
            writer({"event": "train_begin", "step": state.global_step, "total_steps": state.max_steps})

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.last_loss = logs["loss"]
                self.preference = preference_figures(logs)
            if "eval_loss" in logs:
                writer({"event": "eval", "step": state.global_step, "eval_loss": logs["eval_loss"],
                        "epoch": state.epoch, **preference_figures(logs, "eval_")})

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            elapsed = max(now - self.start_time, 1e-9)
            done = state.global_step - self.start_step
            last = state.global_step >= state.max_steps
            if stop.check(args.device):
                control.should_save = True
                control.should_training_stop = True
            if now - self.last_write < 1.0 and not last and done > 1 and not stop.requested:
                return
            self.last_write = now
            lr = state.log_history[-1].get("learning_rate") if state.log_history else None
            writer({
                "event": "progress", "step": state.global_step, "total_steps": state.max_steps,
                "epoch": round(state.epoch or 0.0, 4), "loss": self.last_loss, "learning_rate": lr,
                "tokens_per_s": round(counter["tokens"] / elapsed, 2),
                "eta_s": round((state.max_steps - state.global_step) * elapsed / max(done, 1), 1),
                "percent": round(100.0 * state.global_step / max(state.max_steps, 1), 1),
                **self.preference,
            })

    return ForgeProgress()


# TRL's reward logs (dpo, orpo) → Forge's progress fields
PREFERENCE_LOGS = {"rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
                   "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}


def preference_figures(logs: dict, prefix: str = "") -> dict:
    """Reward figures from one TRL log: how much more the adapter prefers the chosen answer than the base
    does (reward = beta * log-ratio), the share of pairs ranked right, and the mean margin."""
    return {field: round(float(logs[prefix + key]), 4) for key, field in PREFERENCE_LOGS.items()
            if prefix + key in logs}


def _rows(tokens, config: TrainConfig) -> list[dict]:
    pairs = zip(tokens.input_ids, tokens.assistant_masks, strict=True)
    records = truncate_records([{"input_ids": ids, "labels": labels_from_mask(ids, mask)} for ids, mask in pairs],
                               config.max_length)
    return pack(records, row_length=config.max_length) if config.packing == "bfd" else single_rows(records)


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


def _eval_strategy(config: TrainConfig, eval_set, on_cuda: bool) -> str:
    if eval_set is None:
        return "no"
    if config.four_bit and not on_cuda:
        # bitsandbytes (0.50, CPU) repacks 4-bit weights for inference on eval and training then
        # fails on them; evaluate once, after training, instead of at each epoch end.
        return "no"
    return "epoch"


def _use_liger(config: TrainConfig, on_cuda: bool) -> bool:
    if config.use_liger_kernel and not on_cuda:
        raise ForgeError(Codes.CUDA_REQUIRED, "liger-kernel's Triton kernels need a CUDA GPU",
                         "leave use_liger_kernel unset (it turns on by itself on CUDA when installed)")
    if config.use_liger_kernel is not None:
        return config.use_liger_kernel
    if not on_cuda:
        return False
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def _load_model(config: TrainConfig, model_ref: str):
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


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _in_launched_rank() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relay_rank0(run_dir: Path, on_progress: ProgressCallback | None, running) -> None:
    """Pass rank 0's progress lines on to ``on_progress`` while ``running()`` is true, then the rest."""
    progress_path = run_dir / PROGRESS_FILE
    seen = len(progress_path.read_text(encoding="utf-8").splitlines()) if progress_path.is_file() else 0
    while True:
        done = not running()
        if on_progress and progress_path.is_file():
            lines = progress_path.read_text(encoding="utf-8").splitlines()
            for line in lines[seen:]:
                on_progress(json.loads(line))
            seen = len(lines)
        if done:
            return
        time.sleep(0.5)


def launch_distributed(config: TrainConfig, run_dir: Path, writer: ProgressWriter,
                       on_progress: ProgressCallback | None) -> dict:
    """Start N ranks with torch.distributed.run and follow rank 0's progress file until they end."""
    import subprocess
    import sys

    launch_config = run_dir / "launch_config.json"
    atomic_write_json(launch_config, config.model_dump(mode="json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", str(config.num_processes), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "forge._dist_train", str(launch_config)]
    writer.stage("launching", num_processes=config.num_processes, distributed=config.distributed)
    with open_output(run_dir / "ranks.log", "ranks log", append=True) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=False)
        try:
            relay_rank0(run_dir, on_progress, lambda: proc.poll() is None)
        except BaseException:
            proc.terminate()
            proc.wait(timeout=60)
            raise
    if proc.returncode != 0:
        tail = "\n".join((run_dir / "ranks.log").read_text(encoding="utf-8", errors="replace").splitlines()[-8:])
        raise ForgeError(Codes.INTERNAL, f"multi-process training failed (exit {proc.returncode}): {tail}",
                         f"see {run_dir / 'ranks.log'}; num_processes must not exceed the GPUs (or CPU cores)")
    return json.loads((run_dir / STAGES_DIR / "train.json").read_text(encoding="utf-8"))


@dataclass
class _Run:
    """Where one training run lives and how it reports."""

    dir: Path
    checkpoints: Path
    adapter: Path
    resume_from: Path | None
    writer: ProgressWriter
    rank0: bool


@dataclass
class _Data:
    tokenizer: object
    template: dict  # the chat template trained with: source, sha256, tokens added to the vocabulary
    dataset: object  # forge.data.Dataset
    train_records: int
    eval_records: int
    stats: dict
    train_set: object
    eval_set: object | None
    collator: object | None


@dataclass
class _Plan:
    """Micro-batch, accumulation and checkpointing: the config's, or the memory planner's on a GPU."""

    per_device: int
    accumulation: int
    checkpointing: bool
    memory_plan: dict | None = None


# TrainConfig fields named like TRL's SFTConfig fields that Forge sets itself instead of passing through.
FORGE_SETS = {"output_dir", "run_name", "packing", "use_liger_kernel", "assistant_only_loss", "report_to",
              "per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing"}


# The modules each tracker needs (any one of them), and where transformers reads each one's directory.
TRACKER_MODULES = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow",), "trackio": ("trackio",)}


def _check_trackers(config: TrainConfig) -> None:
    import importlib.util

    missing = [t for t in config.report_to if not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[t])]
    if missing:
        raise ForgeError(Codes.INVALID_ARGUMENT, f"report_to names {', '.join(missing)}, which is not installed",
                         "pip install 'forge-finetune[trackers]' (tensorboardX, mlflow-skinny), or trackio for "
                         "trackio; or leave report_to empty")


@contextlib.contextmanager
def _trackers(config: TrainConfig, run_dir: Path):
    """Each tracker writes inside RUN/trackers/, offline: the settings transformers' callbacks read, set for
    this training only."""
    root = (run_dir / "trackers").resolve()
    env = {}
    if "tensorboard" in config.report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(root / "tensorboard")
    if "mlflow" in config.report_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        # a local file store (MLflow keeps it in maintenance mode; a tracking server named by the user wins)
        env.update(MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true",
                   MLFLOW_EXPERIMENT_NAME=run_dir.name)
    if "trackio" in config.report_to:
        env.update(TRACKIO_DIR=str(root / "trackio"), TRACKIO_PROJECT=run_dir.name)
    saved = {k: os.environ.get(k) for k in [*env, "MLFLOW_EXPERIMENT_ID"]}  # MLflow sets the last one itself
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _prepare_run(config: TrainConfig, on_progress: ProgressCallback | None) -> _Run:
    run_dir = check_output(config.run_dir(), "run dir")
    checkpoints_dir, adapter_dir = run_dir / "checkpoints", run_dir / "adapter"
    resume_from = None
    if config.resume:
        resume_from = latest_checkpoint(checkpoints_dir)
        if resume_from is None:
            raise ForgeError(Codes.NO_CHECKPOINT, f"no checkpoint to resume from in {checkpoints_dir}",
                             "train without resume, or point output_dir at the run that was interrupted")
    elif not _in_launched_rank() and (adapter_dir.exists() or latest_checkpoint(checkpoints_dir)):
        raise ForgeError(Codes.OUTPUT_EXISTS, f"run dir {run_dir} already holds a training run",
                         "pass resume=true (--resume) to continue it, or choose another run_name")
    _check_trackers(config)
    if config.four_bit:
        from forge.hardware import device_kind

        if device_kind() == "cpu":
            import bitsandbytes  # noqa: F401  (0.50 runs NF4 on CPU too; fail early if it is missing)
    run_dir.mkdir(parents=True, exist_ok=True)
    local_base = Path(config.base_model) if Path(config.base_model).is_dir() else None
    disk.ensure_space(run_dir, disk.train_bytes(local_base, config.lora_r, config.save_total_limit), "training")
    rank0 = _rank() == 0
    if rank0:
        atomic_write_json(run_dir / TRAIN_CONFIG_FILE, config.model_dump(mode="json"))
    # Only rank 0 reports: N ranks writing progress would repeat every step N times.
    writer = ProgressWriter(run_dir / PROGRESS_FILE if rank0 else None, on_progress if rank0 else None)
    return _Run(run_dir, checkpoints_dir, adapter_dir, resume_from, writer, rank0)


def _base_model(config: TrainConfig, writer: ProgressWriter) -> tuple[str, dict | None]:
    """The base model to load; a GGUF is turned into a model dir first (once), and the run says so."""
    from forge.model_ref import resolve_base

    if str(config.base_model).endswith(".gguf"):
        writer.stage("converting_gguf")
    model_ref, gguf = resolve_base(config.base_model)
    if gguf is not None:
        how = "converted" if gguf["converted_now"] else "found converted (cached by sha256)"
        writer({"event": "warning", "message": (
            f"the base model is a GGUF ({gguf.get('file_type')}), {how} at {model_ref}: its weights are the "
            f"dequantized {gguf.get('file_type')} values, not the original full-precision ones")})
    return model_ref, gguf


def _prepare_data(config: TrainConfig, model_ref: str, writer: ProgressWriter) -> _Data:
    """Validate, split and tokenize through the chat template; rows packed as the config asks."""
    import datasets
    from datasets import Dataset as HFDataset

    from forge import data

    datasets.disable_progress_bars()  # their bars are noise next to progress.jsonl
    writer.stage("preparing_data")
    tokenizer, template = data.prepare_tokenizer(model_ref, config.chat_template)
    ds = data.load_dataset(config.dataset, config.dataset_format, config.system_prompt)
    if config.preference:
        return _preference_data(config, tokenizer, template, ds)
    train_convs, eval_convs = data.split(ds.conversations, config.eval_fraction, config.seed)
    train_tokens = data.tokenize_all(tokenizer, train_convs)
    stats = data.token_stats(train_tokens, config.max_length)
    if not config.assistant_only_loss:
        train_tokens.assistant_masks = [[1] * len(m) for m in train_tokens.assistant_masks]
    eval_tokens = data.tokenize_all(tokenizer, eval_convs) if eval_convs else None
    collator = None
    if config.packing != "none":
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_set = HFDataset.from_list(_rows(train_tokens, config))
        eval_set = HFDataset.from_list(_rows(eval_tokens, config)) if eval_tokens else None
        collator = PackedCollator(pad_token_id=pad_id, flatten=config.packing == "padding_free")
    else:
        train_set = HFDataset.from_list(train_tokens.as_records())
        eval_set = HFDataset.from_list(eval_tokens.as_records()) if eval_tokens else None
    return _Data(tokenizer, template, ds, len(train_convs), len(eval_convs), stats, train_set, eval_set, collator)


def _preference_data(config: TrainConfig, tokenizer, template: dict, ds) -> _Data:
    """Preference pairs for TRL: conversational for DPO (TRL renders them through the chat template, the
    answer's end-of-turn token included); rendered here for ORPO, whose trainer takes text."""
    from datasets import Dataset as HFDataset

    from forge import data

    if template["added_tokens"]:
        raise ForgeError(Codes.INVALID_ARGUMENT,
                         f"method={config.method} cannot teach a base model new chat tokens "
                         f"({', '.join(template['added_tokens'])})",
                         "train with method=lora and chat_template first, merge, then run "
                         f"method={config.method} on the merged model")
    pairs = ds.preference_pairs()
    train_pairs, eval_pairs = data.split(pairs, config.eval_fraction, config.seed)
    train_convs, _ = data.split(ds.conversations, config.eval_fraction, config.seed)
    stats = data.token_stats(data.tokenize_all(tokenizer, train_convs), config.max_length)  # on the chosen answers
    if config.method == "orpo":
        train_pairs = [data.render_pair(tokenizer, p) for p in train_pairs]
        eval_pairs = [data.render_pair(tokenizer, p) for p in eval_pairs]
    return _Data(tokenizer, template, ds, len(train_pairs), len(eval_pairs), stats, HFDataset.from_list(train_pairs),
                 HFDataset.from_list(eval_pairs) if eval_pairs else None, None)


def _plan_memory(config: TrainConfig, model, on_cuda: bool, liger: bool, writer: ProgressWriter) -> _Plan:
    """On a GPU, fit micro-batch/accumulation/checkpointing to free memory, keeping the effective batch."""
    chosen = _Plan(config.per_device_train_batch_size, config.gradient_accumulation_steps,
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
    return _Plan(fit.per_device_train_batch_size, fit.gradient_accumulation_steps,
                 chosen.checkpointing or fit.gradient_checkpointing, memory_plan)


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


def trainer_arguments(config: TrainConfig, plan: _Plan, checkpoints_dir: Path, eval_set, on_cuda: bool,
                      dtype, liger: bool):
    """TRL's config for the method (SFTConfig, DPOConfig, ORPOConfig): the fields TrainConfig shares with it
    by name pass straight through; the rest are what Forge decides (plan, device, packing, distributed)."""
    import dataclasses

    import torch

    config_class = _config_class(config.method)
    fields = {f.name for f in dataclasses.fields(config_class)}
    shared = fields & set(TrainConfig.model_fields) - FORGE_SETS
    launched = _in_launched_rank()
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


def _grow_vocabulary(model, tokenizer) -> None:
    """Room in the embeddings for the tokens a chat template added, and generation stopping at its end
    of turn."""
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _new_token_modules(model, tokenizer, added: list[str]) -> dict | None:
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


def _build_trainer(config: TrainConfig, model, data: _Data, args, writer: ProgressWriter, stop: _StopFlag):
    from peft import LoraConfig
    from transformers import PrinterCallback

    new_tokens = _new_token_modules(model, data.tokenizer, data.template["added_tokens"])
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
    trainer.add_callback(_progress_callback(writer, stop, trainer.real_tokens))
    return trainer


def _run_trainer(trainer, run: _Run, stop: _StopFlag):
    """Train (from the checkpoint when resuming); return the Trainer's result and the world size."""
    import torch

    run.writer.stage("training", resume_from=str(run.resume_from) if run.resume_from else None)
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except torch.OutOfMemoryError as exc:
        raise ForgeError(Codes.OUT_OF_MEMORY, "training ran out of GPU memory",
                         "lower per_device_train_batch_size or max_length, turn on gradient_checkpointing, "
                         "or use method=qlora; resume=true continues from the last checkpoint",
                         retryable=True) from exc
    world = 1
    if _in_launched_rank():
        import torch.distributed as dist

        world = dist.get_world_size()
        counted = torch.tensor([trainer.real_tokens["tokens"], trainer.real_tokens.get("slots", 0)])
        dist.all_reduce(counted)  # every rank trained on its own shard: tokens/s is the sum
        trainer.real_tokens.update(tokens=int(counted[0]), slots=int(counted[1]))
    return result, world


def _final_evals(trainer, eval_set) -> list[dict]:
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if eval_set is not None and not (evals and evals[-1]["step"] == trainer.state.global_step):
        trainer.evaluate()  # the last epoch-end eval did not land on the final step
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    return evals


def _metrics(trainer, result, evals: list[dict], duration: float, world: int, plan: _Plan, liger: bool,
             resume_from: Path | None) -> dict:
    from forge.hardware import peak_memory_bytes

    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    peak = peak_memory_bytes()
    tokens = trainer.real_tokens
    return {
        "final_epoch": round(trainer.state.epoch or 0.0, 4),
        "global_step": trainer.state.global_step,
        "duration_s": round(duration, 2),
        "train_loss": result.training_loss,
        "last_logged_loss": train_losses[-1] if train_losses else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "samples_per_s": result.metrics.get("train_samples_per_second"),
        "steps_per_s": result.metrics.get("train_steps_per_second"),
        "tokens_per_s": round(tokens["tokens"] / max(duration, 1e-9), 2),
        "real_tokens": tokens["tokens"],
        "slot_share": round(tokens["tokens"] / max(tokens.get("slots", 0), 1), 4),
        "peak_memory_bytes": peak["bytes"], "peak_memory_kind": peak["kind"],
        "resumed_from": str(resume_from) if resume_from else None,
        "world_size": world,
        "memory_plan": plan.memory_plan, "liger_kernel": liger,
        "preference": _preference_metrics(history, evals),
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_curve": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in evals],
    }


def _preference_metrics(history: list[dict], evals: list[dict]) -> dict | None:
    """Reward figures at the first and last logged step, and on the eval split at the end (dpo, orpo)."""
    logged = [h for h in history if "rewards/accuracies" in h]
    if not logged:
        return None
    out = {"first": preference_figures(logged[0]), "last": preference_figures(logged[-1])}
    if evals and "eval_rewards/accuracies" in evals[-1]:
        out["eval"] = preference_figures(evals[-1], "eval_")
    return out


def train(config: TrainConfig, on_progress: ProgressCallback | None = None) -> dict:
    """Train an adapter; return the result (paths, metrics, artifacts). Raises ForgeError."""
    import torch

    from forge.hardware import device_kind

    # Run dir (and, for several processes, the launcher that runs this function once per rank)
    run = _prepare_run(config, on_progress)
    if run.rank0:
        (run.dir / STOP_FILE).unlink(missing_ok=True)  # a stop request belongs to the run it stopped
    if config.num_processes > 1 and not _in_launched_rank():
        if os.environ.get("FORGE_EXECUTOR") == "ray":  # a Ray job: the ranks are Ray Train workers
            from forge.ray_train import launch_ray_train

            return launch_ray_train(config, run.dir, run.writer, on_progress)
        return launch_distributed(config, run.dir, run.writer, on_progress)

    # Data, model, memory plan, trainer
    model_ref, gguf = _base_model(config, run.writer)
    data = _prepare_data(config, model_ref, run.writer)
    run.writer.stage("loading_model")
    torch.manual_seed(config.seed)
    model = _load_model(config, model_ref)
    model.config.use_cache = False  # with a cache, transformers skips the packed-sequence mask
    if data.template["added_tokens"]:
        _grow_vocabulary(model, data.tokenizer)
    on_cuda = device_kind() == "cuda"
    liger = _use_liger(config, on_cuda)
    plan = _plan_memory(config, model, on_cuda, liger, run.writer)
    args = trainer_arguments(config, plan, run.checkpoints, data.eval_set, on_cuda, model.dtype, liger)
    stop = _StopFlag(run.dir)
    with _trackers(config, run.dir):
        trainer = _build_trainer(config, model, data, args, run.writer, stop)

        # Run
        started = time.time()
        result, world = _run_trainer(trainer, run, stop)
        duration = time.time() - started
    if stop.requested:
        checkpoint = str(latest_checkpoint(run.checkpoints))
        run.writer.stage("cancelled", checkpoint=checkpoint)
        return {"status": Outcome.CANCELLED, "run_dir": str(run.dir), "checkpoint": checkpoint,
                "step": trainer.state.global_step}

    # Adapter (with the tokenizer and chat template used in training), metrics, stage record
    run.writer.stage("saving")
    evals = _final_evals(trainer, data.eval_set)
    if not run.rank0:
        return {"status": Outcome.SUCCEEDED, "run_dir": str(run.dir), "rank": _rank()}
    with atomic_dir(run.adapter, force=True) as tmp:
        # with new tokens, the resized embeddings go with the adapter: merging needs the same rows
        trainer.model.save_pretrained(tmp, save_embedding_layers=True if data.template["added_tokens"] else "auto")
        data.tokenizer.save_pretrained(tmp)
    metrics = _metrics(trainer, result, evals, duration, world, plan, liger, run.resume_from)
    atomic_write_json(run.dir / "metrics.json", metrics)
    run.writer({"event": "done", "step": trainer.state.global_step, "total_steps": trainer.state.max_steps,
                "percent": 100.0, "train_loss": metrics["train_loss"], "eval_loss": metrics["eval_loss"]})
    ds = data.dataset
    out = {
        "status": Outcome.SUCCEEDED, "run_dir": str(run.dir), "adapter_dir": str(run.adapter),
        "base_model": config.base_model, "base_model_dir": model_ref, "base_gguf": gguf,
        "method": config.method, "metrics": metrics,
        "dataset": {"path": str(ds.path), "sha256": ds.sha256, "format": ds.format,
                    "train_records": data.train_records, "eval_records": data.eval_records, "tokens": data.stats},
        "chat_template": data.template,
        "trackers": {t: str(run.dir / "trackers" / ("mlruns" if t == "mlflow" else t)) for t in config.report_to},
        "artifacts": dir_artifacts(run.adapter, "adapter"),
    }
    record_stage(run.dir, "train", out)
    return out


MAX_STEPS_ENV = "FORGE_MAX_TRAIN_STEPS"
DEFAULT_MAX_STEPS = 1_000_000


def planned_steps(config: TrainConfig, records: int) -> int:
    """Optimizer steps a config asks for on ``records`` records (before a memory plan reshapes batches)."""
    import math

    from forge.data import split

    if config.max_steps > 0:
        return config.max_steps
    train_records = len(split(list(range(records)), config.eval_fraction, config.seed)[0])
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.num_processes
    return math.ceil(math.ceil(train_records / per_step) * config.num_train_epochs)


def check_plan(config: TrainConfig, records: int) -> int:
    """Refuse a plan of more optimizer steps than FORGE_MAX_TRAIN_STEPS (default 1,000,000) before it
    takes a slot in the queue; return the planned steps."""
    steps = planned_steps(config, records)
    limit = int(os.environ.get(MAX_STEPS_ENV) or DEFAULT_MAX_STEPS)
    if steps > limit:
        raise ForgeError(Codes.PLAN_TOO_LARGE,
                         f"this run would take {steps:,} optimizer steps ({records:,} records, "
                         f"num_train_epochs={config.num_train_epochs:g}, max_steps={config.max_steps}), over the "
                         f"limit of {limit:,}",
                         f"lower num_train_epochs or set max_steps; a limit this run truly needs is raised with "
                         f"{MAX_STEPS_ENV} where Forge runs", details=[f"planned_steps: {steps}", f"limit: {limit}"])
    return steps
