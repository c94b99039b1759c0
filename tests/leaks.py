"""What a test leaves behind: processes it started that still run (or were never reaped), and threads
it started that never ended. conftest.py checks after every test's teardown and fails that test with
the list; a leaked worker would otherwise fail some later, innocent test (a ResourceWarning raised at
its setup) or load the machine for the rest of the run.

A process is the suite's when it descends from pytest or carries the run's marker in its environment
(so a worker orphaned by a server subprocess that exited is still found). What a module- or
session-scoped fixture starts, and everything that descends from it, belongs to that fixture and is
left to its teardown."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

MARKER_ENV = "FORGE_TEST_RUN"
GRACE_S = 60.0  # a process killed or a thread told to stop at the very end of a test may take a moment


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    cmdline: str

    def __str__(self) -> str:
        zombie = " (exited, never reaped)" if self.state == "Z" else ""
        return f"pid {self.pid}{zombie}: {self.cmdline[:200]}"


def mark_run() -> str:
    """Give this pytest process, and so every process it starts, the run's marker."""
    return os.environ.setdefault(MARKER_ENV, uuid.uuid4().hex)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:  # the process ended between the listing and the read, or is not ours to read
        return b""


def _proc(pid: int) -> Proc | None:
    stat = _read(f"/proc/{pid}/stat").decode("utf-8", "replace")
    if not stat:
        return None
    # comm may hold spaces and parentheses: the fields after it follow the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode("utf-8", "replace").strip()
    return Proc(pid, int(fields[1]), fields[0], cmdline or stat[stat.find("(") + 1:stat.rfind(")")])


def suite_processes() -> dict[int, Proc]:
    """Every live process of this test run but pytest itself, and every child of pytest not yet reaped."""
    me, marker = os.getpid(), f"{MARKER_ENV}={os.environ[MARKER_ENV]}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        proc = _proc(int(entry))
        if proc is None:
            continue
        if proc.ppid == me or (proc.state != "Z" and marker in _read(f"/proc/{entry}/environ").split(b"\0")):
            found[proc.pid] = proc
    return found


def _owned_by(proc: Proc, owners: set[int], table: dict[int, Proc]) -> bool:
    """Whether ``proc`` is one of ``owners`` or descends from one (through the processes in ``table``)."""
    seen = set()
    while proc is not None and proc.pid not in seen:
        if proc.pid in owners:
            return True
        seen.add(proc.pid)
        proc = (table.get(proc.ppid) or _proc(proc.ppid)) if proc.ppid > 1 else None
    return False


@dataclass
class Snapshot:
    pids: set[int]
    threads: set[int]


@dataclass
class Ledger:
    """Processes and threads that wider-scoped fixtures own; the check leaves them alone."""

    pids: set[int] = field(default_factory=set)
    threads: set[int] = field(default_factory=set)

    def take(self) -> Snapshot:
        return Snapshot(set(suite_processes()), {t.ident for t in threading.enumerate()})

    def own_since(self, before: Snapshot) -> None:
        """A fixture wider than one test was just set up: what appeared meanwhile is its own."""
        after = self.take()
        self.pids |= after.pids - before.pids
        self.threads |= after.threads - before.threads

    def leftovers(self, before: Snapshot) -> tuple[list[Proc], list[threading.Thread]]:
        table = suite_processes()
        procs = [p for pid, p in sorted(table.items())
                 if pid not in before.pids and not _owned_by(p, self.pids, table)]
        threads = [t for t in threading.enumerate()
                   if t.is_alive() and t.ident not in before.threads and t.ident not in self.threads]
        return procs, threads

    def check(self, before: Snapshot) -> list[str]:
        """What the test left behind, after a grace for what is already ending; each leftover is then
        ended (processes killed and reaped) so that the next test starts clean."""
        deadline = time.monotonic() + GRACE_S
        while True:
            procs, threads = self.leftovers(before)
            if not (procs or threads) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for proc in procs:
            _end(proc)
        return [f"process {p}" for p in procs] + [f"thread {t.name!r} (daemon={t.daemon})" for t in threads]


def _end(proc: Proc) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.ppid == os.getpid():
        try:
            os.waitpid(proc.pid, 0)
        except ChildProcessError:
            pass
