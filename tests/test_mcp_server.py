"""The MCP server through the SDK's in-process client: every tool, jobs end to end, error paths."""

import json
import os
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client

from helpers import call, poll_status, wait_job

pytestmark = pytest.mark.anyio

TOOLS = {
    "forge_environment", "forge_demo_assets", "forge_validate_dataset", "forge_train", "forge_merge",
    "forge_quantize", "forge_evaluate", "forge_modelfile", "forge_query_model", "forge_seal_snapshot", "forge_pipeline",
    "forge_job_status", "forge_job_list", "forge_job_events", "forge_job_cancel", "forge_job_wait",
    "forge_seal_verify", "forge_publish", "forge_sweep",
}



async def test_tools_are_listed_with_descriptions_and_annotations(server):
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40
        assert tool.annotations is not None
    # hints equal to the spec's defaults are left out (destructive: true, read-only: false)
    assert tools["forge_job_status"].annotations.read_only_hint is True
    assert tools["forge_job_cancel"].annotations.destructive_hint in (True, None)
    assert tools["forge_train"].annotations.read_only_hint in (False, None)


async def test_environment_and_demo_assets(server, home):
    async with Client(server) as client:
        env = await call(client, "forge_environment")
        assets = await call(client, "forge_demo_assets")
    assert env["forge_home"] == str(home.resolve()) and "versions" in env
    assert Path(assets["model_dir"], "config.json").is_file() and assets["reused"] is False


async def test_validate_dataset_reports_every_bad_line(server, home):
    bad = home / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\nnot json\n', encoding="utf-8")
    async with Client(server) as client:
        out = await call(client, "forge_validate_dataset", {"path": str(bad)})
        assets = await call(client, "forge_demo_assets")
        good = await call(client, "forge_validate_dataset",
                          {"path": assets["dataset"], "base_model": assets["model_dir"]})
    assert out["error"]["code"] == "dataset_invalid" and len(out["error"]["message"]) > 20
    assert good["records"] == 60 and 0 < good["tokens"]["loss_token_share"] < 1


async def test_paths_outside_allowed_roots_are_refused(server, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    link = Path(os.environ["FORGE_HOME"]) / "sneaky.jsonl"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / "d.jsonl")
    async with Client(server) as client:
        direct = await call(client, "forge_validate_dataset", {"path": str(outside / "d.jsonl")})
        via_link = await call(client, "forge_validate_dataset", {"path": str(link)})
        monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(outside))
        allowed = await call(client, "forge_validate_dataset", {"path": str(outside / "d.jsonl")})
    assert direct["error"]["code"] == "path_not_allowed" and "FORGE_ALLOWED_ROOTS" in direct["error"]["hint"]
    assert via_link["error"]["code"] == "path_not_allowed"  # symlinks are followed before the check
    assert allowed["records"] == 1


async def test_unknown_job_and_bad_hyperparameters_are_clear_errors(server):
    async with Client(server) as client:
        missing = await call(client, "forge_job_status", {"job_id": "train-nope"})
        assets = await call(client, "forge_demo_assets")
        bad = await call(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                 "hyperparameters": {"epochz": 3}})
    assert missing["error"]["code"] == "job_not_found"
    assert bad["error"]["code"] == "invalid_argument" and "hyperparameters.epochz" in bad["error"]["message"]


@pytest.fixture(params=["in-process", "stdio"])
def connect(request, server, home):
    """A client of the in-process server, or of a second server process over stdio on the same FORGE_HOME."""
    if request.param == "in-process":
        return lambda: Client(server)
    from mcp import StdioServerParameters

    root = Path(__file__).resolve().parent.parent
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_servers.forge.server"],
                                   env={**os.environ, "FORGE_HOME": str(home)}, cwd=str(root))
    return lambda: Client(params, read_timeout_seconds=600)


