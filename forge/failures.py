"""Any exception met while a stage ran, as the ForgeError an agent can act on.

It stands one floor above ``errors`` (the codes) and ``disk`` (what a full disk looks like), so that
neither of those needs the other."""

from __future__ import annotations

from pathlib import Path

from forge import disk
from forge.errors import Codes, ForgeError


def error_from(exc: BaseException, near: object = None) -> ForgeError:
    """Any exception as the ForgeError an agent can act on: ours as they are, a full disk as disk_full
    (``near``: a path on the disk the work was writing to), memory exhaustion as out_of_memory, and
    anything else as internal_error (its traceback belongs in a log, not in the reply)."""
    where = Path(near) if near else None
    if isinstance(exc, ForgeError) and exc.code not in _MAYBE_DISK:
        return exc
    if disk.is_disk_full(exc, where):
        filename = getattr(exc, "filename", None)
        return disk.disk_full(Path(filename).parent if filename else where or Path.cwd(), None, "writing")
    if isinstance(exc, ForgeError):
        return exc
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return ForgeError(Codes.OUT_OF_MEMORY, f"{type(exc).__name__}: {exc}"[:500],
                          "lower the batch size or max_length, use qlora, or free memory; resume continues",
                          retryable=True)
    return ForgeError(Codes.INTERNAL, f"{type(exc).__name__}: {exc}"[:500],
                      "see the log for the traceback; retry, or report it")


# Failures a full disk also causes (the library that hit it said something else).
_MAYBE_DISK = {Codes.CONVERSION_FAILED, Codes.QUANTIZATION_FAILED, Codes.INTERNAL}
