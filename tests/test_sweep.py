"""A sweep through MCP on the tiny model: each trial a job an agent follows while it runs, the sweep's status
holding the table so far, a winner whose adapter merges by the sweep's id, a cancel that closes every trial,
and what a sweep refuses before it queues. The sweep on SmolLM2 (local and on Ray): test_learn_and_keep.py and
test_ray_cluster.py."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from mcp import Client

from helpers import DEADLINE_S, call, call_ok, wait_job

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def roots(assets, monkeypatch):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))


async def _follow(client, sweep_id: str, trials: int) -> tuple[dict, list[dict], dict[str, set]]:
    """Poll the sweep and each of its trials until the sweep ends: its last status, every table seen on the way,
    and the statuses each trial job showed."""
    tables, seen = [], {f"{sweep_id}-t{n}": set() for n in range(1, trials + 1)}
    with anyio.fail_after(DEADLINE_S):
        while True:
            status = await call_ok(client, "forge_job_status", {"job_id": sweep_id})
            for trial_id in seen:
                trial = await call_ok(client, "forge_job_status", {"job_id": trial_id})
                seen[trial_id].add(trial["status"])
            if status.get("result"):
                tables.append(status["result"])
            if status["status"] in ("succeeded", "failed", "cancelled"):
                return status, tables, seen
            await anyio.sleep(0.2)


async def test_each_trial_is_a_job_and_the_sweep_keeps_the_table_and_a_winner(server, assets):
    args = {"base_model": assets["model_dir"], "dataset": assets["dataset"], "trials": 3,
            "hyperparameters": {"max_steps": 6, "save_steps": 100}}
    async with Client(server) as client:
        handle = await call_ok(client, "forge_sweep", args)
        sweep_id = handle["job_id"]
        assert handle["kind"] == "sweep"
        first = await call_ok(client, "forge_job_status", {"job_id": f"{sweep_id}-t1"})  # there at once
        done, tables, seen = await _follow(client, sweep_id, 3)
        trials = [await call_ok(client, "forge_job_status", {"job_id": f"{sweep_id}-t{n}"}) for n in (1, 2, 3)]
        refused = await call(client, "forge_job_cancel", {"job_id": f"{sweep_id}-t1"})
        merged = await call_ok(client, "forge_merge", {"adapter": sweep_id})  # the winner's adapter
        merge_done = await wait_job(client, merged["job_id"], DEADLINE_S)
        listed = await call_ok(client, "forge_job_list", {"limit": 20})
    assert first["kind"] == "trial" and first["status"] in ("queued", "running", "succeeded")
    assert first["inputs"]["sweep"] == sweep_id and first["run_dir"].endswith("/trials/t1")
    assert done["status"] == "succeeded", done["error"]
    table = done["result"]
    assert [r["trial"] for r in table["trials"]] == ["t1", "t2", "t3"] and table["winner"] in ("t1", "t2", "t3")
    assert all(r["status"] == "succeeded" and r["of"] == 6 and "kept_pct" in r for r in table["trials"])
    # the table while the sweep ran: a trial running, fewer rows than at the end
    assert any(any(r["status"] == "running" for r in t["trials"]) for t in tables)
    assert any(len(t["trials"]) < 3 for t in tables)
    # each trial moved queued -> running -> succeeded as a job of its own, with its own steps and evaluation
    for n, trial in enumerate(trials, start=1):
        assert trial["status"] == "succeeded" and trial["progress"]["step"] == trial["progress"]["total_steps"] == 6
        assert "running" in seen[f"{sweep_id}-t{n}"] and trial["summary"] and "answers right" in trial["summary"]
        assert Path(trial["run_dir"], "adapter", "adapter_config.json").is_file()
    assert refused["error"]["code"] == "invalid_argument" and sweep_id in refused["error"]["hint"]
    winner_dir = Path(table["winner_run_dir"])
    assert merge_done["status"] == "succeeded"
    assert any(Path(a["path"]).parent == winner_dir / "merged" for a in merge_done["artifacts"])
    recorded = json.loads((winner_dir / "stages" / "sweep.json").read_text(encoding="utf-8"))
    assert [r["trial"] for r in recorded["trials"]] == ["t1", "t2", "t3"] and recorded["winner"] == table["winner"]
    assert {j["kind"] for j in listed["jobs"]} >= {"sweep", "trial", "merge"}


async def test_cancelling_a_sweep_stops_its_running_trial_and_closes_the_rest(server, assets):
    args = {"base_model": assets["model_dir"], "dataset": assets["dataset"], "trials": 2,
            "hyperparameters": {"max_steps": 100000, "save_steps": 5}}
    async with Client(server) as client:
        sweep_id = (await call_ok(client, "forge_sweep", args))["job_id"]
        with anyio.fail_after(DEADLINE_S):
            while ((await call_ok(client, "forge_job_status", {"job_id": f"{sweep_id}-t1"}))["progress"]
                   .get("step") or 0) < 3:
                await anyio.sleep(0.3)
        await call_ok(client, "forge_job_cancel", {"job_id": sweep_id})
        ended = await wait_job(client, sweep_id, DEADLINE_S)
        with anyio.fail_after(DEADLINE_S):  # the runner closes what the worker left open, within a pass or two
            while True:
                trials = [await call_ok(client, "forge_job_status", {"job_id": f"{sweep_id}-t{n}"}) for n in (1, 2)]
                if all(t["status"] in ("succeeded", "failed", "cancelled") for t in trials):
                    break
                await anyio.sleep(0.3)
    assert ended["status"] == "cancelled"
    assert [t["status"] for t in trials] == ["cancelled", "cancelled"]
    assert list(Path(trials[0]["run_dir"], "checkpoints").glob("checkpoint-*"))  # the trial saved where it stopped
    assert not Path(trials[1]["run_dir"], "adapter").exists()  # the second never started


@pytest.mark.parametrize(("args", "code", "named"), [
    ({"trials": 0}, "invalid_argument", "trials"),
    ({"trials": 13}, "invalid_argument", "trials"),
    ({"hyperparameters": {"bogus": 1}}, "invalid_argument", "bogus"),
    ({"hyperparameters": {"num_processes": 2}}, "invalid_argument", "num_processes"),
    ({"hyperparameters": {"learning_rate": 1e-3, "num_train_epochs": 2, "lora_r": 8}}, "invalid_argument",
     "nothing"),
    ({"eval_dataset": "/etc/passwd"}, "path_not_allowed", "eval_dataset"),
])
async def test_a_sweep_that_cannot_run_is_refused_before_it_queues(server, assets, args, code, named):
    base = {"base_model": assets["model_dir"], "dataset": assets["dataset"]}
    async with Client(server) as client:
        out = await call(client, "forge_sweep", {**base, **args})
        listed = await call_ok(client, "forge_job_list", {})
    assert out["error"]["code"] == code and named in json.dumps(out["error"])
    assert listed["jobs"] == []
