"""A job's worker process: ``python -m mcp_servers.lib.worker FORGE_DB JOB_ID``, or on a Ray cluster
``python -m mcp_servers.lib.worker --channel JOB_DIR`` (the job's own dir, runs/<job id>/).

Started in its own session by the runner (or as a Ray job), so a server restart does not kill it. It
writes status, stage, progress, events and a heartbeat to the store, or on Ray to the job's channel
file that the server applies to the store; tracebacks go to the job log (Ray's job log) only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

HEARTBEAT_S = 2.0
PROGRESS_KEYS = ("step", "total_steps", "epoch", "percent", "eta_s", "tokens_per_s", "loss",
                 "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")


class ProgressTracker:
    """A job's progress from its stage's events. The percent only moves forward: a pipeline's spans
    all its stages (each stage weighted by forge.pipeline.STAGE_WEIGHTS), and a stage's own fields
    (loss, tokens/s, step/total) are cleared when the next stage starts."""

    def __init__(self):
        self.progress: dict = {}
        self.child: str | None = None

    def update(self, event: dict) -> None:
        kind, child = event.get("event"), event.get("pipeline_stage")
        if child != self.child:  # a pipeline moved on: the last stage's numbers no longer apply
            self.child = child
            self.progress = {"percent": self.progress.get("percent")}
        stage_percent = None
        if kind == "progress":
            self.progress.update({k: event.get(k) for k in PROGRESS_KEYS if k != "percent"})
            stage_percent = event.get("percent")
        elif kind == "stage" and event.get("total_steps"):
            # stages without a step loop (merge, quantize) still move: step = sub-stages done
            self.progress.update(step=event["step"], total_steps=event["total_steps"], eta_s=None)
            stage_percent = 100.0 * event["step"] / event["total_steps"]
        elif kind == "stage" and child:
            stage_percent = 0.0  # a pipeline stage starting: the percent where its span begins
        if stage_percent is None:
            return
        if child:
            from forge.pipeline import stage_span

            low, high = stage_span(child)
            stage_percent = low + (high - low) * stage_percent / 100.0
        self.progress["percent"] = round(max(stage_percent, self.progress.get("percent") or 0.0), 1)

    def finish(self) -> dict:
        self.progress.update(percent=100.0, eta_s=0)
        if self.progress.get("total_steps"):
            self.progress["step"] = self.progress["total_steps"]
        return self.progress


def _finish(store, job_id: str, status, home: Path, **fields) -> None:
    """Record the job's final state. When the disk is full even for that, free the reserve kept under
    FORGE_HOME for this moment and try once more."""
    import errno
    import sqlite3

    from forge import disk

    try:
        store.transition(job_id, status, **fields)
    except (sqlite3.OperationalError, OSError) as exc:
        full = "full" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC
        if not full or not disk.release_reserve(home):
            raise
        store.transition(job_id, status, **fields)


def _claim(store, job: dict) -> bool:
    """Take the job the runner claimed for this process; False if it was cancelled in between."""
    from mcp_servers.lib.store import Status

    if job["status"] == Status.QUEUED.value:
        store.transition(job["id"], Status.RUNNING, pid=os.getpid(), heartbeat_at=time.time(), stage="starting")
    elif job["status"] == Status.CANCELLING.value:  # cancelled between the claim and this start
        store.transition(job["id"], Status.CANCELLED)
        return False
    else:
        store.update(job["id"], pid=os.getpid(), heartbeat_at=time.time())
    return True


def _reporter(store, job_id: str):
    """The stage's progress callback: progress, stage and events into the store."""
    tracker = ProgressTracker()

    def on_progress(event: dict) -> None:
        tracker.update(event)
        kind, child = event.get("event"), event.get("pipeline_stage")
        if kind == "stage":
            stage = f"{child}:{event['stage']}" if child else event["stage"]
            store.update(job_id, stage=stage, progress=tracker.progress)
            store.add_event(job_id, "stage", event)
        elif kind == "progress":
            store.update(job_id, progress=tracker.progress, heartbeat_at=time.time())
        else:
            store.add_event(job_id, kind or "event", event)

    return tracker, on_progress


