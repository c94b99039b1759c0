"""What the Trainer calls back into: progress every step, the stop request (SIGTERM or the run's STOP file)
all ranks agree on, and TRL's preference reward logs as Forge's progress fields."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from forge.progress import ProgressWriter
from forge.train.launch import in_launched_rank

STOP_FILE = "STOP"  # written into the run dir to stop ranks that no signal reaches (Ray Train workers)


class StopFlag:
    """Set by SIGTERM, or by a STOP file in the run dir; the callback then saves a checkpoint and ends
    training cleanly. With several ranks, all of them agree on the step they stop at."""

    def __init__(self, run_dir: Path | None = None):
        self.requested = False
        self.stop_file = run_dir / STOP_FILE if run_dir else None
        self._previous = None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))

    def restore(self) -> None:
        """The SIGTERM handler from before training (a worker's, which unwinds the job): a stop that comes after
        training (while a sweep evaluates, or a pipeline merges) is not lost on a flag no one reads."""
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def check(self, device) -> bool:
        if self.stop_file is not None and self.stop_file.exists():
            self.requested = True
        if in_launched_rank():
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank stopping alone would hang the others
            self.requested = bool(flag.item())
        return self.requested


def progress_callback(writer: ProgressWriter, stop: StopFlag, counter: dict):
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
