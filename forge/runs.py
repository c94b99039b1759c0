"""The run dir: where a fine-tune's stages leave their outputs and their records.

Layout of ``$FORGE_HOME/runs/<run name>/``::

    train_config.json        the resolved training config
    progress.jsonl           every stage's progress events, appended (train, merge, quantize)
    checkpoints/checkpoint-N
    adapter/                 the LoRA adapter, tokenizer and chat template
    merged/                  the merged model
    gguf/                    <name>-f16.gguf, <name>-Q4_K_M.gguf, ..., Modelfile
                             (a LoRA alone: <name>-lora-f16.gguf, <base>-f16.gguf, Modelfile.adapter)
    train_config.resume-N.json  what the Nth resume ran with (the original is never written over)
    stages/<stage>.json      each stage's latest result, read later by seals and agents
    stages/<stage>-N.json    every result a stage ever recorded (a second evaluate keeps the first)

Stages write their records here; ``forge.seal`` reads them. Nothing in this module imports a stage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from forge.paths import forge_home, open_output, read_text
from forge.workspace import atomic_write_json, atomic_write_text

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
RESUME_CONFIG_STEM = "train_config.resume"


class Outcome:
    """The status a stage's result carries (the job system's statuses use the same words)."""

    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"


def runs_dir() -> Path:
    return forge_home() / "runs"


def _numbered(directory: Path, stem: str, suffix: str) -> list[tuple[int, Path]]:
    """The ``<stem>-<n><suffix>`` files in ``directory`` with their numbers, lowest first."""
    pattern = re.compile(rf"{re.escape(stem)}-(\d+){re.escape(suffix)}")
    found = ((m, p) for p in directory.glob(f"{stem}-*{suffix}") if (m := pattern.fullmatch(p.name)))
    return sorted((int(m.group(1)), p) for m, p in found)


def _reserve(directory: Path, stem: str, suffix: str) -> Path:
    """The next free ``<stem>-<n><suffix>`` in ``directory``, created empty with O_EXCL: two writers at one
    moment get two numbers, and no record is ever written over."""
    number = max((n for n, _ in _numbered(directory, stem, suffix)), default=0) + 1
    while True:
        path = directory / f"{stem}-{number}{suffix}"
        try:
            with open_output(path, "record", exclusive=True):  # confined, never through a link
                return path
        except FileExistsError:
            number += 1


def record_stage(run_dir: Path, stage: str, result: dict) -> str:
    """Keep a stage's result in the run dir, so a seal (or an agent) can read it later: a record of its own
    (``stages/<stage>-<n>.json``, never written over) and the stage's latest (``stages/<stage>.json``). The
    result gains ``record``, the record's path in the run dir, which it returns."""
    stages = Path(run_dir) / STAGES_DIR
    latest = _latest(stages / f"{stage}.json")
    if latest.get("record") and {k: v for k, v in latest.items() if k != "record"} == _as_json(result):
        result["record"] = latest["record"]  # the same result again (a Modelfile kept as it was): its record stands
        return result["record"]
    stages.mkdir(parents=True, exist_ok=True)
    if latest and not latest.get("record"):  # a run recorded before records were numbered: keep its one
        kept = _reserve(stages, stage, ".json")
        atomic_write_text(kept, json.dumps({**latest, "record": f"{STAGES_DIR}/{kept.name}"}, indent=2) + "\n")
    path = _reserve(stages, stage, ".json")
    result["record"] = f"{STAGES_DIR}/{path.name}"
    text = json.dumps(result, indent=2, default=str) + "\n"
    atomic_write_text(path, text)  # replaces the empty file reserved for it
    atomic_write_text(stages / f"{stage}.json", text)
    return result["record"]


def update_record(run_dir: Path, stage: str, result: dict) -> str:
    """Complete the record ``result`` came from (its ``record``) with what was learned since: a Ray Train run's
    launcher adds where each rank finished to rank 0's record, so one training keeps one record."""
    if not result.get("record"):
        return record_stage(run_dir, stage, result)
    text = json.dumps(result, indent=2, default=str) + "\n"
    atomic_write_text(Path(run_dir) / result["record"], text)
    atomic_write_text(Path(run_dir) / STAGES_DIR / f"{stage}.json", text)
    return result["record"]


def _latest(path: Path) -> dict:
    try:
        return json.loads(read_text(path, "stage record")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _as_json(result: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in result.items() if k != "record"}, default=str))


def record_train_config(run_dir: Path, config: dict, resumed: bool) -> Path:
    """Record the config a training start runs with. The first is ``train_config.json``; a resume records its
    own beside it (``train_config.resume-<n>.json``), so the original settings are never written over."""
    first = Path(run_dir) / TRAIN_CONFIG_FILE
    path = _reserve(Path(run_dir), RESUME_CONFIG_STEM, ".json") if resumed and first.is_file() else first
    atomic_write_json(path, config)
    return path


def resume_configs(run_dir: Path) -> list[Path]:
    """The configs the run's resumes recorded, oldest first."""
    return [p for _, p in _numbered(Path(run_dir), RESUME_CONFIG_STEM, ".json") if p.stat().st_size]


def train_config_in_effect(run_dir: Path) -> Path:
    """The config the run's adapter was last trained with: its newest resume's, else the first."""
    resumes = resume_configs(run_dir)
    return resumes[-1] if resumes else Path(run_dir) / TRAIN_CONFIG_FILE


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
