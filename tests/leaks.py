"""What a test leaves behind: processes it started that still run (or were never reaped), and threads
it started that never ended. conftest.py checks after every test's teardown and fails that test with
the list; a leaked worker would otherwise fail some later, innocent test (a ResourceWarning raised at
its setup) or load the machine for the rest of the run.

A process is the suite's when it descends from pytest or carries the run's marker in its environment
(so a worker orphaned by a server subprocess that exited is still found). Processes are known by pid
and start time, threads by their objects, so a reused pid or thread id is never mistaken for another.
What a module- or session-scoped fixture starts, and everything that descends from it, belongs to that
fixture and is left to its teardown."""

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
    started: int  # clock ticks after boot: with the pid, names one process even once the pid is reused
    cmdline: str

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.started

    def __str__(self) -> str:
        zombie = " (exited, never reaped)" if self.state == "Z" else ""
        return f"pid {self.pid}{zombie}: {self.cmdline[:200]}"


def mark_run() -> str:
    """Give this pytest process, and so every process it starts, a marker of its own run."""
    os.environ[MARKER_ENV] = uuid.uuid4().hex
    return os.environ[MARKER_ENV]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:  # the process ended between the listing and the read, or is not ours to read
        return b""


def read_proc(pid: int) -> Proc | None:
    stat = _read(f"/proc/{pid}/stat").decode("utf-8", "replace")
    if not stat:
        return None
    # comm may hold spaces and parentheses: the fields after it follow the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode("utf-8", "replace").strip()
    return Proc(pid, int(fields[1]), fields[0], int(fields[19]), cmdline or stat[stat.find("(") + 1:stat.rfind(")")])


def _all_processes() -> dict[int, Proc]:
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := read_proc(int(entry))) is not None:
            procs[proc.pid] = proc
    return procs


def suite_processes() -> dict[int, Proc]:
    """Every process of this test run but pytest itself: its descendants (reaped or not), and live
    processes elsewhere that carry the run's marker."""
    me, marker = os.getpid(), f"{MARKER_ENV}={os.environ[MARKER_ENV]}".encode()
    table = _all_processes()
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found, stack = {}, list(children.get(me, []))
    while stack:
        pid = stack.pop()
        if pid not in found and pid in table:
            found[pid] = table[pid]
            stack.extend(children.get(pid, []))
    for pid, proc in table.items():
        if pid not in found and pid != me and proc.state != "Z" and \
                marker in _read(f"/proc/{pid}/environ").split(b"\0"):
            found[pid] = proc
    return found


def _owned_by(proc: Proc, owners: set[tuple[int, int]], table: dict[int, Proc]) -> bool:
    """Whether ``proc`` is one of ``owners`` or descends from one."""
    seen = set()
    while proc is not None and proc.pid not in seen:
        if proc.key in owners:
            return True
        seen.add(proc.pid)
        proc = (table.get(proc.ppid) or read_proc(proc.ppid)) if proc.ppid > 1 else None
    return False


def live_threads() -> set[threading.Thread]:
    # A _DummyThread stands for a thread Python did not start (a native one that called into Python):
    # it reports itself alive forever, and nothing a test can join.
    return {t for t in threading.enumerate() if t.is_alive() and not isinstance(t, threading._DummyThread)}


@dataclass
class Snapshot:
    procs: set[tuple[int, int]]
    threads: set[threading.Thread]


@dataclass
class Ledger:
    """Processes and threads that wider-scoped fixtures own; the check leaves them alone."""

    procs: set[tuple[int, int]] = field(default_factory=set)
    threads: set[threading.Thread] = field(default_factory=set)

    def take(self) -> Snapshot:
        return Snapshot({p.key for p in suite_processes().values()}, live_threads())

    def own_since(self, before: Snapshot) -> None:
        """A fixture wider than one test was just set up: what appeared meanwhile is its own."""
        after = self.take()
        self.procs |= after.procs - before.procs
        self.threads |= after.threads - before.threads

    def leftovers(self, before: Snapshot) -> tuple[list[Proc], list[threading.Thread]]:
        table = suite_processes()
        self.procs &= {p.key for p in table.values()}  # an owner that ended owns nothing any more
        self.threads = {t for t in self.threads if t.is_alive()}
        procs = [p for _, p in sorted(table.items())
                 if p.key not in before.procs and not _owned_by(p, self.procs, table)]
        threads = sorted(live_threads() - before.threads - self.threads, key=lambda t: t.name)
        return procs, threads

    def check(self, before: Snapshot) -> list[str]:
        """What the test left behind, after a grace for what is already ending. Leftover processes are
        then killed (and reaped, where pytest is their parent) so that the next test starts clean; a
        thread cannot be killed, only reported."""
        deadline = time.monotonic() + GRACE_S
        while True:
            procs, threads = self.leftovers(before)
            if not (procs or threads) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for proc in procs:
            end(proc)
        return [f"process {p}" for p in procs] + [f"thread {t.name!r} (daemon={t.daemon})" for t in threads]


def end(proc: Proc) -> None:
    """SIGKILL exactly this process (through a pidfd: never another that took its pid), and reap it if
    it is pytest's child."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (ProcessLookupError, PermissionError):
        return
    try:
        now = read_proc(proc.pid)
        if now is not None and now.key == proc.key and now.state != "Z":
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)
    if proc.ppid == os.getpid():
        try:
            os.waitpid(proc.pid, 0)
        except ChildProcessError:
            pass
