"""Where one training run lives: its dir (refused if it already holds a run unless resuming), the checkpoint
to resume from, and the progress writer only rank 0 writes through. Layout: see ``forge.runs``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from forge import disk
from forge.errors import Codes, ForgeError
from forge.paths import check_output
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import PROGRESS_FILE, record_train_config
from forge.train.config import TrainConfig
from forge.train.launch import in_launched_rank, rank_index
from forge.train.trackers import check_trackers


@dataclass
class TrainRun:
    """Where one training run lives and how it reports."""

    dir: Path
    checkpoints: Path
    adapter: Path
    resume_from: Path | None
    writer: ProgressWriter
    rank0: bool


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The highest-numbered checkpoint, in numeric order (checkpoint-1000 after checkpoint-200)."""
    found = []
    for path in Path(checkpoints_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _copied_checkpoint(source: Path, checkpoints_dir: Path) -> Path:
    """``source`` (another run's checkpoint) copied into this run's checkpoints, whole or not at all."""
    import shutil

    from forge.paths import check_input_dir
    from forge.workspace import atomic_dir

    source = check_input_dir(source, "checkpoint")
    if not (source / "trainer_state.json").is_file():
        raise ForgeError(Codes.NO_CHECKPOINT, f"{source} is not a checkpoint (no trainer_state.json)",
                         "pass a checkpoint-N dir a run saved, or resume the run it belongs to")
    target = checkpoints_dir / source.name
    if not target.is_dir():
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True, symlinks=False)
    return target


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer state's, else its name's)."""
    import json

    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(checkpoint.name.rsplit("-", 1)[-1])


def scheduled_steps(trainer) -> int:
    """The optimizer steps the Trainer will run to, as it computes them (max_steps, else epochs over the
    packed batches, a partial accumulation counting as a step)."""
    import math

    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps), 1)
    return math.ceil(per_epoch * args.num_train_epochs)


def refuse_finished_schedule(reached: int, planned: int, what: str) -> None:
    """A resume whose checkpoint already reached the schedule would train nothing and call it a success."""
    if planned > reached:
        return
    raise ForgeError(Codes.SCHEDULE_COMPLETE,
                     f"{what} reached step {reached} and the schedule plans {planned} steps: resuming would train "
                     "nothing",
                     f"to train on, raise the schedule past step {reached}: max_steps={max(2 * reached, reached + 1)} "
                     "(or more num_train_epochs)", details=[f"step_reached: {reached}", f"steps_planned: {planned}"])


def prepare_run(config: TrainConfig, on_progress: ProgressCallback | None, launcher: bool = True) -> TrainRun:
    """The run dir made ready: checkpoint to resume from, room on disk, and the config recorded once per start
    (by the ``launcher``: the process that starts the ranks, or the only one)."""
    run_dir = check_output(config.run_dir(), "run dir")
    checkpoints_dir, adapter_dir = run_dir / "checkpoints", run_dir / "adapter"
    resume_from = None
    if config.resume_from and not in_launched_rank():
        resume_from = _copied_checkpoint(Path(config.resume_from), checkpoints_dir)
    elif config.resume_from:
        resume_from = checkpoints_dir / Path(config.resume_from).name  # rank 0's launcher copied it
    elif config.resume:
        resume_from = latest_checkpoint(checkpoints_dir)
        if resume_from is None:
            raise ForgeError(Codes.NO_CHECKPOINT, f"no checkpoint to resume from in {checkpoints_dir}",
                             "train without resume, or point output_dir at the run that was interrupted")
    elif not in_launched_rank() and (adapter_dir.exists() or latest_checkpoint(checkpoints_dir)):
        raise ForgeError(Codes.OUTPUT_EXISTS, f"run dir {run_dir} already holds a training run",
                         "pass resume=true (--resume) to continue it, or choose another run_name")
    check_trackers(config)
    if config.four_bit:
        from forge.hardware import device_kind

        if device_kind() == "cpu":
            import bitsandbytes  # noqa: F401  (0.50 runs NF4 on CPU too; fail early if it is missing)
    run_dir.mkdir(parents=True, exist_ok=True)
    local_base = Path(config.base_model) if Path(config.base_model).is_dir() else None
    disk.ensure_space(run_dir, disk.train_bytes(local_base, config.lora_r, config.save_total_limit), "training")
    rank0 = rank_index() == 0
    if rank0 and launcher:  # a resume records its settings beside the original, never over it
        record_train_config(run_dir, config.model_dump(mode="json"), resumed=config.resume)
    # Only rank 0 reports: N ranks writing progress would repeat every step N times.
    writer = ProgressWriter(run_dir / PROGRESS_FILE if rank0 else None, on_progress if rank0 else None)
    return TrainRun(run_dir, checkpoints_dir, adapter_dir, resume_from, writer, rank0)
