"""Train a LoRA or QLoRA adapter with TRL's SFTTrainer + PEFT.

Reads top to bottom: config → tokenizer → data → model → trainer → run → save.
Run dir layout: ``checkpoints/checkpoint-N``, ``adapter/``, ``progress.jsonl``, ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.seal import record_stage
from forge.packing import (
    ROW_LENGTHS_KEY, PackedCollator, labels_from_mask, pack, register_varlen_attention, single_rows,
    truncate_records,
)
from forge.progress import ProgressCallback, ProgressWriter
from forge.workspace import atomic_dir, atomic_write_json, dir_artifacts, forge_home


class TrainConfig(StageConfig):
    """Training config. Field names follow TRL's SFTConfig / PEFT's LoraConfig where they exist."""

    base_model: str = Field(description="Local model dir or hub id to fine-tune.")
    dataset: Path = Field(description="JSONL dataset (alpaca, messages or prompt/completion).")
    output_dir: Path | None = Field(None, description="Run dir; default $FORGE_HOME/runs/<output_name>.")
    output_name: str | None = Field(None, description="Name of the run dir under $FORGE_HOME/runs.")
    method: Literal["lora", "qlora"] = Field("lora", description="lora, or qlora (4-bit NF4 base, bitsandbytes).")
    dataset_format: Literal["auto", "alpaca", "messages", "prompt_completion"] = Field(
        "auto", description="Dataset record format.")
    system_prompt: str | None = Field(None, description="System message added to records without one.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the adapter.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_steps: float = Field(0.03, ge=0, description="Warm-up: steps, or a fraction of all steps if < 1.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    per_device_train_batch_size: int = Field(4, gt=0, description="Records per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, gt=0, description="Tokens per record (TRL's max_length); longer ones are truncated.")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | str = Field("all-linear", description="Modules to adapt; all-linear = every linear layer but the head.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    assistant_only_loss: bool = Field(True, description="Loss on assistant turns only (their end-of-turn token included).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of records held out for eval loss.")
    save_steps: int = Field(50, gt=0, description="Save a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, gt=0, description="Keep at most K checkpoints.")
    logging_steps: int = Field(1, gt=0, description="Log loss every N steps.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    packing: Literal["padding_free", "bfd", "none"] = Field("padding_free", description=(
        "padding_free: each micro-batch's records joined into one row, positions restarting per record "
        "(the same records and loss as padded batches, without computing pads). bfd: records packed "
        "best-fit into rows of max_length, per_device_train_batch_size rows a step (fewer, fuller "
        "steps). none: padded batches. Records never attend to each other."))
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "forge_varlen"] = Field(
        "auto", description="Attention kernel; auto = flex_attention on CUDA (sdpa if unavailable); on CPU "
        "forge_varlen (sdpa record by record) for padding-free batches, else sdpa.")
    use_liger_kernel: bool | None = Field(
        None, description="liger-kernel fused CE/RMSNorm/RoPE/SwiGLU; default on when on CUDA and installed.")
    seed: int = Field(42, description="Seed for the split, init and shuffling.")
    resume: bool = Field(False, description="Continue from the highest-numbered checkpoint in the run dir.")
    memory_plan: bool = Field(True, description=(
        "On a GPU, choose micro-batch, accumulation (same effective batch) and checkpointing to fit free memory."))
    num_processes: int = Field(1, ge=1, description="Processes (one per GPU; DDP over gloo on CPU) via torchrun.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Multi-process strategy: ddp, or fsdp to shard.")

    def run_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        name = self.output_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
        return forge_home() / "runs" / name


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The highest-numbered checkpoint, in numeric order (checkpoint-1000 after checkpoint-200)."""
    found = []
    for path in Path(checkpoints_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


class _StopFlag:
    """Set by SIGTERM; the callback then saves a checkpoint and ends training cleanly."""

    def __init__(self):
        self.requested = False

    def install(self):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))


