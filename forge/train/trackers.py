"""Experiment trackers (transformers' report_to), checked before the run and kept inside RUN/trackers/."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.train.config import TrainConfig

# The modules each tracker needs (any one of them), and where transformers reads each one's directory.
TRACKER_MODULES = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow",), "trackio": ("trackio",)}


def check_trackers(config: TrainConfig) -> None:
    import importlib.util

    missing = [t for t in config.report_to if not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[t])]
    if missing:
        raise ForgeError(Codes.INVALID_ARGUMENT, f"report_to names {', '.join(missing)}, which is not installed",
                         "pip install 'forge-finetune[trackers]' (tensorboardX, mlflow-skinny), or trackio for "
                         "trackio; or leave report_to empty")


@contextlib.contextmanager
def open_trackers(config: TrainConfig, run_dir: Path):
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
