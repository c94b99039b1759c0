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
from mcp_servers.forge.replies import progress_text, status_of, summary_of
from mcp_servers.forge.schemas import JobEvent, JobEvents, JobList, JobStatus, JobSummary
from mcp_servers.lib.store import TERMINAL, Status

JobIdArg = Annotated[str, Field(min_length=1, max_length=64, description="e.g. train-20261126-101500-3f9a1c.")]
# The official SDK clients give up on a request after 60 s by default (progress does not reset that),
# so a wait returns well before: the agent calls again to keep waiting.
WAIT_DEFAULT_S = 20.0
WAIT_CAP_S = 45.0
WAIT_POLL_S = 0.5


async def forge_job_status(job_id: JobIdArg, ctx: Context) -> JobStatus:
    """A job: status, stage, progress, files made (sha256), key metrics, quality, summary, warnings, error
    with hint, next_actions; more: the resource with the rest. Times: Unix s."""
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
        raise ForgeError(Codes.INVALID_ARGUMENT, f"cursor {cursor[:40]!r} is not one forge_job_list returned",
                         "pass next_cursor from the previous page exactly, or leave cursor out for the first page")
    return value


async def forge_job_list(
    ctx: Context,
    status: Annotated[Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"] | None,
                      Field(description="Only jobs in this status.")] = None,
    kind: Annotated[Literal["train", "merge", "quantize", "lora_gguf", "evaluate", "pipeline", "publish", "sweep",
                            "trial"] | None,
                    Field(description="Only jobs of this kind.")] = None,
    limit: Annotated[int, Field(ge=1, le=100, description="Per page.")] = 20,
    cursor: Annotated[str | None, Field(max_length=40, description="next_cursor of the previous page.")] = None,
) -> JobList:
    """Jobs, newest first, one line each; page with cursor. forge_job_status has a job's detail."""
    runner = runner_of(ctx)
    jobs = runner.store.list(status=status, kind=kind, limit=limit + 1, before=_cursor(cursor))
    page = jobs[:limit]
    return JobList(jobs=[summary_of(j) for j in page],
                   next_cursor=repr(page[-1]["created_at"]) if len(jobs) > limit else None)


async def forge_job_events(
    job_id: JobIdArg, ctx: Context,
    after: Annotated[int, Field(ge=0, le=2**63 - 1, description="next_after of the last page.")] = 0,
    limit: Annotated[int, Field(ge=1, le=200, description="Per page.")] = 50,
) -> JobEvents:
    """A job's events (status, stages, evals, warnings), paged with next_after. Tracebacks: the resource
    forge://jobs/{id}/log."""
    store = runner_of(ctx).store
    store.get(job_id)
    events = store.events(job_id, after=after, limit=limit)
    return JobEvents(job_id=job_id, events=[JobEvent(**e) for e in events],
                     next_after=events[-1]["seq"] if len(events) == limit else None)


async def forge_job_cancel(
    job_id: JobIdArg, ctx: Context,
    force: Annotated[bool, Field(description="Kill at once, without a checkpoint.")] = False,
) -> JobSummary:
    """Cancel a job; training checkpoints first (forge_train resume_from_job continues). Returns its summary."""
    runner = runner_of(ctx)
    return summary_of(await anyio.to_thread.run_sync(lambda: runner.cancel(job_id, force)))


async def forge_job_wait(
    job_id: JobIdArg, ctx: Context,
    timeout_s: Annotated[float, Field(ge=0, le=WAIT_CAP_S, description=(
        f"Seconds, at most {WAIT_CAP_S:g}: clients wait 60 s for a reply."))] = WAIT_DEFAULT_S,
) -> JobStatus:
    """Wait up to timeout_s for a job to end, with progress notifications; returns its status. Still running:
    call again."""
    runner = runner_of(ctx)
    deadline = time.monotonic() + timeout_s
    sent = None  # MCP requires each notification's progress to be greater than the last
    while True:
        job = runner.store.get(job_id)
        percent = float((job.get("progress") or {}).get("percent") or 0.0)
        if sent is None or percent > sent:
            sent = percent
            await ctx.report_progress(percent, 100.0, progress_text(job))
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
