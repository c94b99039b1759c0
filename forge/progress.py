"""Progress as JSON lines in the run dir, plus an optional callback (the MCP worker hooks in here)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from forge.paths import open_output

ProgressCallback = Callable[[dict], None]


class ProgressWriter:
    """Appends one JSON object per event to ``path`` and forwards it to ``callback``."""

    def __init__(self, path: Path | None, callback: ProgressCallback | None = None):
        self.path = Path(path) if path else None
        self.callback = callback
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: dict) -> None:
        event = {"ts": round(time.time(), 3), **event}
        if self.path:
            with open_output(self.path, "progress file", append=True) as fh:  # never through a link
                fh.write((json.dumps(event, default=str) + "\n").encode("utf-8"))
        if self.callback:
            self.callback(event)

    def stage(self, stage: str, **extra) -> None:
        self({"event": "stage", "stage": stage, **extra})


def read_progress(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def quiet_libraries() -> None:
    """Progress bars and chatter of the libraries off: progress.jsonl and job events replace them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
