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
    assert table["winner"] in ("t1", "t2", "t3")
    assert [r.split()[0] for r in table["trials"]] == ["t1", "t2", "t3"]
    assert all("/6 right, kept " in r and r.endswith(" budget") for r in table["trials"])
    # the table while the sweep ran: a trial running, fewer rows than at the end
    assert any(any(r.endswith(": running") for r in t["trials"]) for t in tables)
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


async def test_a_cancel_while_a_trial_evaluates_ends_the_sweep_there(server, assets):
    """Training hands SIGTERM back when it ends: a cancel during a trial's evaluation stops the sweep, and the
    trials after it never start."""
    args = {"base_model": assets["model_dir"], "dataset": assets["dataset"], "trials": 2,
            "hyperparameters": {"max_steps": 2, "save_steps": 100}}
    async with Client(server) as client:
        sweep_id = (await call_ok(client, "forge_sweep", args))["job_id"]
        with anyio.fail_after(DEADLINE_S):
            while not ((await call_ok(client, "forge_job_status", {"job_id": f"{sweep_id}-t1"}))["stage"] or ""
                       ).startswith("evaluating"):
                await anyio.sleep(0.05)
        await call_ok(client, "forge_job_cancel", {"job_id": sweep_id})
        ended = await wait_job(client, sweep_id, DEADLINE_S)
        with anyio.fail_after(DEADLINE_S):
            while (second := await call_ok(client, "forge_job_status", {"job_id": f"{sweep_id}-t2"}))["status"] \
                    not in ("succeeded", "failed", "cancelled"):
                await anyio.sleep(0.3)
    assert ended["status"] == "cancelled"
    assert second["status"] == "cancelled" and not Path(second["run_dir"], "adapter").exists()


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


def test_a_twelve_trial_sweeps_table_stays_small_in_its_status():
    from mcp_servers.lib.outcome import sweep_table

    rows = [{"trial": f"t{n}", "learning_rate": 0.000123, "num_train_epochs": 12.0, "lora_r": 16, "status": "succeeded",
             "learned": 6, "of": 6, "kept_pct": 84.6, "prose_ppl_change_pct": 31.9, "within_budget": True,
             "run_dir": "/a/long/path/" + "x" * 80, "final_loss": 0.00394, "eval_loss": 7.7, "stopped": "24/24"}
            for n in range(1, 13)]
    why = ("t1: 6/6 held-out answers right, within the forgetting budget (general questions kept 84.6%, prose "
           "perplexity +31.9%), final training loss 0.00394")
    shown = sweep_table({"trials": rows, "winner": "t1", "why": why, "winner_run_dir": rows[0]["run_dir"]})
    assert len(shown["trials"]) == 12
    assert shown["trials"][0] == "t1 lr=0.000123 epochs=12 r=16: 6/6 right, kept 84.6%, prose +31.9%, within budget"
    assert len(json.dumps(shown, separators=(",", ":"))) <= 1_400  # a status's 3 KB holds it with room to spare
