"""A job's paths checked again where and when the job runs: its inputs may have changed since the
tool call that submitted it (a file swapped for a link, a directory created under a hub id's name).
The policy itself lives in forge.paths.
Also where a job's own files go and where its outputs will be, both known when it is submitted."""

from __future__ import annotations

from pathlib import Path

from forge.paths import check_output, check_path, check_tree, model_ref
from forge.runs import find_run_dir, runs_dir

# Which params of a job name what: files read, directories read (every entry checked), models
# (a path or a hub id), and outputs written.
FILES = ("dataset", "eval_dataset")
DIRS = ("adapter_dir", "model_dir")
MODELS = ("base_model",)
OUTPUTS = ("output_dir",)


def recheck(params: dict) -> None:
    """Raise path_not_allowed if anything a job is about to read or write now leads outside the roots."""
    for key in FILES:
        if params.get(key):
            check_path(params[key], key)
    for key in DIRS:
        if params.get(key):
            check_tree(params[key], key)
    for key in MODELS:
        if params.get(key):
            model_ref(params[key], key)
    for key in OUTPUTS:
        if params.get(key):
            check_output(params[key], key)
    source = params.get("source")
    if source:
        path = check_path(source, "source")
        if path.is_dir():
            check_tree(path, "source")
    if isinstance(params.get("train"), dict):  # a pipeline's train overrides hold no paths, but check anyway
        recheck({k: v for k, v in params["train"].items() if k in (*FILES, *DIRS, *MODELS, *OUTPUTS)})


def job_dir(home: Path, job_id: str) -> Path:
    """A job's own dir, ``runs/<job id>/``: its log (job.log), its working dir, and on Ray its channel and kill
    file. A train job that was not named writes its run there too."""
    return Path(home) / runs_dir().name / job_id


def planned_run_dir(kind: str, params: dict, own_dir: Path) -> Path:
    """Where a job's outputs go, known at submission: the run dir it writes into. A merge, quantize, LoRA GGUF
    or publish of files inside a run works in that run's dir; of files outside one, where its outputs land
    (the merged dir, the gguf dir beside the model, the source). ``own_dir`` is the job's own dir."""
    if params.get("output_dir") and kind in ("train", "pipeline", "sweep"):
        return Path(params["output_dir"])
    if kind == "evaluate":
        return Path(params["run_dir"])
    if kind == "merge":
        adapter = Path(params["adapter_dir"])
        output = Path(params.get("output_dir") or adapter.parent / "merged")
        return find_run_dir(adapter) or output
    if kind == "quantize":
        model = Path(params["model_dir"])
        return find_run_dir(model) or Path(params.get("output_dir") or model.resolve().parent / "gguf")
    if kind == "lora_gguf":
        adapter = Path(params["adapter_dir"])
        return find_run_dir(adapter) or adapter.parent
    if kind == "publish":
        source = Path(params["source"])
        return find_run_dir(source) or (source if source.is_dir() else source.parent)
    return own_dir