async def test_stage_tools_one_by_one_from_train_to_seal(connect):
    async with connect() as client:
        assets = await call(client, "forge_demo_assets")
        handle = await call(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                    "hyperparameters": {"max_steps": 4, "learning_rate": 0.002},
                                                    "client_request_id": "req-1"})
        assert handle["status"] in ("queued", "running") and handle["poll_after_s"] > 0
        again = await call(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                   "client_request_id": "req-1"})
        assert again["job_id"] == handle["job_id"]  # idempotent by client_request_id
        progress = []
        async def on_progress(value, total, message):
            progress.append((value, message))

        train = await wait_job(client, handle["job_id"], on_progress=on_progress)
        assert train["status"] == "succeeded", train
        assert progress, "no progress notification while waiting"
        assert train["progress"]["step"] == 4 and train["progress"]["percent"] == 100.0
        assert train["metrics"]["train_loss"] > 0 and train["artifacts"]
        assert train["next_actions"][0].startswith("forge_merge")

        merge = await call(client, "forge_merge", {"adapter": handle["job_id"]})
        merged = await wait_job(client, merge["job_id"])
        assert merged["status"] == "succeeded", merged
        quant = await call(client, "forge_quantize", {"model": merge["job_id"], "quantizations": ["Q4_K_M"]})
        quantized = await wait_job(client, quant["job_id"])
        assert quantized["status"] == "succeeded", quantized
        ggufs = [a for a in quantized["artifacts"] if a["kind"] == "gguf"]
        assert {a["path"].rsplit("-", 1)[-1] for a in ggufs} == {"f16.gguf", "Q4_K_M.gguf"}
        assert [a["path"].endswith(".imatrix.gguf") for a in quantized["artifacts"] if a["kind"] == "imatrix"] == [True]
        # what the Q4_K_M lost against the f16, in the status an agent reads: measured, and said on what
        quality = quantized["quality"]
        assert [r["model"] for r in quality["rows"]] == ["Q4_K_M GGUF"]  # the f16 is the reference
        assert quality["rows"][0]["kld_mean"] > 0 and 4 < quality["rows"][0]["bpw"] < 6
        detail = json.loads((await client.read_resource(f"forge://jobs/{quant['job_id']}")).contents[0].text)
        rows = {r["model"]: r for r in detail["quality"]["rows"]}  # each row in full, in the job's resource
        assert rows["f16 GGUF"]["kld_mean"] < 1e-6 and rows["f16 GGUF"]["same_top_pct"] == 100.0
        assert rows["Q4_K_M GGUF"]["kld_mean"] > 0 and rows["Q4_K_M GGUF"]["imatrix"] is True
        assert quality["measured_on"].startswith("KLD and same top token over ")
        assert "Q4_K_M mean KLD" in quality["imatrix"] and "without" in quality["imatrix"]

        mf = await call(client, "forge_modelfile", {"gguf": quant["job_id"], "system_prompt": "Be brief.",
                                                    "parameters": {"temperature": 0.2}})
        assert mf["template_family"] == "chatml" and "<|im_end|>" in mf["stop_tokens"]
        reply = await call(client, "forge_query_model", {"model": quant["job_id"], "prompt": "What is LoRA?",
                                                         "max_tokens": 8})
        assert reply["completion_tokens"] >= 1 and reply["backend"] == "llama-cpp-python"
        sealed = await call(client, "forge_seal_snapshot", {"job_ids": [handle["job_id"]], "note": "stage by stage"})
        assert sealed["seal_id"].startswith("sha256:")
        record = await client.read_resource(f"forge://seals/{sealed['seal_id']}")
        assert json.loads(record.contents[0].text)["note"] == "stage by stage"

        listed = await call(client, "forge_job_list", {"kind": "train"})
        assert [j["job_id"] for j in listed["jobs"]] == [handle["job_id"]]
        events = await call(client, "forge_job_events", {"job_id": handle["job_id"], "limit": 2})
        assert len(events["events"]) == 2 and events["next_after"] == events["events"][-1]["seq"]
        log = await client.read_resource(f"forge://jobs/{handle['job_id']}/log")
        assert "starting" in log.contents[0].text and "Traceback" not in log.contents[0].text
        status = await client.read_resource(f"forge://jobs/{handle['job_id']}")
        assert json.loads(status.contents[0].text)["status"] == "succeeded"


