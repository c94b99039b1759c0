"""FORGE_EXECUTOR=ray on a cluster of several nodes on this machine (a head and two worker nodes, each
``ray start`` process in a group of its own, every process of a node killed by its mark): placement on
the nodes that have a job's resources, one Ray Train rank per node, a node that does not see FORGE_HOME,
jobs no node can take, and nodes that die mid-train, with and without Ray Train's restarts."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from helpers import DEADLINE_S, call, call_ok, ray_status, serving, stop_runner, wait_job, wait_job_row, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
WORKERS = {"worker-a": {"num_cpus": 1, "resources": {"forge_node": 1}},
           "worker-b": {"num_cpus": 1, "resources": {"forge_node": 1}}}
ON_WORKERS = json.dumps({"forge_node": 1})  # FORGE_RAY_RESOURCES: jobs go to the nodes that have it


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) and worker-a, worker-b (1 CPU and one forge_node each), for the tests that leave every
    node as they found it."""
    from mcp_servers.lib.ray_local import local_cluster

    with local_cluster(num_cpus=1, workers=WORKERS) as started:
        yield started


@pytest.fixture
def own_cluster():
    """The same three nodes, for a test that kills one."""
    from mcp_servers.lib.ray_local import local_cluster

    with local_cluster(num_cpus=1, workers=WORKERS) as started:
        yield started


def use(cluster, monkeypatch) -> None:
    monkeypatch.setenv("FORGE_EXECUTOR", "ray")
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    monkeypatch.setenv("FORGE_RAY_RESOURCES", ON_WORKERS)


async def checked_environment(client) -> dict:
    """forge_environment once the shared-storage check of the cluster's nodes has ended."""
    with anyio.fail_after(DEADLINE_S):
        while True:
            env = await call_ok(client, "forge_environment")
            if not env["executor"].get("shared_storage", {}).get("checking"):
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


async def test_train_jobs_run_on_the_worker_nodes_with_their_resources_and_report_through_shared_storage(
        cluster, home, assets, monkeypatch):
    use(cluster, monkeypatch)
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    async with serving() as client:
        env = await checked_environment(client)
        nodes = {n["name"]: n for n in env["executor"]["nodes"]}
        assert set(nodes) == {"head", "worker-a", "worker-b"} and nodes["head"]["head"]
        assert nodes["worker-a"]["resources"] == {"forge_node": 1} and "resources" not in nodes["head"]
        storage = env["executor"]["shared_storage"]
        assert storage["ok"] is True and storage["home"] == str(home)
        assert sorted(n["name"] for n in storage["nodes"] if n["sees"]) == ["head", "worker-a", "worker-b"]
        base = {"base_model": assets["model_dir"], "dataset": assets["dataset"]}
        short = await call_ok(client, "forge_train", {**base, "hyperparameters": {"max_steps": 4}})
        long = await call_ok(client, "forge_train", {**base, "hyperparameters": {"max_steps": 100000, "save_steps": 5}})
        running = await reach_step(client, long["job_id"], 6)  # progress crosses from the worker node
        assert running["status"] == "running" and running["progress"]["total_steps"] == 100000
        done = await wait_job(client, short["job_id"], DEADLINE_S)
        await call_ok(client, "forge_job_cancel", {"job_id": long["job_id"]})
        cancelled = await wait_job(client, long["job_id"], DEADLINE_S)
        placed = {job: await node_of(client, job) for job in (short["job_id"], long["job_id"])}
    assert done["status"] == "succeeded", done["error"]
    # each job took the one forge_node of a worker node: one on each, never the head
    assert sorted(n["name"] for n in placed.values()) == ["worker-a", "worker-b"]
    adapter = [a for a in done["artifacts"] if a["kind"] == "adapter"]
    assert adapter and all(Path(a["path"]).is_file() and len(a["sha256"]) == 64 for a in adapter)
    assert cancelled["status"] == "cancelled"
    assert list((Path(cancelled["run_dir"]) / "checkpoints").glob("checkpoint-*"))  # saved on the worker node


