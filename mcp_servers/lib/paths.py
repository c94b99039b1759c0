"""A job's paths checked again where and when the job runs: its inputs may have changed since the
tool call that submitted it (a file swapped for a link, a directory created under a hub id's name).
The policy itself lives in forge.paths."""

from __future__ import annotations

from forge.paths import check_output, check_path, check_tree, model_ref

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