async def test_cancel_mid_train_leaves_a_checkpoint_and_resume_from_job_alone_finishes_the_schedule(server):
    async with Client(server) as client:
        assets = await call(client, "forge_demo_assets")
        handle = await call(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                    "hyperparameters": {"max_steps": 300, "save_steps": 1000}})
        with anyio.fail_after(600):
            while ((await call(client, "forge_job_status", {"job_id": handle["job_id"]}))["progress"].get("step")
                   or 0) < 3:
                await anyio.sleep(0.2)
        cancelling = await call(client, "forge_job_cancel", {"job_id": handle["job_id"]})
        assert cancelling["status"] in ("cancelling", "cancelled")
        done = await wait_job(client, handle["job_id"])
        assert done["status"] == "cancelled", done
        checkpoints = sorted(Path(done["run_dir"]).glob("checkpoints/checkpoint-*"))
        assert checkpoints, "cancel did not leave a checkpoint"
        saved_step = int(checkpoints[-1].name.split("-")[1])
        assert 3 <= saved_step < 300

        # a schedule the checkpoint already reached is refused with the numbers, whether given or inherited
        too_short = await call(client, "forge_train", {"resume_from_job": handle["job_id"],
                                                       "hyperparameters": {"max_steps": saved_step}})
        # nothing but the job: its base model, dataset, run dir and schedule come from it
        resumed = await call(client, "forge_train", {"resume_from_job": handle["job_id"],
                                                     "hyperparameters": {"save_steps": 50}})
        twice = await call(client, "forge_train", {"resume_from_job": handle["job_id"]})  # continued once, no more
        final = await wait_job(client, resumed["job_id"])
        finished = await call(client, "forge_train", {"resume_from_job": resumed["job_id"]})
        adapter = Path(final["artifacts"][0]["path"])  # a train job's status lists its adapter weights
        before = adapter.read_bytes()
        # a finished run extended: in a run dir of its own, from a copy of its last checkpoint
        extended = await call(client, "forge_train", {"resume_from_job": resumed["job_id"],
                                                      "hyperparameters": {"max_steps": 305}})
        longer = await wait_job(client, extended["job_id"])
        other_model = await call(client, "forge_train", {"resume_from_job": resumed["job_id"],
                                                         "base_model": assets["dataset"]})
        listed = await call(client, "forge_job_list", {"kind": "train"})
    assert resumed["note"] == (f"continues {handle['job_id']} from checkpoint-{saved_step} (step {saved_step} of 300)"
                               "; changed: save_steps: 1000 -> 50")
    assert twice["error"]["code"] == "already_resumed" and resumed["job_id"] in twice["error"]["message"]
    assert final["status"] == "succeeded", final
    assert final["metrics"]["global_step"] == 300 and final["metrics"]["train_loss"] > 0
    assert longer["status"] == "succeeded" and longer["metrics"]["global_step"] == 305, longer
    assert extended["note"].startswith(f"extends {resumed['job_id']} from checkpoint-300 (step 300 of 305)")
    assert longer["run_dir"] != final["run_dir"] and adapter.read_bytes() == before  # the finished run untouched
    assert final["metrics"]["resumed_from"].endswith(f"checkpoint-{saved_step}")
    assert final["inputs"]["base_model"] == assets["model_dir"] and final["inputs"]["max_steps"] == 300
    assert final["run_dir"] is not None and Path(final["artifacts"][0]["path"]).is_relative_to(done["run_dir"])
    for refused, reached in ((finished, 300), (too_short, saved_step)):
        error = refused["error"]
        assert error["code"] == "schedule_complete" and "max_steps=" in error["hint"], error
        assert f"step_reached: {reached}" in error["details"] and f"steps_planned: {reached}" in error["details"]
    assert other_model["error"]["code"] == "invalid_argument" and "base_model" in other_model["error"]["message"]
    assert len(listed["jobs"]) == 3  # the refusals queued nothing