def test_ray_train_puts_one_rank_on_each_worker_node_and_matches_one_process(cluster, home, assets, tmp_path,
                                                                             monkeypatch):
    """DDP over gloo with a rank on worker-a and one on worker-b against one process of batch 2 x 2
    accumulated: the same samples each optimizer step, so the same eval loss within 2%."""
    from forge.train import TrainConfig, train
    from mcp_servers.lib.runner import Runner

    use(cluster, monkeypatch)
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    common = {"base_model": assets["model_dir"], "dataset": assets["dataset"], "max_steps": 8,
              "learning_rate": 1e-3, "per_device_train_batch_size": 2, "seed": 7}
    one = train(TrainConfig(**common, gradient_accumulation_steps=2, output_dir=tmp_path / "one"))
    runner = Runner(home)
    runner.start()
    try:
        job, _ = runner.submit("train", {**common, "num_processes": 2})
        done = wait_job_row(runner, job["id"], lambda j: j["status"] == "succeeded", "the Ray Train run to end")
    finally:
        stop_runner(runner)
    two = done["result"]["metrics"]
    assert two["world_size"] == 2 and two["global_step"] == 8 and two["restarts"] == []
    assert sorted(n["name"] for n in two["nodes"]) == ["worker-a", "worker-b"]
    base = one["metrics"]["eval_loss"]
    assert abs(two["eval_loss"] - base) <= 0.02 * base, (two["eval_loss"], base)


async def test_a_node_that_does_not_see_forge_home_is_named_before_any_job_runs(cluster, home, assets, monkeypatch):
    use(cluster, monkeypatch)
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    home.mkdir(parents=True, exist_ok=True)
    cluster.add_node("worker-x", num_cpus=1, hide=home)  # its own empty FORGE_HOME, as without the shared mount
    try:
        async with serving() as client:
            env = await checked_environment(client)
            storage = env["executor"]["shared_storage"]
            assert storage["ok"] is False and storage["error"]["code"] == "storage_not_shared"
            assert "worker-x" in storage["error"]["message"] and str(home) in storage["error"]["message"]
            assert [n["name"] for n in storage["nodes"] if not n["sees"]] == ["worker-x"]
            refused = await call(client, "forge_train", {"base_model": assets["model_dir"],
                                                         "dataset": assets["dataset"]})
            assert refused["error"]["code"] == "storage_not_shared" and "worker-x" in refused["error"]["message"]
            assert "same path on every node" in refused["error"]["hint"]
            assert (await call_ok(client, "forge_job_list"))["jobs"] == []  # nothing was queued

            cluster.kill_node("worker-x")  # the node leaves: the nodes are checked again
            env = await checked_environment(client)
            assert env["executor"]["shared_storage"]["ok"] is True
            handle = await call_ok(client, "forge_train", {"base_model": assets["model_dir"],
                                                           "dataset": assets["dataset"],
                                                           "hyperparameters": {"max_steps": 2}})
            done = await wait_job(client, handle["job_id"], DEADLINE_S)
        assert done["status"] == "succeeded", done["error"]
    finally:
        if "worker-x" in cluster.nodes:
            cluster.kill_node("worker-x")


