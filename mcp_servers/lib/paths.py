"""Path policy: paths from tool inputs are untrusted and must resolve inside an allowed root."""

from __future__ import annotations

import os
from pathlib import Path

from forge.workspace import forge_home
from mcp_servers.lib.errors import ForgeError, JobCodes


def allowed_roots() -> list[Path]:
    roots = [forge_home()]
    extra = os.environ.get("FORGE_ALLOWED_ROOTS", "")
    roots += [Path(p).expanduser().resolve() for p in extra.split(os.pathsep) if p.strip()]
    return roots


def check_path(value: str | Path, what: str = "path") -> Path:
    """Resolve (symlinks followed) and refuse anything outside the allowed roots."""
    resolved = Path(value).expanduser().resolve()
    roots = allowed_roots()
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise ForgeError(JobCodes.PATH_NOT_ALLOWED,
                         f"{what} {value} resolves to {resolved}, outside the allowed roots",
                         f"use a path under {', '.join(str(r) for r in roots)}, or add its root to "
                         "FORGE_ALLOWED_ROOTS (os.pathsep-separated) where the server is configured")
    return resolved


def check_model_ref(value: str, what: str = "model") -> str:
    """A local path must be allowed; a hub id (owner/name, not an existing path) passes through."""
    looks_like_path = value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()
    return str(check_path(value, what)) if looks_like_path else value
