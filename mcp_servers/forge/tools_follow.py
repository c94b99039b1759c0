"""Tools that follow jobs: status, list, events, cancel, and a wait that streams progress."""

from __future__ import annotations

import math
import time
from typing import Annotated, Literal

import anyio
from mcp.server.mcpserver import Context
from pydantic import Field

from forge.errors import Codes, ForgeError
from mcp_servers.forge.context import CANCELS, READ_ONLY, runner_of
from mcp_servers.forge.replies import status_of
from mcp_servers.forge.schemas import JobEvent, JobEvents, JobList, JobStatus
from mcp_servers.lib.store import TERMINAL, Status

JobIdArg = Annotated[str, Field(min_length=1, max_length=64, description=(
    "A job id, as returned by the tool that started the job, e.g. train-20261126-101500-3f9a1c."))]
WAIT_CAP_S = 600.0
WAIT_POLL_S = 0.5


async def forge_job_status(job_id: JobIdArg, ctx: Context) -> JobStatus:
    """A job's status, stage, progress (step/total, epoch, percent, ETA, tokens/s, loss), artifacts with
    sha256, metrics, error (code, message, hint, retryable) and suggested next tool calls."""
    runner = runner_of(ctx)
    return status_of(runner, runner.store.get(job_id))


def _cursor(cursor: str | None) -> float | None:
    if cursor is None:
        return None
    try:
        value = float(cursor)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise ForgeError(Codes.INVALID_ARGUMENT, f"cursor {cursor!r} is not one forge_job_list returned",
                         "pass next_cursor from the previous page exactly, or leave cursor out for the first page")
    return value


async def forge_job_list(
    ctx: Context,
    status: Annotated[Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"] | None,
                      Field(description="Only jobs in this status.")] = None,
    kind: Annotated[Literal["train", "merge", "quantize", "pipeline", "publish"] | None,
                    Field(description="Only jobs of this kind.")] = None,
    limit: Annotated[int, Field(ge=1, le=100, description="Jobs per page (1-100).")] = 20,
    cursor: Annotated[str | None, Field(None, max_length=40, description=(
        "The next_cursor of the previous page, as it came."))] = None,
) -> JobList:
    """Jobs, newest first, optionally filtered by status and kind; page with cursor."""
    runner = runner_of(ctx)
    jobs = runner.store.list(status=status, kind=kind, limit=limit + 1, before=_cursor(cursor))
    page = jobs[:limit]
    return JobList(jobs=[status_of(runner, j) for j in page],
                   next_cursor=repr(page[-1]["created_at"]) if len(jobs) > limit else None)


async def forge_job_events(
    job_id: JobIdArg, ctx: Context,
    after: Annotated[int, Field(ge=0, le=2**63 - 1, description=(
        "Return events after this sequence number (next_after of the last page); 0 = from the start."))] = 0,
    limit: Annotated[int, Field(ge=1, le=200, description="Events per page (1-200).")] = 50,
) -> JobEvents:
    """A job's events (status changes, stages, evals, warnings), paged: pass next_after as after."""
    store = runner_of(ctx).store
    store.get(job_id)
    events = store.events(job_id, after=after, limit=limit)
    return JobEvents(job_id=job_id, events=[JobEvent(**e) for e in events],
                     next_after=events[-1]["seq"] if len(events) == limit else None)


async def forge_job_cancel(
    job_id: JobIdArg, ctx: Context,
    force: Annotated[bool, Field(description="Kill the worker's process group at once (no checkpoint).")] = False,
) -> JobStatus:
    """Cancel a job. A training job saves a checkpoint first (resume it later with resume_from_job);
    force=true kills the worker's process group at once."""
    runner = runner_of(ctx)
    return status_of(runner, await anyio.to_thread.run_sync(lambda: runner.cancel(job_id, force)))


def _progress_message(job: dict) -> str:
    progress = job.get("progress") or {}
    message = " ".join(filter(None, [job["status"], job.get("stage")]))
    if progress.get("total_steps"):
        message += f" step {progress.get('step')}/{progress['total_steps']}"
        if progress.get("loss") is not None:
            message += f" loss {progress['loss']:.4f}"
    return message


async def forge_job_wait(
    job_id: JobIdArg, ctx: Context,
    timeout_s: Annotated[float, Field(ge=0, le=WAIT_CAP_S, description="Seconds to wait at most (0-600).")] = 60,
) -> JobStatus:
    """Wait until the job ends or timeout_s passes (at most 600), sending MCP progress notifications
    while it runs when the call carries a progress token; returns the status either way."""
    runner = runner_of(ctx)
    deadline = time.monotonic() + max(0.0, min(timeout_s, WAIT_CAP_S))
    last = None
    while True:
        job = runner.store.get(job_id)
        progress = job.get("progress") or {}
        marker = (job["status"], job.get("stage"), progress.get("step"))
        if marker != last:
            last = marker
            await ctx.report_progress(progress.get("percent") or 0.0, 100.0, _progress_message(job))
        if Status(job["status"]) in TERMINAL or time.monotonic() >= deadline:
            return status_of(runner, job)
        await anyio.sleep(WAIT_POLL_S)


TOOLS = [
    (forge_job_status, "Job status", READ_ONLY),
    (forge_job_list, "List jobs", READ_ONLY),
    (forge_job_events, "Job events", READ_ONLY),
    (forge_job_cancel, "Cancel a job", CANCELS),
    (forge_job_wait, "Wait for a job", READ_ONLY),
]