async def test_a_job_no_node_can_take_is_refused_at_submit_with_the_clusters_nodes(cluster, home, assets, tmp_path,
                                                                                    monkeypatch):
    from forge.errors import ForgeError
    from mcp_servers.lib.runner import Runner

    use(cluster, monkeypatch)
    big = tmp_path / "big-model"  # a 70B-shaped config: the memory planner sizes it from this alone
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256}), encoding="utf-8")
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", f"{Path(assets['dataset']).parent}:{tmp_path}")
    base = {"base_model": assets["model_dir"], "dataset": assets["dataset"]}
    async with serving() as client:
        await checked_environment(client)
        memory = await call(client, "forge_train", {**base, "base_model": str(big)})
        ranks = await call(client, "forge_train", {**base, "hyperparameters": {"num_processes": 3}})
        listed = await call_ok(client, "forge_job_list")
    runner = Runner(home)  # a setting agents do not pass, that the library and CLI take: a GPU kernel
    with pytest.raises(ForgeError) as cuda:
        runner.submit("train", {**base, "attn_implementation": "flash_attention_2"})
    assert cuda.value.code == "no_node_fits" and "needs a CUDA GPU (attn_implementation=flash_attention_2)" in \
        cuda.value.message and "worker-a: 1 CPU, 0 GPU" in cuda.value.message
    assert runner.store.active() == []
    assert memory["error"]["code"] == "no_node_fits" and "GiB memory" in memory["error"]["message"]
    assert any(d.startswith("head (head): 1 CPU, 0 GPU") for d in memory["error"]["details"])
    assert ranks["error"]["code"] == "no_node_fits" and "3 Ray Train workers" in ranks["error"]["message"] \
        and "room for 2" in ranks["error"]["message"]
    assert listed["jobs"] == []  # nothing waits in Ray's queue for what no node has


async def test_a_lost_node_fails_the_job_worker_lost_with_the_node_and_a_checkpoint_that_resumes(
        own_cluster, home, assets, monkeypatch):
    use(own_cluster, monkeypatch)
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    async with serving() as client:
        await checked_environment(client)
        handle = await call_ok(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                       "hyperparameters": {"max_steps": 300, "save_steps": 10}})
        await reach_step(client, handle["job_id"], 15)
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


async def test_with_max_failures_ray_train_restarts_on_the_remaining_node_and_finishes(own_cluster, home, assets,
                                                                                       monkeypatch):
    use(own_cluster, monkeypatch)
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    async with serving() as client:
        await checked_environment(client)
        handle = await call_ok(client, "forge_train", {
            "base_model": assets["model_dir"], "dataset": assets["dataset"],
            "hyperparameters": {"max_steps": 300, "save_steps": 10, "max_failures": 1}})
        running = await reach_step(client, handle["job_id"], 15)
        ranks = Path(running["run_dir"]) / "ray_train_ranks.jsonl"
        first = json.loads(ranks.read_text(encoding="utf-8").splitlines()[0])
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
    starts = [json.loads(line) for line in ranks.read_text(encoding="utf-8").splitlines()]
    assert [(s["attempt"], s["node"]["name"]) for s in starts] == [(1, first["node"]["name"]), (2, survivor)]
    assert any(e["type"] == "stage" and e["data"].get("stage") == "restarted" for e in events)
    # one job, moved through its statuses once; Ray ran it once
    assert [j["job_id"] for j in jobs] == [handle["job_id"]]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert wait_until(lambda: ray_status(own_cluster.address, handle["job_id"]) == "SUCCEEDED", "Ray's SUCCEEDED")
    record = json.loads(Path(sealed["seal_path"]).read_text(encoding="utf-8"))["runs"][0]
    assert record["metrics"]["restarts"] == metrics["restarts"]  # the seal records the restart


async def test_ray_train_without_restarts_ends_worker_lost_naming_the_node_that_left(own_cluster, home, assets,
                                                                                     monkeypatch):
    use(own_cluster, monkeypatch)
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    async with serving() as client:
        await checked_environment(client)
        handle = await call_ok(client, "forge_train", {
            "base_model": assets["model_dir"], "dataset": assets["dataset"],
            "hyperparameters": {"max_steps": 300, "save_steps": 10, "num_processes": 2}})
        await reach_step(client, handle["job_id"], 15)
        own_cluster.kill_node("worker-b")  # rank 0 or 1 goes with it; the Ray job follows from the head
        lost = await wait_job(client, handle["job_id"], DEADLINE_S)
    assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost" and lost["error"]["retryable"]
    assert lost["error"]["message"].startswith("node worker-b (") and "left the Ray cluster while it trained rank" \
        in lost["error"]["message"]
    checkpoint = next(d for d in lost["error"]["details"] if d.startswith("checkpoint: ")).split(": ", 1)[1]
    assert Path(checkpoint).is_dir() and "resume with forge_train(resume_from_job=" in lost["error"]["hint"]
