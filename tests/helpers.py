"""Calling Forge's tools from tests, whichever client and transport: one place for it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time

import anyio


def free_port() -> int:
    """A TCP port nothing listens on now, for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def call(client, name: str, args: dict | None = None) -> dict:
    """A tool's structured result, or ``{"error": {...}}`` (the tool's JSON error) when it failed."""
    result = await client.call_tool(name, args or {})
    if result.is_error:
        return {"error": json.loads(result.content[0].text)}
    return result.structured_content


async def call_ok(client, name: str, args: dict | None = None) -> dict:
    """A tool's structured result; a tool error fails the test with the error's text."""
    result = await client.call_tool(name, args or {})
    assert not result.is_error, result.content[0].text
    return result.structured_content


TERMINAL = ("succeeded", "failed", "cancelled")
DEADLINE_S = 900  # generous: another job may be using both cores


async def wait_job(client, job_id: str, deadline_s: float = 900, on_progress=None) -> dict:
    """Follow a job with forge_job_wait, call after call (each shorter than a client's timeout), until
    it ends; fail the test when ``deadline_s`` passes first. Generous by default: a busy machine is slow."""
    import anyio

    with anyio.fail_after(deadline_s):
        while True:
            result = await client.call_tool("forge_job_wait", {"job_id": job_id, "timeout_s": 20},
                                            progress_callback=on_progress)
            assert not result.is_error, result.content[0].text
            status = result.structured_content
            if status["status"] in TERMINAL:
                return status


async def poll_status(client, job_id: str, deadline_s: float = 900) -> tuple[dict, list[float]]:
    """Poll forge_job_status until the job ends: its last status and every percent seen on the way."""
    import anyio

    percents = []
    with anyio.fail_after(deadline_s):
        while True:
            status = await call_ok(client, "forge_job_status", {"job_id": job_id})
            percents.append(status["progress"].get("percent") or 0)
            if status["status"] in TERMINAL:
                return status, percents
            await anyio.sleep(0.3)


def stop_runner(runner) -> None:
    """Stop a test's runner and end every worker it started. The product lets workers outlive the server
    (a restart must not kill a training run); a test must not leave them behind. Processes go first, by
    process group (a worker leads its own, with whatever it started), whatever stopping the runner raised
    and with no store write that a full disk or a damaged store could refuse; then the jobs still active
    under another runner's worker (one a killed server started, or a Ray job) are cancelled where the
    store still answers."""
    ended = set()
    try:
        runner.stop()
    finally:
        for job_id, proc in list(runner.procs.items()):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            ended.add(job_id)
        runner.procs.clear()
    try:
        active = [job for job in runner.store.active() if job["id"] not in ended]
    except Exception:  # a store the test damaged or filled: this runner's workers are already ended
        return
    for job in active:  # never a job whose worker was reaped above: its pid may be another's by now
        try:
            runner.cancel(job["id"], force=True)
        except Exception:
            pass


@contextlib.asynccontextmanager
async def serving():
    """An in-process Forge server with the MCP SDK's client on it; its runner and workers end with the block."""
    from mcp import Client

    from mcp_servers.forge.server import create_server

    server = create_server()
    try:
        async with Client(server) as client:
            yield client
    finally:
        stop_runner(server.runner)


# ---- Ray ----

def ray_status(address: str, job_id: str) -> str:
    from mcp_servers.lib.ray_executor import submission_client

    return str(submission_client(address).get_job_status(job_id).value)


def wait_job_row(runner, job_id: str, until, what: str) -> dict:
    """The job's store row once ``until(row)`` holds; a job that ends before that fails the test at once."""

    def check():
        row = runner.store.get(job_id)
        if until(row):
            return row
        assert row["status"] not in TERMINAL, (what, row["status"], row["error"])
        return None

    return wait_until(check, what)


def wait_until(predicate, what: str, deadline_s: float = DEADLINE_S, every_s: float = 0.3):
    end = time.time() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < end, f"gave up waiting for {what}"
        time.sleep(every_s)


# a head and two worker nodes; FORGE_RAY_RESOURCES sends jobs to the nodes that have forge_node
WORKERS = {"worker-a": {"num_cpus": 1, "resources": {"forge_node": 1}},
           "worker-b": {"num_cpus": 1, "resources": {"forge_node": 1}}}
ON_WORKERS = json.dumps({"forge_node": 1})  # FORGE_RAY_RESOURCES: jobs go to the nodes that have it


def use(cluster, monkeypatch) -> None:
    monkeypatch.setenv("FORGE_EXECUTOR", "ray")
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    monkeypatch.setenv("FORGE_RAY_RESOURCES", ON_WORKERS)


async def checked_environment(client) -> dict:
    """forge_environment once the shared-storage check of the cluster's nodes has ended."""
    with anyio.fail_after(DEADLINE_S):
        while True:
            env = await call_ok(client, "forge_environment")
            assert "error" not in env["executor"], env["executor"]  # the cluster answers
            if not env["executor"]["shared_storage"].get("checking"):
                return env
            await anyio.sleep(0.5)


async def detail(client, job_id: str) -> dict:
    return json.loads((await client.read_resource(f"forge://jobs/{job_id}")).contents[0].text)


async def node_of(client, job_id: str) -> dict:
    """The node a job's worker runs on, from its resource, once the server has recorded it."""
    with anyio.fail_after(DEADLINE_S):
        while not ((await detail(client, job_id)).get("placement") or {}).get("node"):
            await anyio.sleep(0.5)
    return (await detail(client, job_id))["placement"]["node"]


async def all_events(client, job_id: str) -> list[dict]:
    """Every event of a job, page after page."""
    events, after = [], 0
    while True:
        page = await call_ok(client, "forge_job_events", {"job_id": job_id, "after": after, "limit": 200})
        events += page["events"]
        if page["next_after"] is None:
            return events
        after = page["next_after"]


async def reach_step(client, job_id: str, step: int) -> dict:
    with anyio.fail_after(DEADLINE_S):
        while True:
            status = await call_ok(client, "forge_job_status", {"job_id": job_id})
            assert status["status"] in ("queued", "running"), status
            if (status["progress"].get("step") or 0) >= step:
                return status
            await anyio.sleep(0.3)


def ray_train_against_one_process(home, assets, tmp_path) -> tuple[dict, dict]:
    """Two Ray Train workers of batch 2 (a Ray job of the current RAY_ADDRESS) and one process of batch 2 x 2
    accumulated, 8 steps each: the same samples every optimizer step. The one process's result, and the Ray
    job's store row once it succeeded."""
    from forge.train import TrainConfig, train
    from mcp_servers.lib.runner import Runner

    common = {"base_model": assets["model_dir"], "dataset": assets["dataset"], "max_steps": 8,
              "learning_rate": 1e-3, "per_device_train_batch_size": 2, "seed": 7}
    one = train(TrainConfig(**common, gradient_accumulation_steps=2, output_dir=tmp_path / "one"))
    runner = Runner(home)
    runner.start()
    try:
        job, _ = runner.submit("train", {**common, "num_processes": 2})
        return one, wait_job_row(runner, job["id"], lambda j: j["status"] == "succeeded", "the Ray Train run to end")
    finally:
        stop_runner(runner)
