"""Train a LoRA or QLoRA adapter with TRL + PEFT: supervised (SFTTrainer), or on preference pairs
(DPOTrainer; ORPOTrainer), the reference model being the base itself with the adapter switched off.

``train`` (in ``run``) reads as its phases: run dir → data → model → memory plan → trainer arguments →
run → adapter and metrics. Each phase has its module here: ``config`` (TrainConfig, planned steps),
``run_dir``, ``inputs``, ``model``, ``memory``, ``methods`` (the trainer per method), ``callbacks``,
``trackers``, ``metrics``; ``launch`` (torchrun ranks) and ``ray_train`` (Ray Train workers) start
several processes. Run dir layout: see ``forge.runs``.
"""

from __future__ import annotations

from forge.train.config import METHOD_HELP, Method, TrainConfig, check_plan, training_records, with_defaults
from forge.train.run import train
from forge.train.run_dir import latest_checkpoint

__all__ = ["METHOD_HELP", "Method", "TrainConfig", "check_plan", "latest_checkpoint", "train", "training_records",
           "with_defaults"]