async def test_queued_jobs_wait_behind_the_concurrency_limit_and_cancel_cleanly(server):
    async with Client(server) as client:
        assets = await call(client, "forge_demo_assets")
        args = {"base_model": assets["model_dir"], "dataset": assets["dataset"], "hyperparameters": {"max_steps": 5000}}
        first = await call(client, "forge_train", args)
        second = await call(client, "forge_train", args)
        assert second["status"] == "queued" and second["queue_position"] == 1
        cancelled = await call(client, "forge_job_cancel", {"job_id": second["job_id"]})
        assert cancelled["status"] == "cancelled"
        killed = await call(client, "forge_job_cancel", {"job_id": first["job_id"], "force": True})
        assert killed["status"] == "cancelled"


async def test_a_crashing_worker_fails_its_job_with_a_code_and_the_server_stays_up(server):
    import signal

    async with Client(server) as client:
        assets = await call(client, "forge_demo_assets")
        handle = await call(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                    "hyperparameters": {"max_steps": 5000}})
        with anyio.fail_after(600):
            while (await call(client, "forge_job_status", {"job_id": handle["job_id"]}))["stage"] != "training":
                await anyio.sleep(0.2)
        os.kill(server.runner.store.get(handle["job_id"])["pid"], signal.SIGSEGV)
        status = await wait_job(client, handle["job_id"])
        assert status["status"] == "failed"
        assert status["error"]["code"] == "worker_crashed" and "SIGSEGV" in status["error"]["message"]
        assert status["error"]["retryable"] is True
        env = await call(client, "forge_environment")  # the server still answers
        assert env["python"]


async def test_pipeline_status_shows_each_child_stage_and_the_token_never_leaks(server, home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_NEVER_SHOW_THIS_TOKEN")
    async with Client(server) as client:
        assets = await call(client, "forge_demo_assets")
        handle = await call(client, "forge_pipeline", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                       "hyperparameters": {"max_steps": 3}})
        status, seen_percents = await poll_status(client, handle["job_id"])
        assert status["status"] == "succeeded", status
        assert status["stages"] == {}  # once a pipeline succeeded, every stage did: its resource lists them
        detail = json.loads((await client.read_resource(f"forge://jobs/{handle['job_id']}")).contents[0].text)
        assert list(detail["stages"].items()) == [
            (name, "succeeded") for name in ("train", "merge", "quantize", "evaluate", "modelfile", "seal")]
        assert status["progress"]["percent"] == 100.0 and seen_percents == sorted(seen_percents)
        texts = [json.dumps(status)]
        events = await call(client, "forge_job_events", {"job_id": handle["job_id"], "limit": 200})
        texts.append(json.dumps(events))
        texts.append((await client.read_resource(f"forge://jobs/{handle['job_id']}/log")).contents[0].text)
    run_dir = Path(status["run_dir"])
    texts += [p.read_text(encoding="utf-8", errors="replace") for p in run_dir.rglob("*")
              if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".log", "")]
    texts.append((home / "forge.db").read_bytes().decode("utf-8", errors="replace"))
    assert len(texts) > 5 and all(texts[:3])  # status, events and log were all read
    assert not any("hf_NEVER_SHOW_THIS_TOKEN" in t for t in texts)


class _FakeOllama:
    """A stand-in for a running Ollama (an outside service that cannot be installed here): the two
    endpoints forge_query_model uses, on 127.0.0.1, recording what it received."""

    def __init__(self, models):
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.path, body))
                if body.get("model") not in models:
                    self.send_response(404)
                    self.end_headers()
                    return
                message = {"role": "assistant", "content": "Hi from Ollama."}
                if body.get("tools"):  # Ollama parses the calls and answers them apart from the text
                    message = {"role": "assistant", "content": "", "tool_calls": [{"function": {
                        "index": 0, "name": body["tools"][0]["function"]["name"], "arguments": {"city": "Oslo"}}}]}
                reply = {"model": body["model"]} if self.path == "/api/show" else {
                    "message": message, "done_reason": "stop", "prompt_eval_count": 9, "eval_count": 4}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


