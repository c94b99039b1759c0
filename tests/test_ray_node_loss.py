"""FORGE_EXECUTOR=ray when a node dies mid-train, on a cluster of a head and two worker nodes that each
test starts for itself and stops (a node killed is gone for good): without restarts the job ends
worker_lost, naming the node and the checkpoint, and resumes on the node left; with max_failures Ray Train
restarts the ranks on the node left and the job finishes. No job is lost or run twice; the seal records
each restart. Runs after test_ray_cluster.py, whose cluster is stopped by then (one cluster at a time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge.train.ray_ranks import read_starts
from helpers import (
    DEADLINE_S,
    WORKERS,
    all_events,
    call_ok,
    checked_environment,
    detail,
    node_of,
    ray_status,
    reach_step,
    serving,
    use,
    wait_job,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def own_cluster(home, assets, monkeypatch):
    """A head and two worker nodes of the test's own (it kills one), the server's jobs going to the workers."""
    from mcp_servers.lib.ray_local import local_cluster

    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    with local_cluster(num_cpus=1, workers=WORKERS) as started:
        use(started, monkeypatch)
        yield started


async def train_past_a_checkpoint(client, assets, **knobs) -> tuple[dict, dict]:
    """A 300-step train (a checkpoint every 10) once the storage check passed, followed to step 15: its
    handle and status."""
    await checked_environment(client)
    handle = await call_ok(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                   "hyperparameters": {"max_steps": 300, "save_steps": 10, **knobs}})
    return handle, await reach_step(client, handle["job_id"], 15)


async def test_a_lost_node_fails_the_job_worker_lost_with_the_node_and_a_checkpoint_that_resumes(own_cluster, assets):
    async with serving() as client:
        handle, _ = await train_past_a_checkpoint(client, assets)
        node = await node_of(client, handle["job_id"])
        own_cluster.kill_node(node["name"])  # the machine goes: its worker, with the job, dies mid-step
        lost = await wait_job(client, handle["job_id"], DEADLINE_S)
        assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost" and lost["error"]["retryable"]
        named = f"node {node['name']} ({node['ip']}, id {node['id'][:12]}) running the job left the Ray cluster"
        assert lost["error"]["message"].startswith(named), lost["error"]
        checkpoint = next(d for d in lost["error"]["details"] if d.startswith("checkpoint: ")).split(": ", 1)[1]
        assert Path(checkpoint).is_dir() and f"resume_from_job=\"{handle['job_id']}\"" in lost["error"]["hint"]

        again = await call_ok(client, "forge_train", {"resume_from_job": handle["job_id"]})
        done = await wait_job(client, again["job_id"], DEADLINE_S)
        moved = await node_of(client, again["job_id"])
        sealed = await call_ok(client, "forge_seal_snapshot", {"job_ids": [again["job_id"]]})
        jobs = (await call_ok(client, "forge_job_list"))["jobs"]
        events = await all_events(client, handle["job_id"])
    assert done["status"] == "succeeded", done["error"]
    assert moved["name"] != node["name"] and done["metrics"]["global_step"] == 300
    assert done["metrics"]["resumed_from"] == checkpoint  # continued, not started over
    # one job lost, one that continued it; Ray ran each once
    assert sorted(j["status"] for j in jobs) == ["failed", "succeeded"]
    assert [e["data"]["status"] for e in events if e["type"] == "status"] == ["queued", "running", "failed"]
    assert ray_status(own_cluster.address, handle["job_id"]) == "FAILED"
    record = json.loads(Path(sealed["seal_path"]).read_text(encoding="utf-8"))["runs"][0]
    assert record["metrics"]["resumed_from"] == checkpoint  # the seal records the restart


async def test_with_max_failures_ray_train_restarts_on_the_remaining_node_and_finishes(own_cluster, assets):
    async with serving() as client:
        handle, running = await train_past_a_checkpoint(client, assets, max_failures=1)
        (first,) = read_starts(Path(running["run_dir"]))  # where Ray Train placed the one rank
        assert first["rank"] == 0 and first["attempt"] == 1 and first["node"]["name"] in WORKERS
        own_cluster.kill_node(first["node"]["name"])
        done = await wait_job(client, handle["job_id"], DEADLINE_S)
        events = await all_events(client, handle["job_id"])
        sealed = await call_ok(client, "forge_seal_snapshot", {"job_ids": [handle["job_id"]]})
        jobs = (await call_ok(client, "forge_job_list"))["jobs"]
        full = await detail(client, handle["job_id"])
    assert done["status"] == "succeeded", done["error"]
    metrics = full["metrics"]
    assert metrics["global_step"] == 300 and done["metrics"]["restarts"] == 1
    (restart,) = metrics["restarts"]
    survivor = next(name for name in WORKERS if name != first["node"]["name"])
    assert restart["attempt"] == 2 and restart["step"] >= 10 and Path(restart["resume_from"]).name == \
        f"checkpoint-{restart['step']}"
    assert [n["name"] for n in restart["lost_nodes"]] == [first["node"]["name"]]
    assert [n["name"] for n in metrics["nodes"]] == [survivor]
    starts = read_starts(Path(running["run_dir"]))
    assert [(s["attempt"], s["node"]["name"]) for s in starts] == [(1, first["node"]["name"]), (2, survivor)]
    assert any(e["type"] == "stage" and e["data"].get("stage") == "restarted" for e in events)
    # one job, moved through its statuses once; Ray ran it once
    assert [j["job_id"] for j in jobs] == [handle["job_id"]]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert wait_until(lambda: ray_status(own_cluster.address, handle["job_id"]) == "SUCCEEDED", "Ray's SUCCEEDED")
    record = json.loads(Path(sealed["seal_path"]).read_text(encoding="utf-8"))["runs"][0]
    assert record["metrics"]["restarts"] == metrics["restarts"]  # the seal records the restart


async def test_ray_train_without_restarts_ends_worker_lost_naming_the_node_that_left(own_cluster, assets):
    async with serving() as client:
        handle, _ = await train_past_a_checkpoint(client, assets, num_processes=2)
        own_cluster.kill_node("worker-b")  # rank 0 or 1 goes with it; the Ray job follows from the head
        lost = await wait_job(client, handle["job_id"], DEADLINE_S)
    assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost" and lost["error"]["retryable"]
    assert lost["error"]["message"].startswith("node worker-b (") and "left the Ray cluster while it trained rank" \
        in lost["error"]["message"]
    checkpoint = next(d for d in lost["error"]["details"] if d.startswith("checkpoint: ")).split(": ", 1)[1]
    assert Path(checkpoint).is_dir() and "forge_train(resume_from_job=...) continues from checkpoint-" in \
        lost["error"]["hint"]
