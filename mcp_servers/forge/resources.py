"""Resources: a job's status and log, a seal's record and retrospective."""

from __future__ import annotations

from pathlib import Path

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError

from forge.errors import ForgeError
from mcp_servers.forge.context import runner_of
from mcp_servers.forge.replies import status_of

LOG_TAIL_LINES = 200


def _job(ctx: Context, job_id: str) -> dict:
    try:
        return runner_of(ctx).store.get(job_id)
    except ForgeError as err:
        raise ResourceNotFoundError(err.message) from None


def job_resource(job_id: str, ctx: Context) -> str:
    """A job's status as JSON."""
    return status_of(runner_of(ctx), _job(ctx, job_id)).model_dump_json()


def job_log(job_id: str, ctx: Context) -> str:
    """The last 200 lines of a job's log (tracebacks live here, not in statuses)."""
    path = Path(_job(ctx, job_id)["run_dir"] or "") / "job.log"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _seal_file(seal_id: str, name: str) -> str:
    from forge.seal import find_seal

    try:
        return (find_seal(seal_id) / name).read_text(encoding="utf-8")
    except ForgeError as err:
        raise ResourceNotFoundError(err.message) from None


def seal_resource(seal_id: str) -> str:
    """A seal's record (canonical JSON) by id (sha256:… or a prefix of its hex)."""
    return _seal_file(seal_id, "seal.json")


def seal_retrospective(seal_id: str) -> str:
    """A seal's retrospective (Markdown, rendered from the record alone)."""
    return _seal_file(seal_id, "retrospective.md")


RESOURCES = [
    ("forge://jobs/{job_id}", job_resource, "application/json"),
    ("forge://jobs/{job_id}/log", job_log, "text/plain"),
    ("forge://seals/{seal_id}", seal_resource, "application/json"),
    ("forge://seals/{seal_id}/retrospective", seal_retrospective, "text/markdown"),
]