def _progress_callback(writer: ProgressWriter, stop: _StopFlag, counter: dict):
    from transformers import TrainerCallback

    class ForgeProgress(TrainerCallback):
        """Progress every step (no device syncs: token counts come from CPU-side batches)."""

        def __init__(self):
            self.last_loss = None
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
            if "eval_loss" in logs:
                writer({"event": "eval", "step": state.global_step, "eval_loss": logs["eval_loss"],
                        "epoch": state.epoch})

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            elapsed = max(now - self.start_time, 1e-9)
            done = state.global_step - self.start_step
            last = state.global_step >= state.max_steps
            if stop.requested:
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
            })

    return ForgeProgress()


def _rows(tokens, config: TrainConfig) -> list[dict]:
    records = truncate_records([{"input_ids": ids, "labels": labels_from_mask(ids, mask)}
                                for ids, mask in zip(tokens.input_ids, tokens.assistant_masks)], config.max_length)
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
    if config.method == "qlora" and not on_cuda:
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
    if config.method == "qlora":
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
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return model


def _trainer_class():
    from trl import SFTTrainer

    class ForgeSFTTrainer(SFTTrainer):
        """Counts real (non-pad) training tokens on the CPU-side batch, before it moves to the device."""

        real_tokens = {"tokens": 0}

        def training_step(self, model, inputs, num_items_in_batch=None):
            rows = inputs.pop(ROW_LENGTHS_KEY, None)
            mask = inputs.get("attention_mask")
            self.real_tokens["slots"] = self.real_tokens.get("slots", 0) + int(inputs["input_ids"].numel())
            if rows is not None:
                self.real_tokens["tokens"] += int(rows.sum())
            else:
                self.real_tokens["tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs.pop(ROW_LENGTHS_KEY, None)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    return ForgeSFTTrainer


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _in_launched_rank() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    progress_path = run_dir / "progress.jsonl"
    seen = len(progress_path.read_text(encoding="utf-8").splitlines()) if progress_path.is_file() else 0
    with open(run_dir / "ranks.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=False)
        try:
            while True:
                done = proc.poll() is not None
                if on_progress and progress_path.is_file():
                    lines = progress_path.read_text(encoding="utf-8").splitlines()
                    for line in lines[seen:]:
                        on_progress(json.loads(line))
                    seen = len(lines)
                if done:
                    break
                time.sleep(0.5)
        except BaseException:
            proc.terminate()
            proc.wait(timeout=60)
            raise
    if proc.returncode != 0:
        tail = "\n".join((run_dir / "ranks.log").read_text(encoding="utf-8", errors="replace").splitlines()[-8:])
        raise ForgeError(Codes.INTERNAL, f"multi-process training failed (exit {proc.returncode}): {tail}",
                         f"see {run_dir / 'ranks.log'}; num_processes must not exceed the GPUs (or CPU cores)")
    return json.loads((run_dir / "stages" / "train.json").read_text(encoding="utf-8"))


def train(config: TrainConfig, on_progress: ProgressCallback | None = None) -> dict:
    """Train an adapter; return the result (paths, metrics, artifacts). Raises ForgeError."""
    import torch
    from datasets import Dataset as HFDataset
    from peft import LoraConfig
    from trl import SFTConfig

    from forge import data
    from forge.hardware import device_kind, peak_memory_bytes
    from forge.models import resolve_model

    # Config and run dir
    run_dir = config.run_dir()
    checkpoints_dir = run_dir / "checkpoints"
    adapter_dir = run_dir / "adapter"
    resume_from = None
    if config.resume:
        resume_from = latest_checkpoint(checkpoints_dir)
        if resume_from is None:
            raise ForgeError(Codes.NO_CHECKPOINT, f"no checkpoint to resume from in {checkpoints_dir}",
                             "train without resume, or point output_dir at the run that was interrupted")
    elif not _in_launched_rank() and (adapter_dir.exists() or latest_checkpoint(checkpoints_dir)):
        raise ForgeError(Codes.OUTPUT_EXISTS, f"run dir {run_dir} already holds a training run",
                         "pass resume=true (--resume) to continue it, or choose another output_name")
    if config.method == "qlora" and device_kind() == "cpu":
        import bitsandbytes  # noqa: F401  (0.50 runs NF4 on CPU too; fail early if it is missing)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank0 = _rank() == 0
    if rank0:
        atomic_write_json(run_dir / "train_config.json", config.model_dump(mode="json"))
    # Only rank 0 reports: N ranks writing progress would repeat every step N times.
    writer = ProgressWriter(run_dir / "progress.jsonl" if rank0 else None, on_progress if rank0 else None)
    if config.num_processes > 1 and not _in_launched_rank():
        return launch_distributed(config, run_dir, writer, on_progress)

    # Tokenizer and data (datasets' own progress bars are noise next to progress.jsonl)
    import datasets

    datasets.disable_progress_bars()
    writer.stage("preparing_data")
    model_ref = resolve_model(config.base_model)
    tokenizer = data.load_tokenizer(model_ref)
    ds = data.load_dataset(config.dataset, config.dataset_format, config.system_prompt)
    train_convs, eval_convs = data.split(ds.conversations, config.eval_fraction, config.seed)
    train_tokens = data.tokenize_all(tokenizer, train_convs)
    stats = data.token_stats(train_tokens, config.max_length)
    if not config.assistant_only_loss:
        train_tokens.assistant_masks = [[1] * len(m) for m in train_tokens.assistant_masks]
    eval_tokens = data.tokenize_all(tokenizer, eval_convs) if eval_convs else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = None
    if config.packing != "none":
        train_set = HFDataset.from_list(_rows(train_tokens, config))
        eval_set = HFDataset.from_list(_rows(eval_tokens, config)) if eval_tokens else None
        collator = PackedCollator(pad_token_id=pad_id, flatten=config.packing == "padding_free")
    else:
        train_set = HFDataset.from_list(train_tokens.as_records())
        eval_set = HFDataset.from_list(eval_tokens.as_records()) if eval_tokens else None

    # Model
    writer.stage("loading_model")
    torch.manual_seed(config.seed)
    model = _load_model(config, model_ref)
    peft_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules, use_rslora=config.use_rslora, task_type="CAUSAL_LM",
    )
    on_cuda = device_kind() == "cuda"
    dtype = model.dtype
    model.config.use_cache = False  # with a cache, transformers skips the packed-sequence mask
    liger = _use_liger(config, on_cuda)
    per_device, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    checkpointing, memory_plan = config.gradient_checkpointing, None
    if on_cuda and config.memory_plan:
        from forge.planner import ModelShape, plan

        free, _ = torch.cuda.mem_get_info()
        chosen = plan(ModelShape.from_config(model.config.to_dict()), config.method, config.max_length, per_device,
                      accumulation, free + torch.cuda.memory_allocated(), liger, config.lora_r)
        per_device, accumulation = chosen.per_device_train_batch_size, chosen.gradient_accumulation_steps
        checkpointing = checkpointing or chosen.gradient_checkpointing
        memory_plan = chosen.as_dict()
        writer({"event": "plan", **memory_plan})
    args = SFTConfig(
        dataset_kwargs={"skip_prepare_dataset": True} if config.packing != "none" else None,
        remove_unused_columns=config.packing == "none", use_liger_kernel=liger,
        output_dir=str(checkpoints_dir), num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=accumulation, max_length=config.max_length,
        logging_steps=config.logging_steps, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, eval_strategy=_eval_strategy(config, eval_set, on_cuda),
        gradient_checkpointing=checkpointing, seed=config.seed, data_seed=config.seed,
        bf16=on_cuda and dtype == torch.bfloat16, fp16=on_cuda and dtype == torch.float16,
        optim="adamw_torch_fused" if on_cuda else "adamw_torch", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=on_cuda, use_cpu=not on_cuda,
        ddp_backend=("nccl" if on_cuda else "gloo") if _in_launched_rank() else None,
        ddp_find_unused_parameters=False if _in_launched_rank() else None,
        fsdp="full_shard auto_wrap" if _in_launched_rank() and config.distributed == "fsdp" else "",
    )
    stop = _StopFlag()
    trainer_cls = _trainer_class()
    trainer = trainer_cls(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          processing_class=tokenizer, peft_config=peft_config, data_collator=collator)
    trainer.real_tokens = {"tokens": 0}
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress.jsonl replaces its printed dicts
    trainer.add_callback(_progress_callback(writer, stop, trainer.real_tokens))

    # Run
    writer.stage("training", resume_from=str(resume_from) if resume_from else None)
    stop.install()
    started = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError as exc:
        raise ForgeError(Codes.OUT_OF_MEMORY, "training ran out of GPU memory",
                         "lower per_device_train_batch_size or max_length, turn on gradient_checkpointing, "
                         "or use method=qlora; resume=true continues from the last checkpoint",
                         retryable=True) from exc
    duration = time.time() - started
    world = 1
    if _in_launched_rank():
        import torch.distributed as dist

        world = dist.get_world_size()
        counted = torch.tensor([trainer.real_tokens["tokens"], trainer.real_tokens.get("slots", 0)])
        dist.all_reduce(counted)  # every rank trained on its own shard: tokens/s is the sum
        trainer.real_tokens.update(tokens=int(counted[0]), slots=int(counted[1]))
    if stop.requested:
        writer.stage("cancelled", checkpoint=str(latest_checkpoint(checkpoints_dir)))
        return {"status": "cancelled", "run_dir": str(run_dir),
                "checkpoint": str(latest_checkpoint(checkpoints_dir)), "step": trainer.state.global_step}

    # Save adapter, tokenizer and chat template together
    writer.stage("saving")
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if eval_set is not None and not (evals and evals[-1]["step"] == trainer.state.global_step):
        trainer.evaluate()  # the last epoch-end eval did not land on the final step
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if not rank0:
        return {"status": "succeeded", "run_dir": str(run_dir), "rank": _rank()}
    with atomic_dir(adapter_dir, force=True) as tmp:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = peak_memory_bytes()
    metrics = {
        "final_epoch": round(trainer.state.epoch or 0.0, 4),
        "global_step": trainer.state.global_step,
        "duration_s": round(duration, 2),
        "train_loss": result.training_loss,
        "last_logged_loss": train_losses[-1] if train_losses else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "samples_per_s": result.metrics.get("train_samples_per_second"),
        "steps_per_s": result.metrics.get("train_steps_per_second"),
        "tokens_per_s": round(trainer.real_tokens["tokens"] / max(duration, 1e-9), 2),
        "real_tokens": trainer.real_tokens["tokens"],
        "slot_share": round(trainer.real_tokens["tokens"] / max(trainer.real_tokens.get("slots", 0), 1), 4),
        "peak_memory_bytes": peak["bytes"], "peak_memory_kind": peak["kind"],
        "resumed_from": str(resume_from) if resume_from else None,
        "world_size": world,
        "memory_plan": memory_plan, "liger_kernel": liger,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "eval_curve": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in evals],
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    writer({"event": "done", "step": trainer.state.global_step, "total_steps": trainer.state.max_steps,
            "percent": 100.0, "train_loss": metrics["train_loss"], "eval_loss": metrics["eval_loss"]})
    result = {
        "status": "succeeded", "run_dir": str(run_dir), "adapter_dir": str(adapter_dir),
        "base_model": config.base_model, "method": config.method, "metrics": metrics,
        "dataset": {"path": str(ds.path), "sha256": ds.sha256, "format": ds.format,
                    "train_records": len(train_convs), "eval_records": len(eval_convs), "tokens": stats},
        "artifacts": dir_artifacts(adapter_dir, "adapter"),
    }
    record_stage(run_dir, "train", result)
    return result

