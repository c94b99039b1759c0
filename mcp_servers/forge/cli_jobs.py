"""``forge jobs`` and ``forge watch JOB``: the job store's jobs at a terminal, for a person following what an
agent started over MCP. Both only read the store: they open it the way the server does, and only when the
file exists (looking creates nothing), and ``watch`` never touches the job it follows: Ctrl-C stops the
watching, not the job.

Added to the ``forge`` command through the ``forge.cli`` entry-point group (pyproject.toml), since forge/
never imports this layer."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path

from forge.errors import Codes
from forge.store_file import STORE_NAME
from forge.term import ProgressBar, numeric, printable
from mcp_servers.lib import results
from mcp_servers.lib.errors import ForgeError, JobCodes
from mcp_servers.lib.store import TERMINAL, JobStore, Status

WATCH_POLL_S = 0.5  # as often as forge_job_wait looks
LIMIT_MAX = 1000
EVENT_PAGE = 200
STALE_S = 30.0  # as the runner's HEARTBEAT_STALE_S: a running job silent this long may have lost its worker
COLUMNS = ("JOB", "KIND", "STATUS", "STAGE", "%", "RUN", "CREATED")


def register(subparsers) -> None:
    """The ``forge.cli`` entry point: add ``jobs`` and ``watch`` to the ``forge`` command."""
    jobs = subparsers.add_parser("jobs", help="List the job store's jobs, newest first.",
                                 description="List the jobs in $FORGE_HOME/forge.db (those agents started over "
                                             "MCP), newest first.")
    jobs.add_argument("--status", choices=[s.value for s in Status], help="only jobs in this status")
    jobs.add_argument("--limit", type=int, default=20, help=f"at most this many (1-{LIMIT_MAX}; default 20)")
    jobs.add_argument("--json", dest="_json", action="store_true", help="print the result as JSON")
    jobs.set_defaults(_handler=list_jobs)
    watch = subparsers.add_parser("watch", help="Follow a job with a live progress bar until it ends.",
                                  description="Follow a job (say one an agent started) with a live progress "
                                              "bar until it ends; exit 0 when it succeeded, 1 otherwise. Ctrl-C "
                                              "stops watching; the job carries on.")
    watch.add_argument("job_id", metavar="JOB", help="a job id, as `forge jobs` lists them")
    watch.add_argument("--json", dest="_json", action="store_true",
                       help="print nothing while following; the job's final state as JSON")
    watch.set_defaults(_handler=watch_job)


# ---- the store, opened only where it exists ----

def store_path() -> Path:
    # FORGE_HOME resolved as forge.paths.forge_home() does, without creating it
    return Path(os.environ.get("FORGE_HOME") or Path.home() / ".forge").expanduser().resolve() / STORE_NAME


@contextlib.contextmanager
def open_store():
    """The job store, or None when there is no store file yet."""
    path = store_path()
    if not path.is_file():
        yield None
        return
    try:
        store = JobStore(path)  # refuses a damaged file (store_damaged, with the fix) before reading it
    except sqlite3.Error as exc:  # say, a store this user may not read
        raise _unreadable(path, exc) from None
    try:
        yield store
    except sqlite3.Error as exc:  # the file changed under us: an error with the fix, not a traceback
        raise _unreadable(path, exc) from None
    finally:
        store.close()


def _unreadable(path: Path, exc: Exception) -> ForgeError:
    return ForgeError(Codes.STORE_DAMAGED, f"the job store {path} could not be read: {exc}",
                      f"`forge store check --path {path}` says whether the file is damaged; check its permissions")


# ---- forge jobs ----

def _ago(ts: float, now: float) -> str:
    """12s ago, 5m ago, 3h ago, 2d ago; a date once it is a week old."""
    seconds = max(0.0, now - ts)
    if seconds >= 7 * 86400:
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
    unit, size = next((u, n) for u, n in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)) if seconds >= n or n == 1)
    return f"{int(seconds // size)}{unit} ago"


def run_name(job: dict) -> str | None:
    """The run dir's name (the job id, or the run_name an agent gave); a merge or quantize names the run it
    wrote into, not its merged or gguf dir."""
    where = results.outputs_dir(job) or (job.get("result") or {}).get("run_dir") or job["params"].get("output_dir")
    return Path(where).name if where else None


def job_row(job: dict) -> dict:
    return {"job_id": job["id"], "kind": job["kind"], "status": job["status"], "stage": job.get("stage"),
            "percent": numeric(job.get("progress") or {}).get("percent"), "run_name": run_name(job),
            "created_at": job["created_at"], "error_code": (job.get("error") or {}).get("code")}


def table(rows: list[dict], now: float) -> str:
    """Rows as aligned columns; every cell made printable (a store's strings are not ours to trust)."""
    cells = [[printable(c, 60) for c in (
        r["job_id"], r["kind"], r["status"] + (f" ({r['error_code']})" if r["error_code"] else ""),
        r["stage"] or "—", "—" if r["percent"] is None else f"{r['percent']:.0f}", r["run_name"] or "—",
        _ago(r["created_at"], now))] for r in rows]
    widths = [max(len(row[i]) for row in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [COLUMNS, *cells])


def list_jobs(args) -> dict:
    if not 1 <= args.limit <= LIMIT_MAX:
        raise ForgeError(Codes.INVALID_ARGUMENT, f"--limit {args.limit} is out of range",
                         f"pass a number from 1 to {LIMIT_MAX}")
    with open_store() as store:
        rows = [job_row(j) for j in store.list(status=args.status, limit=args.limit)] if store else []
    if not args._json:
        if rows:
            print(table(rows, time.time()))
        else:
            print("no jobs yet" + (f" in status {args.status}" if args.status else "") + f" ({store_path()})")
    return {"jobs": rows, "store": str(store_path())}


# ---- forge watch ----

def _job(store: JobStore | None, job_id: str) -> dict:
    """The job, or job_not_found with how to find the id (the id came from a person: never trusted)."""
    try:
        if store is not None:
            return store.get(job_id)
    except ForgeError as err:
        if err.code != JobCodes.JOB_NOT_FOUND:
            raise
    where = "" if store is not None else f" (there is no job store at {store_path()} yet)"
    raise ForgeError(JobCodes.JOB_NOT_FOUND, f"no job with id '{printable(job_id, 80)}'{where}",
                     "`forge jobs` lists the jobs and their ids; FORGE_HOME must be the server's")


def _progress_event(job: dict) -> dict:
    """The job's progress fields as the progress event the bar draws (for a pipeline, under its stage)."""
    event = {"event": "progress", **(job.get("progress") or {})}
    stage = job.get("stage") or ""
    if job["kind"] == "pipeline" and ":" in stage:
        event["pipeline_stage"] = stage.split(":", 1)[0]
    return event


def _show_event(bar: ProgressBar, event: dict) -> None:
    """One of the job's events above the bar: status moves, stages, warnings, evals, finished stages."""
    data, kind = event["data"] if isinstance(event["data"], dict) else {}, event["type"]
    prefix = f"[{printable(data['pipeline_stage'], 40)}] " if data.get("pipeline_stage") else ""
    if kind in ("stage", "warning"):
        bar({**data, "event": kind})
    elif kind == "status":
        err = data.get("error") or {}
        bar.note(f"  status: {data.get('status')}" + (f" [{err.get('code')}] {err.get('message')}" if err else ""))
    elif kind == "eval" and isinstance(data.get("eval_loss"), (int, float)):
        bar.note(f"  {prefix}eval loss {data['eval_loss']:.4f} at step {data.get('step')}")
    elif kind == "stage_done":
        bar.note(f"  {prefix}done: {data.get('status')}")


def _outcome(job: dict) -> str:
    lines = [f"job {job['id']}: {job['status']}"]
    if results.outputs_dir(job):
        lines.append(f"run_dir: {results.outputs_dir(job)}")
    err = job.get("error") or {}
    if err:
        lines.append(f"error [{err.get('code')}]: {err.get('message')}")
        if err.get("hint"):
            lines.append(f"hint: {err['hint']}")
    return "\n".join(printable(line, 2000) for line in lines)


def watch_job(args) -> dict:
    terminal = {s.value for s in TERMINAL}
    bar = ProgressBar(sys.stdout) if not args._json else None
    stopped = stale_said = False
    with open_store() as store:
        job = _job(store, args.job_id)
        if bar:
            bar.label = job["kind"]
        seq, drawn = 0, None
        try:
            while True:
                job = store.get(job["id"])  # first the job, then its events: a final status is never missed
                while True:
                    events = store.events(job["id"], after=seq, limit=EVENT_PAGE)
                    for event in events:
                        seq = event["seq"]
                        if bar:
                            _show_event(bar, event)
                    if len(events) < EVENT_PAGE:
                        break
                shown = (job.get("stage"), job.get("progress"))
                if bar and job.get("progress") and shown != drawn:
                    bar(_progress_event(job))
                    drawn = shown
                if job["status"] in terminal:
                    break
                beat = job.get("heartbeat_at")
                if bar and not stale_said and job["status"] == Status.RUNNING.value and beat and \
                        time.time() - beat > STALE_S:
                    bar.note(f"  no heartbeat from the job's worker for {time.time() - beat:.0f} s: it may have "
                             "died (the MCP server marks such a job failed when it next looks)")
                    stale_said = True
                time.sleep(WATCH_POLL_S)
        except KeyboardInterrupt:  # stop watching; the job is not ours to stop
            stopped = True
        finally:
            if bar:
                bar.close()
    if bar:
        print(printable(f"stopped watching; job {job['id']} is {job['status']} (`forge watch {job['id']}` follows "
                        "it again)", 2000) if stopped else _outcome(job))
    return {"job_id": job["id"], "kind": job["kind"], "status": job["status"], "stage": job.get("stage"),
            "progress": job.get("progress"), "run_dir": results.outputs_dir(job), "error": job.get("error"),
            "watching_stopped": stopped}
