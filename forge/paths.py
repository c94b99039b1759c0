"""The path policy: what Forge may read and write when a path comes from someone else.

Everything a job reads or writes must resolve (symlinks followed) inside ``FORGE_HOME`` or a root
listed in ``FORGE_ALLOWED_ROOTS``, at the moment it is used:

- ``check_path`` resolves and checks a path; ``check_name`` accepts only plain names for outputs
  (no separators, no ``..``);
- ``open_checked`` opens a file first and checks where the opened file really is, so a link swapped
  in between a check and the read cannot redirect it;
- ``check_tree`` refuses a directory holding any entry that leads outside the roots;
- ``model_ref`` tells a local model dir from a hub id, and takes a hub id only in hub-id form.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from forge.errors import Codes, ForgeError

MAX_PATH_CHARS = 4096
MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux file systems
MAX_NAME_CHARS = 100
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


# Confined: inputs come from someone else (an MCP tool call, or a job it started), so reads and
# writes are held to the roots. A person running `forge` in a terminal is not confined.
_CONFINED = contextvars.ContextVar("forge_confined", default=False)
CONFINED_ENV = "FORGE_CONFINED"


def confined() -> bool:
    return _CONFINED.get() or os.environ.get(CONFINED_ENV) == "1"


@contextlib.contextmanager
def confinement() -> Iterator[None]:
    """Hold what runs inside (in this context, threads started from it included) to the roots."""
    token = _CONFINED.set(True)
    try:
        yield
    finally:
        _CONFINED.reset(token)


def forge_home() -> Path:
    """The workspace root: ``$FORGE_HOME`` or ``~/.forge``, created owner-only on first use."""
    home = Path(os.environ.get("FORGE_HOME") or Path.home() / ".forge").expanduser().resolve()
    if not home.is_dir():
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def allowed_roots() -> list[Path]:
    """FORGE_HOME plus the roots listed in FORGE_ALLOWED_ROOTS (os.pathsep-separated)."""
    roots = [forge_home()]
    extra = os.environ.get("FORGE_ALLOWED_ROOTS", "")
    roots += [Path(p).expanduser().resolve() for p in extra.split(os.pathsep) if p.strip()]
    return roots


def _shown(value: object, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _refuse(what: str, value: object, resolved: Path) -> ForgeError:
    roots = allowed_roots()
    return ForgeError(Codes.PATH_NOT_ALLOWED,
                      f"{what} {_shown(value)} resolves to {_shown(resolved)}, outside the allowed roots",
                      f"use a path under {', '.join(str(r) for r in roots)}, or add its root to "
                      "FORGE_ALLOWED_ROOTS (os.pathsep-separated) where Forge runs",
                      details=[str(resolved)])


def inside_roots(resolved: Path) -> bool:
    return any(resolved.is_relative_to(root) for root in allowed_roots())


def _invalid(what: str, value: object, problem: str, hint: str) -> ForgeError:
    return ForgeError(Codes.INVALID_ARGUMENT, f"{what} {_shown(value)!r}: {problem}", hint)


def check_path(value: str | Path, what: str = "path") -> Path:
    """Resolve (symlinks followed) and refuse anything outside the allowed roots or not a path."""
    text = str(value)
    if "\x00" in text:
        raise _invalid(what, value, "contains a NUL byte", "pass a plain file-system path")
    if not text or len(text) > MAX_PATH_CHARS:
        raise _invalid(what, value, f"must be 1 to {MAX_PATH_CHARS} characters", "pass a shorter path")
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES for part in Path(text).parts):
        raise _invalid(what, value, f"has a component longer than {MAX_COMPONENT_BYTES} bytes",
                       "no file system holds such a name: pass the path of an existing file or directory")
    try:
        resolved = Path(text).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, an unreadable component
        reason = getattr(exc, "strerror", None) or str(exc)
        raise _invalid(what, value, f"cannot be resolved ({exc.__class__.__name__}: {reason})",
                       "pass an existing path, without symlink loops") from None
    if not inside_roots(resolved):
        raise _refuse(what, value, resolved)
    return resolved


def check_name(value: str, what: str = "name") -> str:
    """An output name: letters, digits, '.', '_' and '-', starting with a letter or digit — never a path."""
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS or not NAME.fullmatch(value) or ".." in value:
        raise _invalid(what, value, f"is not a plain name (letters, digits, '.', '_', '-'; at most "
                                    f"{MAX_NAME_CHARS} characters; no '/' or '..')",
                       "pass a name such as my-run-1; Forge chooses the directory it goes in")
    return value


def real_path_of(fd: int) -> Path:
    """Where an open file descriptor really points (Linux: /proc/self/fd)."""
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def open_checked(path: str | Path, what: str = "file") -> BinaryIO:
    """Open a regular file for reading, then refuse it unless the opened file lies inside the roots.

    Checking the descriptor, not the name, means a link swapped in after an earlier check (or between
    two reads) cannot point the read somewhere else."""
    check_path(path, what)  # a clear error for the plain cases, before touching the file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ForgeError(Codes.FILE_NOT_FOUND, f"{what} {_shown(path)} does not exist",
                         "pass the path of an existing file") from None
    except OSError as exc:
        raise _invalid(what, path, f"cannot be opened ({exc.strerror})", "pass a readable file") from None
    try:
        real = real_path_of(fd)
        if not inside_roots(real):
            raise _refuse(what, path, real)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _invalid(what, path, "is not a regular file", "pass a file, not a directory or device")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_tree(directory: str | Path, what: str = "directory") -> Path:
    """A directory none of whose entries (files or links, at any depth) resolves outside the roots."""
    root = check_path(directory, what)
    escaping = []
    for current, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            entry = Path(current) / name
            if entry.is_symlink() and not inside_roots(entry.resolve()):
                escaping.append(str(entry))
    if escaping:
        raise ForgeError(Codes.PATH_NOT_ALLOWED,
                         f"{what} {root} holds {len(escaping)} link(s) leading outside the allowed roots: "
                         + ", ".join(escaping[:5]),
                         "remove the links, or copy the files they point at into the directory",
                         details=escaping)
    return root


def is_hub_id(value: str) -> bool:
    return bool(HUB_ID.fullmatch(value)) and ".." not in value


def model_ref(value: str, what: str = "model") -> str:
    """A local model path (checked; returned resolved) or a hub id (``owner/name``, returned as is).

    Anything that looks like a path is a path, and must exist inside the roots; a hub id is taken
    only in hub-id form and only when no such path exists, so a directory created later under that
    name is never mistaken for it."""
    text = str(value)
    looks_like_path = text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1
    if not looks_like_path and is_hub_id(text) and not Path(text).exists():
        return text
    resolved = check_path(text, what)
    if not resolved.exists():
        raise ForgeError(Codes.MODEL_NOT_FOUND, f"{what} {_shown(value)} is neither an existing path nor a hub id",
                         "pass a local model dir under an allowed root, or a hub id such as "
                         "Qwen/Qwen2.5-0.5B-Instruct")
    return str(resolved)


def open_input(path: str | Path, what: str = "file") -> BinaryIO:
    """A file to read: checked through its descriptor when confined, opened as it is otherwise."""
    if confined():
        return open_checked(path, what)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ForgeError(Codes.FILE_NOT_FOUND, f"{what} {_shown(path)} does not exist",
                         "pass the path of an existing file") from None
    except OSError as exc:
        raise _invalid(what, path, f"cannot be opened ({exc.strerror})", "pass a readable file") from None


def checked(path: str | Path, what: str = "path") -> Path:
    """A path read from a record (a stage's result, a config): held to the roots when confined, like an
    argument, since whoever could write the record chose it."""
    return check_path(path, what) if confined() else Path(path)


def check_input_dir(directory: str | Path, what: str = "directory") -> Path:
    """A directory to read from: no entry may lead outside the roots when confined."""
    return check_tree(directory, what) if confined() else Path(directory)


def check_output(path: str | Path, what: str = "output") -> Path:
    """Where to write: when confined, its parent must resolve inside the roots and the path itself
    must not be a link (writing through it would land wherever it points)."""
    path = Path(path)
    if not confined():
        return path
    parent = check_path(path.parent, f"{what}'s directory")
    if path.is_symlink():
        raise _refuse(what, path, path.resolve())
    return parent / path.name


def read_text(path: str | Path, what: str = "file") -> str:
    """A text file's content, read through a checked descriptor when confined."""
    with open_input(path, what) as fh:
        return fh.read().decode("utf-8")


def open_output(path: str | Path, what: str = "output", append: bool = False, exclusive: bool = False) -> BinaryIO:
    """A file to write. Never through a link: the final name is opened with O_NOFOLLOW (and O_EXCL for
    a fresh temp file), and when confined the directory must resolve inside the roots."""
    path = check_output(path, what)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_TRUNC
    if exclusive:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(what, path, Path(path).resolve()) from None
        raise
    return os.fdopen(fd, "ab" if append else "wb")


def fresh_temp(directory: str | Path, prefix: str) -> tuple[BinaryIO, Path]:
    """A new, unguessable temp file in ``directory`` (created exclusively: nothing planted there is used)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=check_output(Path(directory) / "x").parent)
    return os.fdopen(fd, "wb"), Path(name)
