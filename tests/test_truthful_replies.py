"""What an agent reads back is true and complete (issue 24): a job's run_dir is where its files are at every
poll, an evaluation's figures are in its reply and no stage record is ever written over, a resume records its
settings beside the original and is taken once, the allowed roots are named, and a query by job id names the
GGUF that answered. Each checked against the files on disk, through the SDK's client."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from mcp import Client

from helpers import TERMINAL, call, call_ok, wait_job

pytestmark = pytest.mark.anyio


async def _follow(client, job_id: str, expected_run_dir: Path, deadline_s: float = 900) -> tuple[dict, int]:
    """Poll a job to its end, checking at every poll that its run_dir is ``expected_run_dir``; the last status
    and how many polls saw it."""
    polls = 0
    with anyio.fail_after(deadline_s):
        while True:
            status = await call_ok(client, "forge_job_status", {"job_id": job_id})
            polls += 1
            assert status["run_dir"] == str(expected_run_dir), (status["status"], status["stage"], status["run_dir"])
            if status["status"] in TERMINAL:
                return status, polls
            await anyio.sleep(0.2)


async def test_run_dir_is_where_the_files_are_and_a_second_evaluation_keeps_the_first(server, home):
    run = home / "runs" / "velmora-r1"
    async with Client(server) as client:
        assets = await call_ok(client, "forge_demo_assets")
        train = await call_ok(client, "forge_train", {
            "base_model": assets["model_dir"], "dataset": assets["dataset"], "run_name": "velmora-r1",
            "hyperparameters": {"max_steps": 6, "learning_rate": 0.002}})
        trained, polls = await _follow(client, train["job_id"], run)
        assert trained["status"] == "succeeded" and polls >= 2, trained
        assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "train_config.json").is_file()
        assert not (home / "runs" / train["job_id"] / "adapter").exists()  # the job's own dir holds its log only

        merge = await call_ok(client, "forge_merge", {"adapter": train["job_id"], "merged_name": "merged-a"})
        merged, _ = await _follow(client, merge["job_id"], run)
        assert merged["status"] == "succeeded", merged
        assert {Path(a["path"]).parent for a in merged["artifacts"]} == {run / "merged-a"}
        assert any(w.startswith("merge parity passed: max |Δlogit|") for w in merged["warnings"]), merged["warnings"]
        merge_log = (await client.read_resource(f"forge://jobs/{merge['job_id']}/log")).contents[0].text
        # the job's own log, read from its own dir: the worker's start and end lines for this merge
        assert f"job {merge['job_id']} (merge) starting" in merge_log
        assert f"job {merge['job_id']} succeeded" in merge_log

        quant = await call_ok(client, "forge_quantize", {"model": merge["job_id"], "quantizations": ["Q4_K_M"]})
        quantized, _ = await _follow(client, quant["job_id"], run)
        assert quantized["status"] == "succeeded", quantized
        ggufs = sorted(a["path"] for a in quantized["artifacts"] if a["kind"] == "gguf")
        assert ggufs and all(Path(p).parent == run / "gguf" for p in ggufs)
        q4 = next(p for p in ggufs if p.endswith("-Q4_K_M.gguf"))

        # asked by job id: the reply names the file that answered (the quantize job made an f16 and a Q4_K_M)
        reply = await call_ok(client, "forge_query_model", {"model": quant["job_id"], "prompt": "Hi", "max_tokens": 4})
        assert reply["model"] == q4

        firsts, evaluations = [], []
        for dataset in (None, assets["dataset"]):
            args = {"run": quant["job_id"], **({"dataset": dataset} if dataset else {})}
            handle = await call_ok(client, "forge_evaluate", args)
            evaluated, _ = await _follow(client, handle["job_id"], run)
            assert evaluated["status"] == "succeeded", evaluated
            evaluations.append(evaluated)
            firsts.append(await call_ok(client, "forge_job_events", {"job_id": handle["job_id"], "limit": 200}))
        sealed = await call_ok(client, "forge_seal_snapshot", {"job_ids": [quant["job_id"]]})

    records = [e["result"]["record"] for e in evaluations]
    assert records == ["stages/evaluate-1.json", "stages/evaluate-2.json"]
    for evaluated, record in zip(evaluations, records, strict=True):
        kept = json.loads((run / record).read_text())  # both on disk, each with the figures its reply gave
        assert evaluated["result"]["perplexity"] == {r["model"]: float(f"{r['perplexity']:.4g}")
                                                      for r in kept["table"] if "file" not in r}
        assert set(evaluated["result"]["perplexity"]) >= {"base", "fine-tuned", "Q4_K_M GGUF"}
        assert kept["record"] == record and len(json.dumps(evaluated)) < 3072
    assert json.loads((run / "stages" / "evaluate.json").read_text())["record"] == records[1]  # the latest
    assert json.loads((run / records[0]).read_text())["source"] != json.loads((run / records[1]).read_text())["source"]
    for events in firsts:  # the done event carries the numbers too
        done = [e["data"] for e in events["events"] if e["type"] == "done"]
        assert done and done[-1]["perplexity"]["base"] > 0 and done[-1]["record"].startswith("stages/evaluate-")
    seal = json.loads(Path(sealed["seal_path"]).read_text())
    stages = seal["runs"][0]["stages"]
    assert stages["evaluate"]["record"] == records[1] and stages["train"]["record"] == "stages/train-1.json"
    assert (stages["merge"]["record"], stages["quantize"]["record"]) == ("stages/merge-1.json",
                                                                         "stages/quantize-1.json")


async def test_a_resume_records_its_settings_beside_the_original_and_is_taken_once(server):
    async with Client(server) as client:
        assets = await call_ok(client, "forge_demo_assets")
        handle = await call_ok(client, "forge_train", {
            "base_model": assets["model_dir"], "dataset": assets["dataset"],
            "hyperparameters": {"max_steps": 300, "learning_rate": 0.0005, "seed": 7, "save_steps": 1000}})
        with anyio.fail_after(600):
            while ((await call_ok(client, "forge_job_status", {"job_id": handle["job_id"]}))["progress"].get("step")
                   or 0) < 2:
                await anyio.sleep(0.2)
        await call_ok(client, "forge_job_cancel", {"job_id": handle["job_id"]})
        cancelled = await wait_job(client, handle["job_id"])
        assert cancelled["status"] == "cancelled", cancelled
        run = Path(cancelled["run_dir"])
        original = (run / "train_config.json").read_text()
        saved = max(int(p.name.split("-")[1]) for p in run.glob("checkpoints/checkpoint-*"))

        # two resumes sent at one moment, each with its own request id: one continues the run, one is refused
        replies = {}

        async def resume(key: str) -> None:
            replies[key] = await call(client, "forge_train", {
                "resume_from_job": handle["job_id"], "client_request_id": key,
                "hyperparameters": {"max_steps": saved + 3, "learning_rate": 0.0001}})

        async with anyio.create_task_group() as group:
            for key in ("first", "second"):
                group.start_soon(resume, key)
        won = [k for k, r in replies.items() if "job_id" in r]
        assert len(won) == 1, replies
        lost = replies["second" if won == ["first"] else "first"]
        continuing = replies[won[0]]["job_id"]
        assert lost["error"]["code"] == "already_resumed" and continuing in lost["error"]["message"], lost
        assert f'forge_train(resume_from_job="{continuing}")' in lost["error"]["hint"]
        # the same call retried (its reply lost) gets the same job back, not a refusal
        retried = await call_ok(client, "forge_train", {"resume_from_job": handle["job_id"],
                                                         "client_request_id": won[0]})
        assert retried["job_id"] == continuing
        later = await call(client, "forge_train", {"resume_from_job": handle["job_id"]})
        stopped = await call_ok(client, "forge_job_status", {"job_id": handle["job_id"]})
        final = await wait_job(client, continuing)
        sealed = await call_ok(client, "forge_seal_snapshot", {"job_ids": [continuing]})
        listed = await call_ok(client, "forge_job_list", {"kind": "train"})

    assert later["error"]["code"] == "already_resumed" and continuing in later["error"]["message"]
    assert stopped["next_actions"] == [f'forge_job_status(job_id="{continuing}")']  # never a second resume
    assert final["status"] == "succeeded" and final["metrics"]["global_step"] == saved + 3, final
    assert (run / "train_config.json").read_text() == original  # the original settings, untouched
    first = json.loads(original)
    assert (first["max_steps"], first["learning_rate"], first["seed"]) == (300, 0.0005, 7)
    resumed = json.loads((run / "train_config.resume-1.json").read_text())
    assert (resumed["max_steps"], resumed["learning_rate"], resumed["seed"], resumed["resume"]) == (
        saved + 3, 0.0001, 7, True)
    assert not (run / "train_config.resume-2.json").exists()
    configs = json.loads(Path(sealed["seal_path"]).read_text())["runs"][0]["configs"]
    assert configs["train"]["max_steps"] == 300 and [c["max_steps"] for c in configs["train_resumes"]] == [saved + 3]
    assert len(listed["jobs"]) == 2  # the refusals queued nothing


async def test_allowed_roots_and_descriptions_say_what_the_code_does(server, home, tmp_path, monkeypatch):
    data = tmp_path / "datasets"
    data.mkdir()
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(data))
    async with Client(server) as client:
        env = await call_ok(client, "forge_environment")
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert env["allowed_roots"] == [str(home.resolve()), str(data.resolve())]
    system = tools["forge_modelfile"].input_schema["properties"]["system_prompt"]["description"]
    assert "default: the template's own" in system  # its default system message, as write_modelfile writes it
    assert "Says which model answered" in tools["forge_query_model"].description


async def test_validating_against_a_gguf_base_reports_progress_while_it_converts(server, home, smollm2_gguf,
                                                                                 monkeypatch):
    from mcp_servers.forge import tools_stages

    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(smollm2_gguf.parent))
    monkeypatch.setattr(tools_stages, "PROGRESS_TICK_S", 0.2)  # a fast machine converts in a second or two
    home.mkdir(parents=True, exist_ok=True)
    dataset = home / "chat.jsonl"
    dataset.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                        {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                               for i in range(8)))
    seen = []

    async def on_progress(value, total, message):
        seen.append((value, total, message))

    async with Client(server) as client:
        result = await client.call_tool("forge_validate_dataset", {"path": str(dataset),
                                                                   "base_model": str(smollm2_gguf)},
                                        progress_callback=on_progress)
    assert not result.is_error, result.content[0].text
    assert result.structured_content["records"] == 8 and result.structured_content["tokens"]["max_length"] == 1024
    values = [v for v, _, _ in seen]
    assert values == sorted(values) and len(set(values)) == len(values), seen  # only forward
    converting = [m for _, _, m in seen if "converting the GGUF's" in m]
    assert len(converting) >= 2, seen  # heard from during the conversion, not only before and after it
    assert seen[0][1] == 3.0 and seen[-1][0] == 3.0 and seen[-1][2].startswith("done")


def test_a_stage_record_is_never_written_over_not_even_one_made_before_records_were_numbered(tmp_path):
    from forge.runs import record_stage

    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "evaluate.json").write_text(json.dumps({"status": "succeeded", "table": ["first"]}))  # an old run's
    assert record_stage(tmp_path, "evaluate", {"status": "succeeded", "table": ["second"]}) == "stages/evaluate-2.json"
    kept = {p.name: json.loads(p.read_text()) for p in stages.glob("*.json")}
    assert kept["evaluate-1.json"] == {"status": "succeeded", "table": ["first"], "record": "stages/evaluate-1.json"}
    assert kept["evaluate-2.json"]["table"] == ["second"] == kept["evaluate.json"]["table"]
    # the same result again (a Modelfile kept as it was) keeps its record: nothing new, nothing written over
    assert record_stage(tmp_path, "evaluate", {"status": "succeeded", "table": ["second"]}) == "stages/evaluate-2.json"
    assert sorted(p.name for p in stages.glob("*.json")) == ["evaluate-1.json", "evaluate-2.json", "evaluate.json"]


def test_a_job_recorded_before_run_dir_meant_its_outputs_names_its_run(home, monkeypatch):
    from mcp_servers.lib import results
    from mcp_servers.lib.paths import job_dir
    from mcp_servers.lib.store import JobStore, Status

    run = home / "runs" / "velmora-r1"
    (run / "stages").mkdir(parents=True)
    store = JobStore(home / "forge.db")
    try:
        merge, _ = store.create("merge", {"adapter_dir": str(run / "adapter")}, job_id="merge-old")
        train, _ = store.create("train", {"output_dir": str(run)}, job_id="train-old")
        for job in (merge, train):  # as the runner stored them before: the job's own dir
            store.update(job["id"], run_dir=str(job_dir(home, job["id"])))
        store.transition("merge-old", Status.RUNNING)
        store.transition("merge-old", Status.SUCCEEDED, result={"merged_dir": str(run / "merged")})
        assert results.outputs_dir(store.get("merge-old"), home) == str(run)
        assert results.outputs_dir(store.get("train-old"), home) == str(run)  # still queued: its params say where
    finally:
        store.close()


async def test_a_train_from_a_gguf_base_says_in_its_status_that_the_weights_were_dequantized(server, home,
                                                                                              smollm2_gguf,
                                                                                              monkeypatch):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(smollm2_gguf.parent))
    async with Client(server) as client:
        assets = await call_ok(client, "forge_demo_assets", {"model": "smollm2"})
        handle = await call_ok(client, "forge_train", {
            "base_model": str(smollm2_gguf), "dataset": assets["dataset"],
            "hyperparameters": {"max_steps": 1, "per_device_train_batch_size": 1}})
        done = await wait_job(client, handle["job_id"])
        detail = json.loads((await client.read_resource(f"forge://jobs/{handle['job_id']}")).contents[0].text)
    assert done["status"] == "succeeded", done
    line = done["warnings"][0]  # one short line, the consequence first
    assert line.startswith("base weights dequantized from a GGUF (") and len(line) <= 120, done["warnings"]
    assert "not the original full-precision ones" in line
    whole = detail["warnings"][0]  # the resource: the whole line, with where the converted weights are
    assert whole.startswith(line.removesuffix("…")) and "converted" in whole and str(home) in whole
