"""Train a LoRA or QLoRA adapter with TRL + PEFT: supervised (SFTTrainer), or on preference pairs
(DPOTrainer; ORPOTrainer), the reference model being the base itself with the adapter switched off.

``train`` (in ``run``) reads as its phases: run dir → data → model → memory plan → trainer arguments →
run → adapter and metrics. Each phase has its module here: ``config`` (TrainConfig, planned steps),
``run_dir``, ``inputs``, ``model``, ``memory``, ``methods`` (the trainer per method), ``callbacks``,
``trackers``, ``metrics``; ``launch`` (torchrun ranks) and ``ray_train`` (Ray Train workers) start
several processes. Run dir layout: see ``forge.runs``.
"""

from __future__ import annotations

from forge.train.callbacks import PREFERENCE_LOGS, STOP_FILE, preference_figures
from forge.train.config import (
    DEFAULT_MAX_STEPS,
    MAX_STEPS_ENV,
    METHOD_HELP,
    PREFERENCE_METHODS,
    Method,
    Tracker,
    TrainConfig,
    check_plan,
    planned_steps,
)
from forge.train.launch import launch_distributed, relay_rank0
from forge.train.methods import FORGE_SETS, trainer_arguments
from forge.train.ray_train import launch_ray_train
from forge.train.run import train
from forge.train.run_dir import latest_checkpoint
from forge.train.trackers import TRACKER_MODULES

__all__ = [
    "DEFAULT_MAX_STEPS", "FORGE_SETS", "MAX_STEPS_ENV", "METHOD_HELP", "PREFERENCE_LOGS", "PREFERENCE_METHODS",
    "STOP_FILE", "TRACKER_MODULES", "Method", "TrainConfig", "Tracker", "check_plan", "latest_checkpoint",
    "launch_distributed", "launch_ray_train", "planned_steps", "preference_figures", "relay_rank0", "train",
    "trainer_arguments",
]
