"""FORGE_EXECUTOR=ray: heavy jobs as Ray jobs on a real one-node cluster (head only, 2 CPUs) that
these tests start and stop themselves; the same tools, statuses, events and seals as locally."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from helpers import (
    DEADLINE_S,
    call_ok,
    poll_status,
    ray_status,
    ray_train_against_one_process,
    serving,
    stop_runner,
    wait_job,
    wait_job_row,
    wait_until,
)
from mcp_servers.lib.runner import Runner
from mcp_servers.lib.store import JobStore

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_address():
    from mcp_servers.lib.ray_local import local_cluster

    with local_cluster(num_cpus=2) as cluster:
        yield cluster.address


@pytest.fixture
def on_ray(home, ray_address, monkeypatch) -> str:
    monkeypatch.setenv("FORGE_EXECUTOR", "ray")
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    return ray_address


async def test_the_pipeline_runs_on_ray_from_train_to_seal(on_ray, home):
    async with serving() as client:
        env = await call_ok(client, "forge_environment")
        assert env["executor"]["name"] == "ray" and env["executor"]["address"] == on_ray
        assert [n["cpus"] for n in env["executor"]["nodes"]] == [2] and env["executor"]["free"]["CPU"] == 2
        assets = await call_ok(client, "forge_demo_assets")
        handle = await call_ok(client, "forge_pipeline", {"base_model": assets["model_dir"],
                                                         "dataset": assets["dataset"],
                                                         "hyperparameters": {"max_steps": 3}, "run_name": "on-ray"})
        first = await call_ok(client, "forge_job_status", {"job_id": handle["job_id"]})
        status, percents = await poll_status(client, handle["job_id"], DEADLINE_S)
        log = (await client.read_resource(f"forge://jobs/{handle['job_id']}/log")).contents[0].text
        detail = json.loads((await client.read_resource(f"forge://jobs/{handle['job_id']}")).contents[0].text)
        events = await call_ok(client, "forge_job_events", {"job_id": handle["job_id"], "limit": 200})
    assert status["status"] == "succeeded", (status["error"], log[-3000:])
    assert list(detail["stages"].items()) == [
        (name, "succeeded") for name in ("train", "merge", "quantize", "evaluate", "modelfile", "seal")]
    assert percents == sorted(percents) and percents[-1] == 100.0  # progress only moves forward
    # the job id is Ray's submission id; Ray sees the worker's process end a moment after it recorded its state
    assert wait_until(lambda: ray_status(on_ray, handle["job_id"]) == "SUCCEEDED", "Ray's SUCCEEDED")
    assert "forge.worker" in log and "succeeded" in log  # the log is Ray's, tailed through Forge
    statuses = [e["data"]["status"] for e in events["events"] if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]  # every move applied once
    ggufs = [a for a in status["artifacts"] if a["path"].endswith(".gguf")]
    assert ggufs and all(len(a["sha256"]) == 64 and Path(a["path"]).is_file() for a in ggufs)
    run = home / "runs" / "on-ray"  # where the outputs are, said from the first status on
    assert first["run_dir"] == status["run_dir"] == str(run) and all(Path(a["path"]).parent == run / "gguf"
                                                                     for a in ggufs)
    assert (home / "runs" / handle["job_id"] / "channel.jsonl").is_file()  # the job's own dir: its channel
    seal = next(a["path"] for a in status["artifacts"] if a["kind"] == "seal")
    record = json.loads(Path(seal).read_text(encoding="utf-8"))["runs"][0]
    assert len(record["evaluation"]["table"]) >= 4 and record["artifacts"]  # base, fine-tuned, f16, Q4_K_M

async def test_a_job_that_does_not_fit_waits_in_rays_queue_and_cancel_goes_through_ray(on_ray, home, monkeypatch):
    monkeypatch.setenv("FORGE_RAY_JOB_CPUS", "2")  # each job takes the whole 2-CPU cluster
    async with serving() as client:
        assets = await call_ok(client, "forge_demo_assets")
        long = {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                "hyperparameters": {"max_steps": 100000, "save_steps": 100000}}
        first = await call_ok(client, "forge_train", long)
        second = await call_ok(client, "forge_train", long)

        async def status(job_id):
            return await call_ok(client, "forge_job_status", {"job_id": job_id})

        with anyio.fail_after(DEADLINE_S):
            while (await status(first["job_id"]))["progress"].get("step") is None or \
                    (await status(first["job_id"]))["progress"].get("step", 0) < 5:
                await anyio.sleep(0.5)
        waiting = await status(second["job_id"])
        assert waiting["status"] == "queued" and waiting["stage"].startswith("ray_queue: waiting in Ray's queue")
        assert "2 CPU" in waiting["stage"] and ray_status(on_ray, second["job_id"]) == "PENDING"

        await call_ok(client, "forge_job_cancel", {"job_id": first["job_id"]})  # graceful: SIGTERM through Ray
        done = await wait_job(client, first["job_id"], DEADLINE_S)
        assert done["status"] == "cancelled", done
        assert wait_until(lambda: ray_status(on_ray, first["job_id"]) == "STOPPED", "Ray's STOPPED")
        checkpoints = list((Path(done["run_dir"]) / "checkpoints").glob("checkpoint-*"))
        assert checkpoints, "a graceful cancel saves a checkpoint to resume from"

        with anyio.fail_after(DEADLINE_S):  # the second job gets the cluster once the first let go
            while (await status(second["job_id"]))["status"] != "running":
                await anyio.sleep(0.5)
        await call_ok(client, "forge_job_cancel", {"job_id": second["job_id"], "force": True})
        done = await wait_job(client, second["job_id"], DEADLINE_S)
        assert done["status"] == "cancelled", done
        assert wait_until(lambda: ray_status(on_ray, second["job_id"]) in ("STOPPED", "FAILED"), "Ray's stop")


def test_a_restarted_server_reattaches_to_its_ray_jobs(on_ray, home, assets, monkeypatch):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    first = Runner(home)
    first.start()
    try:
        job, _ = first.submit("train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                        "max_steps": 400, "logging_steps": 1})
        running = wait_job_row(first, job["id"], lambda j: (j["progress"] or {}).get("step", 0) >= 3,
                               "the job to train a few steps")
    except BaseException:
        stop_runner(first)  # the job too: a Ray job left running would hold the cluster for the next tests
        raise
    first.stop()  # the server goes away; the Ray job carries on
    assert running["status"] == "running" and running["progress"]["step"] < 400
    second = Runner(home)
    second.start()
    try:
        done = wait_job_row(second, job["id"], lambda j: j["status"] == "succeeded", "the re-attached job to end")
    finally:
        stop_runner(second)
    assert done["result"]["metrics"]["global_step"] == 400 and done["progress"]["percent"] == 100.0
    statuses = [e["data"]["status"] for e in second.store.events(job["id"], limit=1000, type_="status")]
    assert statuses == ["queued", "running", "succeeded"]


def test_two_ray_train_workers_match_one_process_within_two_percent(on_ray, home, assets, tmp_path, monkeypatch):
    """DDP over gloo with 2 Ray Train workers of batch 2 against one process of batch 2 x 2 accumulated:
    the same samples each optimizer step, so the same eval loss up to float reduction order (bound: 2%)."""
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    one, done = ray_train_against_one_process(home, assets, tmp_path)
    two = done["result"]["metrics"]
    assert two["world_size"] == 2 and two["global_step"] == 8
    assert Path(done["result"]["adapter_dir"]).joinpath("adapter_model.safetensors").is_file()
    base = one["metrics"]["eval_loss"]
    assert abs(two["eval_loss"] - base) <= 0.02 * base, (two["eval_loss"], base)
    stages = JobStore(home / "forge.db").events(done["id"], limit=200, type_="stage")
    assert "ray_train" in json.dumps(stages)


def test_an_unknown_executor_is_refused_before_the_server_starts(home, monkeypatch, capsys):
    from mcp_servers.forge.server import main

    monkeypatch.setenv("FORGE_EXECUTOR", "slurm")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "FORGE_EXECUTOR='slurm' is not an executor" in err and "local, ray" in err
    assert not (home / "forge.db").exists()  # a server that does not start changes nothing


async def test_no_cluster_at_the_address_fails_the_job_with_what_to_do(home, assets, monkeypatch):
    from mcp_servers.lib.ray_local import _free_port

    monkeypatch.setenv("FORGE_EXECUTOR", "ray")
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    async with serving() as client:
        env = await call_ok(client, "forge_environment")
        assert env["executor"]["error"]["code"] == "executor_unavailable"
        demo = await call_ok(client, "forge_demo_assets")
        handle = await call_ok(client, "forge_train", {"base_model": demo["model_dir"], "dataset": demo["dataset"]})
        done = await wait_job(client, handle["job_id"], DEADLINE_S)
    assert done["status"] == "failed" and done["error"]["code"] == "executor_unavailable"
    assert "ray start --head" in done["error"]["hint"] and done["error"]["retryable"] is True


def test_a_cancelled_ray_train_run_resumes_from_its_checkpoint(on_ray, home, assets, monkeypatch):
    """Ray stops the job: the driver writes the run's STOP file, both Ray Train workers agree on a step,
    save a checkpoint and end; a new job with resume=true continues from it on two workers again."""
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))
    common = {"base_model": assets["model_dir"], "dataset": assets["dataset"], "max_steps": 200,
              "save_steps": 1000, "num_processes": 2}
    runner = Runner(home)
    runner.start()
    try:
        job, _ = runner.submit("train", common)
        wait_job_row(runner, job["id"], lambda j: (j["progress"] or {}).get("step", 0) >= 10, "a few steps")
        runner.cancel(job["id"])
        stopped = wait_job_row(runner, job["id"], lambda j: j["status"] == "cancelled", "the cancel")
        checkpoint = Path(stopped["result"]["checkpoint"])
        assert checkpoint.is_dir() and 10 <= int(checkpoint.name.split("-")[1]) < 200  # saved at the stop
        again, _ = runner.submit("train", {**common, "output_dir": stopped["params"]["output_dir"], "resume": True})
        done = wait_job_row(runner, again["id"], lambda j: j["status"] == "succeeded", "the resumed run")
    finally:
        stop_runner(runner)
    metrics = done["result"]["metrics"]
    assert metrics["resumed_from"] == str(checkpoint) and metrics["global_step"] == 200 and metrics["world_size"] == 2
