"""MCP tasks (io.modelcontextprotocol/tasks, SEP-2663) through the Python SDK's client at the protocol level: a
client that declares the extension on a 2026-07-28 connection gets a task for a heavy tool, follows it with
tasks/get to forge_job_wait's own final result, and cancels another with tasks/cancel (a checkpoint saved); a
client that does not declare it, or speaks 2025-11-25, gets today's job handle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from mcp import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, Request, RequestParams, Result
from pydantic import ConfigDict

from helpers import call, call_ok, wait_job

pytestmark = pytest.mark.anyio
TASKS = "io.modelcontextprotocol/tasks"
DEADLINE_S = 900


class CreateTaskResult(Result):
    model_config = ConfigDict(extra="allow")
    result_type: Literal["task"]
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None


class TaskState(Result):
    """tasks/get's reply: a task with its result, error or nothing, by status."""

    model_config = ConfigDict(extra="allow")
    task_id: str
    status: str
    status_message: str | None = None
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None


class TaskParams(RequestParams):
    task_id: str


class GetTask(Request[TaskParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    name_param = "taskId"  # SEP-2663: the Mcp-Name header carries the task id over HTTP


class CancelTask(Request[TaskParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    name_param = "taskId"


class Empty(Result):
    model_config = ConfigDict(extra="allow")


async def follow(session, task_id: str, seen: list[TaskState] | None = None) -> TaskState:
    """Poll tasks/get at the interval the task asks for until it ends."""
    with anyio.fail_after(DEADLINE_S):
        while True:
            state = await session.send_request(GetTask(params=TaskParams(task_id=task_id)), TaskState)
            if seen is not None:
                seen.append(state)
            if state.status in ("completed", "failed", "cancelled"):
                return state
            await anyio.sleep((state.poll_interval_ms or 1000) / 1000)


class Tasks(ClientExtension):
    """What a tasks-aware client does: declare the extension, and finish a task by following it."""

    identifier = TASKS

    def claims(self):
        async def resolve(task: CreateTaskResult, ctx: ClaimContext) -> CallToolResult:
            state = await follow(ctx.session, task.task_id)
            assert state.status == "completed", state
            return CallToolResult.model_validate(state.result)

        return [ResultClaim(result_type="task", model=CreateTaskResult, resolve=resolve)]


async def test_a_client_that_declares_tasks_gets_a_task_and_follows_it_to_forge_job_waits_result(server):
    async with Client(server, mode="2026-07-28", extensions=[Tasks()]) as client:
        assets = await call_ok(client, "forge_demo_assets")
        args = {"base_model": assets["model_dir"], "dataset": assets["dataset"], "hyperparameters": {"max_steps": 6}}
        task = await client.session.call_tool("forge_train", args, allow_claimed=True)
        assert isinstance(task, CreateTaskResult), task
        job_id = server.runner.store.task(task.task_id)["job_id"]
        seen: list[TaskState] = []
        final = await follow(client.session, task.task_id, seen)
        waited = await client.call_tool("forge_job_wait", {"job_id": job_id})
        # the same call through the client's claim: the client gets a CallToolResult, as if it had waited
        resolved = await client.call_tool("forge_merge", {"adapter": job_id})
        with pytest.raises(MCPError) as unknown:
            await client.session.send_request(GetTask(params=TaskParams(task_id="no-such-task")), TaskState)
    assert task.status == "working" and task.ttl_ms is None and task.poll_interval_ms == 5000
    assert len(task.task_id) >= 22 and job_id.startswith("train-")  # 128 random bits, not the job id
    assert task.status_message.startswith(f"{job_id}: ")
    working = [s for s in seen if s.status == "working"]
    assert all(s.status_message.startswith(f"{job_id}: ") for s in working)
    # what forge_job_wait returned, less each response's own stamps (server info, result type)
    def tool_result(result: dict) -> dict:
        return {"isError": False, **{k: v for k, v in result.items() if k not in ("_meta", "resultType")}}

    assert final.status == "completed"
    assert tool_result(final.result) == tool_result(waited.model_dump(by_alias=True, mode="json", exclude_none=True))
    assert final.result["structuredContent"]["status"] == "succeeded"
    assert json.loads(final.result["content"][0]["text"]) == final.result["structuredContent"]
    merged = resolved.structured_content
    assert merged["kind"] == "merge" and merged["status"] == "succeeded"
    assert Path(merged["artifacts"][0]["path"]).is_file()
    assert unknown.value.code == -32602


async def test_tasks_cancel_stops_the_job_gracefully_with_a_checkpoint(server):
    async with Client(server, mode="2026-07-28", extensions=[Tasks()]) as client:
        assets = await call_ok(client, "forge_demo_assets")
        task = await client.session.call_tool("forge_train", {
            "base_model": assets["model_dir"], "dataset": assets["dataset"],
            "hyperparameters": {"max_steps": 5000, "save_steps": 1000}}, allow_claimed=True)
        job_id = server.runner.store.task(task.task_id)["job_id"]
        with anyio.fail_after(DEADLINE_S):
            while (server.runner.store.get(job_id)["progress"].get("step") or 0) < 3:
                await anyio.sleep(0.2)
        ack = await client.session.send_request(CancelTask(params=TaskParams(task_id=task.task_id)), Empty)
        final = await follow(client.session, task.task_id)
        status = await call_ok(client, "forge_job_status", {"job_id": job_id})
    assert {k for k in ack.model_dump(by_alias=True, exclude_none=True) if k not in ("_meta", "resultType")} == set()
    assert final.status == "cancelled" and final.result is None
    assert f'forge_train(resume_from_job="{job_id}")' in final.status_message
    assert status["status"] == "cancelled"
    assert list(Path(status["run_dir"]).glob("checkpoints/checkpoint-*")), "no checkpoint saved on cancel"


@pytest.mark.parametrize("mode,extensions", [("2026-07-28", []), ("legacy", [Tasks()])], ids=["undeclared", "legacy"])
async def test_without_the_extension_on_a_2026_connection_a_heavy_tool_returns_todays_handle(server, mode, extensions):
    async with Client(server, mode=mode, extensions=extensions) as client:
        assets = await call_ok(client, "forge_demo_assets")
        handle = await call(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                    "hyperparameters": {"max_steps": 2}})
        done = await wait_job(client, handle["job_id"])
        refused = None
        if mode == "2026-07-28":  # a tasks/* request from a client that did not declare the extension
            with pytest.raises(MCPError) as info:
                await client.session.send_request(GetTask(params=TaskParams(task_id="x")), TaskState)
            refused = info.value.code
    assert set(handle) >= {"job_id", "status", "poll_after_s"} and done["status"] == "succeeded"
    assert refused == (-32021 if mode == "2026-07-28" else None)
