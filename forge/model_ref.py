"""Resolving a model reference (local dir or hub id) with errors a user can act on."""

from __future__ import annotations

import os
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.paths import check_input_dir, check_path, confined, is_hub_id


def resolve_base(ref: str | Path) -> tuple[str, dict | None]:
    """A base model ready to load: a local dir, a hub id, or a GGUF turned (once, cached) into a local dir;
    with what the GGUF was when one was given (its origin), else None."""
    from forge import gguf_import

    path = Path(ref).expanduser()
    if path.is_file() and gguf_import.is_gguf(path):
        model_dir, made = gguf_import.import_gguf(Path(check_path(path, "base_model") if confined() else path))
        return str(model_dir), {**gguf_import.origin(model_dir), "converted_now": made, "model_dir": str(model_dir)}
    return resolve_model(ref), None


def resolve_model(ref: str | Path, code: str = Codes.BASE_MODEL_NOT_FOUND) -> str:
    """A local dir with a config.json, or a hub id when the machine may reach the hub."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ForgeError(code, f"{path} has no config.json, so it is not a Hugging Face model dir",
                             "point at the directory that holds config.json and the weights")
        return str(check_input_dir(path.resolve(), "model"))
    looks_like_hub_id = is_hub_id(str(ref)) and not str(ref).startswith((".", "/", "~"))
    if looks_like_hub_id and os.environ.get("HF_HUB_OFFLINE") != "1":
        return str(ref)
    raise ForgeError(code, f"model {ref} was not found: no such directory"
                     + ("" if looks_like_hub_id else " and it is not a hub id (owner/name)"),
                     "pass a local model dir (with config.json) or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
