"""FORGE_EXECUTOR=ray on a cluster of several nodes on this machine (a head and two worker nodes, each
``ray start`` process in a group of its own, every process of a node killed by its mark): placement on
the nodes that have a job's resources, one Ray Train rank per node, a node that does not see FORGE_HOME,
and jobs no node can take. Nodes that die mid-train: test_ray_node_loss.py."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest

from helpers import (
    DEADLINE_S,
    WORKERS,
    call,
    call_ok,
    checked_environment,
    detail,
    node_of,
    ray_train_against_one_process,
    reach_step,
    serving,
    stop_runner,
    use,
    wait_job,
)
from mcp_servers.lib.ray_local import can_hide_storage

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) and worker-a, worker-b (1 CPU and one forge_node each), for the tests that leave every
    node as they found it."""
    from mcp_servers.lib.ray_local import local_cluster

    with local_cluster(num_cpus=1, workers=WORKERS) as started:
        yield started


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
    use(cluster, monkeypatch)
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    one, done = ray_train_against_one_process(home, assets, tmp_path)
    two = done["result"]["metrics"]
    assert two["world_size"] == 2 and two["global_step"] == 8 and two["restarts"] == []
    assert sorted(n["name"] for n in two["nodes"]) == ["worker-a", "worker-b"]
    base = one["metrics"]["eval_loss"]
    assert abs(two["eval_loss"] - base) <= 0.02 * base, (two["eval_loss"], base)


@pytest.mark.skipif(not can_hide_storage(), reason="mount namespaces are not allowed here (unshare --mount failed)")
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
    try:
        with pytest.raises(ForgeError) as cuda:
            runner.submit("train", {**base, "attn_implementation": "flash_attention_2"})
        assert runner.store.active() == []
    finally:
        stop_runner(runner)
    assert cuda.value.code == "no_node_fits" and "needs a CUDA GPU (attn_implementation=flash_attention_2)" in \
        cuda.value.message and "worker-a: 1 CPU, 0 GPU" in cuda.value.message
    assert memory["error"]["code"] == "no_node_fits" and "GiB memory" in memory["error"]["message"]
    assert any(d.startswith("head (head): 1 CPU, 0 GPU") for d in memory["error"]["details"])
    assert ranks["error"]["code"] == "no_node_fits" and "3 Ray Train workers" in ranks["error"]["message"] \
        and "room for 2" in ranks["error"]["message"]
    assert listed["jobs"] == []  # nothing waits in Ray's queue for what no node has


async def test_a_sweep_runs_its_trials_through_ray_tune_side_by_side_and_keeps_a_winner(cluster, home,
                                                                                        tmp_path_factory, monkeypatch):
    """Four SmolLM2 trials through Ray Tune, one on each worker node at a time (a CPU and a forge_node each),
    the sweep's Ray job following them from the head: each trial a job with its own steps, the table in the
    sweep's status, and a winner that learned the held-out facts within the forgetting budget."""
    from fixtures.facts import write_facts

    facts = write_facts(tmp_path_factory.mktemp("facts"))
    use(cluster, monkeypatch)
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(facts["root"]))
    args = {"base_model": facts["base_model"], "dataset": facts["dataset"], "eval_dataset": facts["eval_dataset"],
            "trials": 4}
    async with serving() as client:
        await checked_environment(client)
        sweep_id = (await call_ok(client, "forge_sweep", args))["job_id"]
        done = await wait_job(client, sweep_id, 3 * DEADLINE_S)
        trials = [await detail(client, f"{sweep_id}-t{n}") for n in range(1, 5)]
        placed = await detail(client, sweep_id)
    assert done["status"] == "succeeded", done["error"]
    assert placed["placement"]["executor"] == "ray" and placed["placement"]["node"]["name"] == "head"
    assert Path(done["run_dir"], "tune").is_dir()  # Ray Tune's own record of the trials
    for trial in trials:  # each trial a job of its own, followed to its last step
        assert trial["status"] == "succeeded" and trial["progress"]["step"] == trial["progress"]["total_steps"] > 0
    spans = sorted((t["started_at"], t["finished_at"]) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in pairwise(spans))  # side by side, on two nodes
    rows = {r["trial"]: r for r in placed["result"]["trials"]}  # the resource: each trial's whole row
    winner = rows[placed["result"]["winner"]]
    assert len(rows) == 4 and winner["within_budget"] and winner["learned"] >= 5, done["result"]
