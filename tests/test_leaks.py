"""The check that fails a test which leaves a process or a thread behind finds each kind of leftover,
and leaves alone what a wider-scoped fixture owns."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from leaks import Ledger, suite_processes

DEADLINE_S = 60


def wait_for(predicate, what: str):
    end = time.monotonic() + DEADLINE_S
    while not (value := predicate()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_process_left_running_is_found_and_gone_once_reaped():
    ledger = Ledger()
    before = ledger.take()
    proc = subprocess.Popen(["sleep", "600"])
    try:
        procs, threads = ledger.leftovers(before)
        assert [p.pid for p in procs] == [proc.pid] and "sleep 600" in str(procs[0]) and threads == []
    finally:
        proc.kill()
        proc.wait()
    assert ledger.leftovers(before) == ([], [])


def test_an_orphaned_grandchild_is_still_found_through_the_run_marker():
    ledger = Ledger()
    before = ledger.take()
    # The shell starts sleep in the background and exits: sleep is no longer a child of pytest.
    out = subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                         check=True)
    orphan = int(out.stdout)
    try:
        assert suite_processes()[orphan].ppid != os.getpid()
        assert orphan in [p.pid for p in ledger.leftovers(before)[0]]
    finally:
        os.kill(orphan, signal.SIGKILL)
    wait_for(lambda: orphan not in suite_processes(), "the orphan to end")


def test_a_child_that_exited_but_was_never_reaped_counts_as_left_behind():
    ledger = Ledger()
    before = ledger.take()
    proc = subprocess.Popen(["true"])
    try:
        zombie = wait_for(lambda: [p for p in ledger.leftovers(before)[0] if p.state == "Z"], "the child to exit")
        assert [p.pid for p in zombie] == [proc.pid] and "never reaped" in str(zombie[0])
    finally:
        proc.wait()
    assert ledger.leftovers(before) == ([], [])


def test_a_thread_left_running_is_found_even_with_the_id_of_one_that_ended():
    ledger = Ledger()
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()  # its id is free for the next thread, as glibc reuses them at once
    before = ledger.take()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="left-behind", daemon=True)
    thread.start()
    try:
        assert ledger.leftovers(before)[1] == [thread]
    finally:
        stop.set()
        thread.join()
    assert ledger.leftovers(before) == ([], [])


def test_what_a_wider_fixture_started_and_all_it_starts_later_are_its_own():
    ledger = Ledger()
    before = ledger.take()
    # A "fixture" that owns a shell, which later starts a child of its own (as a raylet starts workers).
    owner = subprocess.Popen(["sh", "-c", "sleep 600 & wait"], start_new_session=True)
    try:
        ledger.own_since(before)
        wait_for(lambda: [p for p in suite_processes().values() if p.ppid == owner.pid], "the owner's child")
        assert ledger.leftovers(before) == ([], [])
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()
