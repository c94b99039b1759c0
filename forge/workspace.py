"""Where Forge keeps things (``FORGE_HOME``), file hashes, and all-or-nothing writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from forge.errors import Codes, ForgeError


def forge_home() -> Path:
    """The workspace root: ``$FORGE_HOME`` or ``~/.forge``. Created on first use."""
    home = Path(os.environ.get("FORGE_HOME") or Path.home() / ".forge").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def allowed_roots() -> list[Path]:
    """FORGE_HOME plus the roots listed in FORGE_ALLOWED_ROOTS (os.pathsep-separated)."""
    roots = [forge_home()]
    extra = os.environ.get("FORGE_ALLOWED_ROOTS", "")
    roots += [Path(p).expanduser().resolve() for p in extra.split(os.pathsep) if p.strip()]
    return roots


def check_path(value: str | Path, what: str = "path") -> Path:
    """Resolve (symlinks followed) and refuse anything outside the allowed roots."""
    resolved = Path(value).expanduser().resolve()
    roots = allowed_roots()
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise ForgeError(Codes.PATH_NOT_ALLOWED,
                         f"{what} {value} resolves to {resolved}, outside the allowed roots",
                         f"use a path under {', '.join(str(r) for r in roots)}, or add its root to "
                         "FORGE_ALLOWED_ROOTS (os.pathsep-separated) where Forge runs")
    return resolved


def cache_dir() -> Path:
    path = forge_home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def artifact(path: Path, kind: str) -> dict:
    """What a user needs to trust a file later: where it is, how big, and its sha256."""
    path = Path(path)
    return {"kind": kind, "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def dir_artifacts(directory: Path, kind: str) -> list[dict]:
    return [artifact(p, kind) for p in sorted(Path(directory).rglob("*")) if p.is_file()]


def refuse_existing(path: Path, force: bool) -> None:
    if Path(path).exists() and not force:
        raise ForgeError(
            Codes.OUTPUT_EXISTS,
            f"{path} already exists",
            "choose another output name, or pass --force (force=true) to replace it",
        )


@contextlib.contextmanager
def atomic_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success it replaces ``final`` in one rename.

    On any error the temp dir is removed and whatever was at ``final`` stays untouched.
    """
    final = Path(final)
    refuse_existing(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; outputs are ordinary directories
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # Move the old output aside first so that a failure here never leaves neither.
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