def _open(args: list[str]):
    """The store (or, on Ray, the job's channel), the job and FORGE_HOME."""
    from forge.paths import forge_home
    from mcp_servers.lib.channel import ChannelStore
    from mcp_servers.lib.store import JobStore

    if args[0] == "--channel":
        run_dir = Path(args[1])
        store = ChannelStore(run_dir)
        os.chdir(run_dir)  # relative names resolve in the job's own dir, as they do locally
        return store, store.get(), forge_home()
    db_path, job_id = args[:2]
    store = JobStore(Path(db_path))
    return store, store.get(job_id), Path(db_path).parent


def _trial_hooks(store, job: dict):
    """A sweep's trials reported as jobs of their own (mcp_servers.lib.sweep_jobs)."""
    if job["kind"] != "sweep":
        return None
    from mcp_servers.lib.sweep_jobs import StoreHooks

    return StoreHooks(store, job["id"], ProgressTracker)


class Stopped(BaseException):
    """A cancel (SIGTERM) in a stage with no stop of its own: it unwinds the job, so subprocess.run ends the
    tool it was running (llama-imatrix, a compiler) and every cleanup runs. Training replaces the handler
    with its own, which saves a checkpoint first."""


def _stop(*_) -> None:
    raise Stopped()


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # what a job writes is the user's alone
    from forge.errors import ForgeError
    from forge.failures import error_from
    from forge.paths import confinement
    from forge.progress import quiet_libraries
    from forge.runs import Outcome
    from mcp_servers.lib import channel
    from mcp_servers.lib.jobs import run_job
    from mcp_servers.lib.paths import recheck
    from mcp_servers.lib.store import Status

    store, job, home = _open(argv if argv is not None else sys.argv[1:])
    job_id = job["id"]
    on_ray = isinstance(store, channel.ChannelStore)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("forge.worker")
    os.environ.pop("FORGE_MCP_TOKEN", None)  # jobs never need the server's bearer token
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(HEARTBEAT_S):
            if on_ray and channel.kill_requested(store.dir):  # a forced cancel: this job's processes end now
                log.warning("job %s: forced cancel", job_id)
                os.killpg(os.getpgrp(), signal.SIGKILL)
            store.update(job_id, heartbeat_at=time.time())

    threading.Thread(target=heartbeat, daemon=True).start()
    if not _claim(store, job):
        return 0
    tracker, on_progress = _reporter(store, job_id)
    quiet_libraries()
    log.info("job %s (%s) starting: %s", job_id, job["kind"], job["params"])
    signal.signal(signal.SIGTERM, _stop)
    try:
        with confinement():  # the params came from an agent: reads and writes stay inside the roots
            recheck(job["params"])
            result = run_job(job["kind"], job["params"], on_progress, _trial_hooks(store, job))
    except Stopped:
        stop.set()
        log.info("job %s cancelled", job_id)
        with contextlib.suppress(ForgeError):  # a forced cancel may have recorded it already
            _finish(store, job_id, Status.CANCELLED, home, progress=tracker.progress)
        return 0
    except BaseException as exc:  # everything: the job must end in a final state, never silently
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        stop.set()
        _finish(store, job_id, Status.FAILED, home, error=error_from(exc, near=job.get("run_dir") or home).to_dict())
        return 1
    stop.set()
    final = Status.CANCELLED if result.get("status") == Outcome.CANCELLED else Status.SUCCEEDED
    progress = tracker.finish() if final == Status.SUCCEEDED else tracker.progress
    _finish(store, job_id, final, home, result=result, progress=progress,
            stage="done" if final == Status.SUCCEEDED else None, run_dir=result.get("run_dir") or job.get("run_dir"))
    log.info("job %s %s", job_id, final.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