async def test_query_model_uses_a_running_ollama_when_it_has_the_model(server, monkeypatch):
    ollama = _FakeOllama(models={"my-tuned-model"})
    monkeypatch.setenv("OLLAMA_HOST", ollama.host)
    try:
        async with Client(server) as client:
            reply = await call(client, "forge_query_model", {"model": "my-tuned-model", "prompt": "Hi"})
            missing = await call(client, "forge_query_model", {"model": "not-there", "prompt": "Hi"})
    finally:
        ollama.close()
    assert reply == {"model": "my-tuned-model", "reply": "Hi from Ollama.", "finish_reason": "stop",
                     "prompt_tokens": 9, "completion_tokens": 4, "backend": "ollama", "tool_calls": None,
                     "unparsed_calls": None}
    chat = [body for path, body in ollama.received if path == "/api/chat"][0]
    assert chat["messages"] == [{"role": "user", "content": "Hi"}] and chat["stream"] is False
    assert missing["error"]["code"] == "model_not_found"


async def test_query_model_passes_tools_to_ollama_and_returns_its_calls(server, monkeypatch):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string"}}, "required": ["city"]}}}]
    ollama = _FakeOllama(models={"my-tools-model"})
    monkeypatch.setenv("OLLAMA_HOST", ollama.host)
    try:
        async with Client(server) as client:
            reply = await call(client, "forge_query_model", {"model": "my-tools-model", "prompt": "Oslo?",
                                                             "tools": tools})
    finally:
        ollama.close()
    chat = [body for path, body in ollama.received if path == "/api/chat"][0]
    assert chat["tools"][0]["function"]["name"] == "get_weather"
    assert reply["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert reply["unparsed_calls"] == 0 and reply["backend"] == "ollama"


async def test_seal_verify_resources_and_publish_through_mcp(server, home, monkeypatch):
    import huggingface_hub.constants

    from fake_hub import FakeHub

    hub = FakeHub("hf_mcp_publish_token_42")
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_mcp_publish_token_42")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        async with Client(server) as client:
            assets = await call(client, "forge_demo_assets")
            handle = await call(client, "forge_pipeline", {"base_model": assets["model_dir"],
                                                           "dataset": assets["dataset"],
                                                           "hyperparameters": {"max_steps": 3}})
            done = await wait_job(client, handle["job_id"])
            assert done["status"] == "succeeded", done
            sealed = await call(client, "forge_seal_snapshot", {"job_ids": [handle["job_id"]], "note": "mcp"})
            assert sealed["previous"]  # the pipeline sealed once already: this one chains to it
            verified = await call(client, "forge_seal_verify", {"seal_id": sealed["seal_id"]})
            assert verified["ok"] and verified["chain_length"] == 2
            retro = await client.read_resource(f"forge://seals/{sealed['seal_id']}/retrospective")
            assert retro.contents[0].text.startswith("# Retrospective")
            record = json.loads((await client.read_resource(f"forge://seals/{sealed['seal_id']}")).contents[0].text)
            assert record["jobs"][0]["id"] == handle["job_id"] and record["note"] == "mcp"

            gguf_dir = str(Path(done["run_dir"]) / "gguf")
            plan_job = await call(client, "forge_publish", {"source": gguf_dir, "repo_id": "me/tiny", "kind": "gguf",
                                                            "dry_run": True})
            plan = await wait_job(client, plan_job["job_id"])
            assert plan["status"] == "succeeded" and plan["result"]["plan"]["repo_id"] == "me/tiny"
            assert hub.requests == []
            pub_job = await call(client, "forge_publish", {"source": gguf_dir, "repo_id": "me/tiny", "kind": "gguf"})
            pub = await wait_job(client, pub_job["job_id"])
            assert pub["status"] == "succeeded", pub
            assert "README.md" in hub.commits[0]["files"]
            log = (await client.read_resource(f"forge://jobs/{pub_job['job_id']}/log")).contents[0].text
            events = await call(client, "forge_job_events", {"job_id": pub_job["job_id"], "limit": 200})
        leaks = [json.dumps(pub), json.dumps(plan), log, json.dumps(events),
                 (home / "forge.db").read_bytes().decode("utf-8", errors="replace")]
        leaks += [p.read_text(encoding="utf-8", errors="replace") for p in (home / "seals").rglob("*.json")]
        assert not any("hf_mcp_publish_token_42" in text for text in leaks)
    finally:
        hub.close()
