"""Path policy: paths from tool inputs are untrusted and must resolve inside an allowed root.

The policy itself lives in forge.workspace (the CLI's audit bundles use it too)."""

from __future__ import annotations

from pathlib import Path

from forge.workspace import allowed_roots, check_path

__all__ = ["allowed_roots", "check_path", "check_model_ref"]


def check_model_ref(value: str, what: str = "model") -> str:
    """A local path must be allowed; a hub id (owner/name, not an existing path) passes through."""
    looks_like_path = value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()
    return str(check_path(value, what)) if looks_like_path else value
