"""The workspace cache, file hashes and artifact records, and all-or-nothing writes."""

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
from forge.paths import check_output, forge_home, fresh_temp, open_input


def cache_dir() -> Path:
    path = forge_home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(fh, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while block := fh.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read through a checked descriptor when confined."""
    with open_input(path, "file") as fh:
        return _digest(fh)


def artifact(path: Path, kind: str) -> dict:
    """What a user needs to trust a file later: where it is, how big, and its sha256 — size and hash
    taken from the same open file."""
    with open_input(path, f"{kind} file") as fh:
        size = os.fstat(fh.fileno()).st_size
        return {"kind": kind, "path": str(path), "bytes": size, "sha256": _digest(fh)}


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
    final = check_output(final)
    refuse_existing(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs get the mode the umask gives
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    path = check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh, tmp = fresh_temp(path.parent, f".{path.name}.")
    try:
        with fh:
            fh.write(text.encode("utf-8"))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the umask decides
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
