"""MCP tasks (the ``io.modelcontextprotocol/tasks`` extension, SEP-2663) over Forge's jobs.

A ``tools/call`` for a tool that starts a job, from a client that declares the extension in that request's
capabilities on a 2026-07-28 connection, is answered with a task (``resultType: "task"``) for the same job
instead of a job handle. ``tasks/get`` reads the job: while it runs, ``working`` with the same progress text
forge_job_wait reports; once it ended, ``completed`` with exactly the result forge_job_wait returns at the
end (a failed job too: its failure is the tool's, not the protocol's), or ``cancelled``. ``tasks/cancel``
cancels the job gracefully (training saves a checkpoint). Without the extension nothing changes.

The task id is 128 random bits mapped to the job id in the job store, so it outlives the server as the job
does; ``ttlMs`` is null because the store keeps jobs until FORGE_HOME is deleted, and ``pollIntervalMs`` is
the handle's poll_after_s."""

from __future__ import annotations

import datetime
from typing import Any

import anyio
from mcp.server.context import CallNext, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolRequestParams, CallToolResult, RequestParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from forge.errors import ForgeError
from mcp_servers.forge.replies import LONG_KINDS, progress_text
from mcp_servers.lib.results import next_actions
from mcp_servers.lib.store import TERMINAL, Status

TASKS = "io.modelcontextprotocol/tasks"


class TaskParams(RequestParams):
    task_id: str = Field(alias="taskId", max_length=64)


class UpdateTaskParams(TaskParams):
    input_responses: dict[str, Any] = Field(default_factory=dict, alias="inputResponses")


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def declared(ctx: ServerRequestContext) -> bool:
    """The client declared the extension on this request (2026-07-28 carries capabilities per request)."""
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and TASKS in capabilities.extensions)


class ForgeTasks(Extension):
    identifier = TASKS

    def __init__(self, server, job_tools: frozenset[str]):
        self.server = server  # the ForgeServer: its runner, and forge_job_wait for a finished task's result
        self.job_tools = job_tools

    def methods(self) -> list[MethodBinding]:
        modern = frozenset(MODERN_PROTOCOL_VERSIONS)
        return [MethodBinding("tasks/get", TaskParams, self._get, protocol_versions=modern),
                MethodBinding("tasks/update", UpdateTaskParams, self._update, protocol_versions=modern),
                MethodBinding("tasks/cancel", TaskParams, self._cancel, protocol_versions=modern)]

    async def intercept_tool_call(self, params: CallToolRequestParams, ctx: ServerRequestContext,
                                  call_next: CallNext) -> Any:
        if params.name not in self.job_tools or ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS \
                or not declared(ctx):
            return await call_next(ctx)
        result = await call_next(ctx)
        # an error, or a question for the person first (a publish to confirm): answered as it is
        if not isinstance(result, CallToolResult) or result.is_error or not result.structured_content:
            return result
        store = self.server.runner.store
        task = store.create_task(result.structured_content["job_id"], params.name)  # durable before the reply
        return {"resultType": "task", **await self._task(ctx, task, store.get(task["job_id"]), initial=True)}

    # ---- the three methods ----

    def _known(self, ctx: ServerRequestContext, params: TaskParams) -> dict:
        from mcp.server.mcpserver.server import require_client_extension

        require_client_extension(ctx, TASKS)  # -32021 to a client that did not declare it
        task = self.server.runner.store.task(params.task_id)
        if task is None:
            raise MCPError(INVALID_PARAMS, "Failed to retrieve task: Task not found", {"taskId": params.task_id})
        return task

    async def _get(self, ctx: ServerRequestContext, params: TaskParams) -> dict:
        task = self._known(ctx, params)
        return await self._task(ctx, task, self.server.runner.store.get(task["job_id"]))

    async def _update(self, ctx: ServerRequestContext, params: UpdateTaskParams) -> dict:
        self._known(ctx, params)  # Forge's jobs never ask for input mid-run: responses are acknowledged, unused
        return {}

    async def _cancel(self, ctx: ServerRequestContext, params: TaskParams) -> dict:
        task = self._known(ctx, params)
        runner = self.server.runner
        try:  # graceful: training saves a checkpoint; a job that already ended keeps its outcome
            await anyio.to_thread.run_sync(lambda: runner.cancel(task["job_id"], False))
        except ForgeError:
            pass
        return {}

    # ---- a job as a task ----

    async def _task(self, ctx: ServerRequestContext, task: dict, job: dict, initial: bool = False) -> dict:
        status = Status(job["status"])
        updated = max(filter(None, (job["created_at"], job.get("started_at"), job.get("heartbeat_at"),
                                    job.get("finished_at"), task["created_at"])))
        out: dict[str, Any] = {"taskId": task["id"], "createdAt": _iso(task["created_at"]),
                               "lastUpdatedAt": _iso(updated), "ttlMs": None,
                               "pollIntervalMs": 5000 if job["kind"] in LONG_KINDS else 2000}
        if initial or status not in TERMINAL:
            return {**out, "status": "working", "statusMessage": f"{job['id']}: {progress_text(job)}"}
        if status == Status.CANCELLED:
            continued = self.server.runner.store.continued_by(job["id"]) if job["kind"] == "train" else None
            after = "; ".join(a for a in next_actions(job, continued) if "resume_from_job" in a)
            message = f"{job['id']}: {progress_text(job)}" + (f"; continue with {after}" if after else "")
            return {**out, "status": "cancelled", "statusMessage": message}
        final = await self.server.call_tool("forge_job_wait", {"job_id": job["id"], "timeout_s": 0},
                                            Context(request_context=ctx, mcp_server=self.server))
        return {**out, "status": "completed", "statusMessage": f"{job['id']}: {job['status']}",
                "result": final.model_dump(by_alias=True, mode="json", exclude_none=True)}
