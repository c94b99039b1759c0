"""The run dir: where a fine-tune's stages leave their outputs and their records.

Layout of ``$FORGE_HOME/runs/<run name>/``::

    train_config.json        the resolved training config
    progress.jsonl           every stage's progress events, appended (train, merge, quantize)
    checkpoints/checkpoint-N
    adapter/                 the LoRA adapter, tokenizer and chat template
    merged/                  the merged model
    gguf/                    <name>-f16.gguf, <name>-Q4_K_M.gguf, ..., Modelfile
                             (a LoRA alone: <name>-lora-f16.gguf, <base>-f16.gguf, Modelfile.adapter)
    stages/<stage>.json      each stage's result, read later by seals and agents

Stages write their records here; ``forge.seal`` reads them. Nothing in this module imports a stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from forge.paths import forge_home, read_text
from forge.workspace import atomic_write_text

# The one list of Forge's stages, in the order a pipeline runs them.
STAGES = ("train", "merge", "quantize", "evaluate", "modelfile", "seal")
# Stages that leave a record in the run dir (the seal records itself elsewhere).
# lora_gguf: a LoRA alone as a GGUF (forge lora-gguf); sweep: the sweep this run won (forge sweep)
RECORDED_STAGES = (*STAGES[:-1], "lora_gguf", "sweep")
# Files a seal hashes, by artifact kind, relative to the run dir.
ARTIFACT_GLOBS = {"adapter": "adapter/*", "merged": "merged/*", "gguf": "gguf/*.gguf", "imatrix": "gguf/*.imatrix.gguf",
                  "modelfile": "gguf/Modelfile*"}
IMATRIX_SUFFIX = ".imatrix.gguf"  # an importance matrix: GGUF-formatted, not a model
PROGRESS_FILE = "progress.jsonl"
STAGES_DIR = "stages"
TRAIN_CONFIG_FILE = "train_config.json"


class Outcome:
    """The status a stage's result carries (the job system's statuses use the same words)."""

    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"


def runs_dir() -> Path:
    return forge_home() / "runs"


def record_stage(run_dir: Path, stage: str, result: dict) -> None:
    """Keep a stage's result in the run dir, so a seal (or an agent) can read it later."""
    text = json.dumps(result, indent=2, default=str) + "\n"
    atomic_write_text(Path(run_dir) / STAGES_DIR / f"{stage}.json", text)


def find_run_dir(path: Path) -> Path | None:
    """The run dir an output belongs to: the nearest of its first three parents (or itself) that
    holds train_config.json or stages/."""
    path = Path(path).resolve()
    for candidate in [path, *list(path.parents)[:3]]:
        if (candidate / TRAIN_CONFIG_FILE).is_file() or (candidate / STAGES_DIR).is_dir():
            return candidate
    return None


def record_stage_near(output: Path, stage: str, result: dict) -> Path | None:
    """Record a stage whose output lies inside a run dir; outputs elsewhere keep no record."""
    run_dir = find_run_dir(Path(output).parent)
    if run_dir is not None:
        record_stage(run_dir, stage, result)
    return run_dir


def load_stages(run_dir: Path) -> dict[str, dict]:
    """The stage records of a run dir, in stage order."""
    stages = {}
    for stage in RECORDED_STAGES:
        path = Path(run_dir) / STAGES_DIR / f"{stage}.json"
        if path.is_file():
            stages[stage] = json.loads(read_text(path, f"{stage} record"))
    return stages


def progress_path(output: Path) -> Path:
    """Where a stage writing ``output`` appends its progress: its run dir's progress.jsonl, or a
    progress.jsonl beside the output when it is not inside a run."""
    output = Path(output)
    run_dir = find_run_dir(output.parent)
    return (run_dir or output.parent) / PROGRESS_FILE


def progress_warnings(run_dir: Path) -> list[str]:
    """The warning events every stage of a run wrote to its progress files."""
    found = []
    for path in sorted(Path(run_dir).rglob(PROGRESS_FILE)):
        for line in read_text(path, "progress file").splitlines():
            if '"warning"' not in line:
                continue
            event = json.loads(line)
            if event.get("event") == "warning":
                found.append(event.get("message", ""))
    return found


def latest_run() -> Path | None:
    """The run dir whose stage records changed last, or None when there is none."""
    runs = [d for d in runs_dir().glob("*") if (d / STAGES_DIR).is_dir()]
    return max(runs, key=lambda d: (d / STAGES_DIR).stat().st_mtime) if runs else None
