"""Resources: a job's status and log, a seal's record and retrospective."""

from __future__ import annotations

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError

from forge.errors import ForgeError
from forge.paths import open_input, read_text
from mcp_servers.forge.context import runner_of
from mcp_servers.forge.replies import detail_of

LOG_TAIL_LINES = 200


def _job(ctx: Context, job_id: str) -> dict:
    try:
        return runner_of(ctx).store.get(job_id)
    except ForgeError as err:
        raise ResourceNotFoundError(err.message) from None


def job_resource(job_id: str, ctx: Context) -> str:
    """A job in full as JSON: its status with every artifact and metric, and the evaluation's table and samples."""
    import json

    return json.dumps(detail_of(runner_of(ctx), _job(ctx, job_id)), ensure_ascii=False)


def job_log(job_id: str, ctx: Context) -> str:
    """The last 200 lines of a job's log (tracebacks live here, not in statuses)."""
    job = _job(ctx, job_id)
    from_ray = runner_of(ctx).log_tail(job, LOG_TAIL_LINES)  # a Ray job's log lives with Ray
    if from_ray is not None:
        return from_ray
    path = runner_of(ctx).job_dir(job["id"]) / "job.log"  # the job's own dir, whatever run it writes into
    if not path.is_file():
        return ""
    try:
        with open_input(path, "job log") as fh:  # confined: a log planted as a link is refused, not served
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
    except ForgeError as err:
        raise ResourceNotFoundError(err.message) from None
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _seal_file(seal_id: str, name: str) -> str:
    from forge.seal import find_seal

    try:
        return read_text(find_seal(seal_id) / name, "seal file")
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
