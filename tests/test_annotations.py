"""Every tool's annotations are promises, and each one that can be exercised is: read-only tools change
no file and no row; idempotent tools give the same result twice; tools that say they are not idempotent
are not; non-destructive tools leave what exists alone, so a seal stays verifiable whatever comes after."""

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest
from mcp import Client

from helpers import call, call_ok, stop_runner, wait_job
from mcp_servers.forge.server import create_server
from mcp_servers.lib.store import Status

pytestmark = pytest.mark.anyio
VOLATILE = {"disk_free_bytes"}  # another process on the machine may write at any time


def tree(home: Path) -> dict:
    """Every file under FORGE_HOME with its hash, and every row of the job store."""
    files = {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(home.rglob("*")) if p.is_file() and not p.name.startswith("forge.db")}
    conn = sqlite3.connect(f"{(home / 'forge.db').as_uri()}?mode=ro", uri=True)
    rows = {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall()
            for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    return {"files": files, "rows": rows}


SPEC_DEFAULTS = {"read_only_hint": False, "destructive_hint": True, "idempotent_hint": False, "open_world_hint": True}


def hint(annotations, name: str) -> bool:
    """A hint as the MCP spec reads it: when a tool leaves it out, its default."""
    value = getattr(annotations, name)
    return SPEC_DEFAULTS[name] if value is None else value


def stable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in VOLATILE}


@pytest.fixture
async def world(home, assets, quantized, trained, monkeypatch):
    """A server with one finished chain in its FORGE_HOME (the session's run, copied in), a seal of it,
    and one queued job: something real for every tool to act on."""
    monkeypatch.setenv("FORGE_MAX_CONCURRENT_JOBS", "0")
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["model_dir"]).parent))
    run = home / "runs" / "sealed"
    shutil.copytree(trained["run_dir"], run)
    for modelfile in run.glob("gguf/Modelfile*"):  # another test file may have written one into the session's run
        modelfile.unlink()
    for record in (run / "stages").glob("*.json"):
        record.write_text(record.read_text(encoding="utf-8").replace(trained["run_dir"], str(run)), encoding="utf-8")
    server = create_server()
    # The copied run as the store would know it after its train job: a finished job whose result names it.
    store = server.runner.store
    finished, _ = store.create("train", {"base_model": assets["model_dir"], "output_dir": str(run)})
    store.transition(finished["id"], Status.RUNNING)
    store.transition(finished["id"], Status.SUCCEEDED, result={"run_dir": str(run)}, run_dir=str(run))
    async with Client(server) as client:
        queued = await call_ok(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"]})
        yield {"client": client, "server": server, "home": home, "run": run, "queued": queued["job_id"],
               "finished": finished["id"], "gguf": str(next(run.glob("gguf/*-Q4_K_M.gguf"))), "assets": assets}
    stop_runner(server.runner)


def read_only_calls(w: dict) -> dict:
    return {
        "forge_environment": {},
        "forge_validate_dataset": {"path": w["assets"]["dataset"], "base_model": w["assets"]["model_dir"]},
        "forge_query_model": {"model": w["gguf"], "prompt": "Hi", "max_tokens": 4},
        "forge_job_status": {"job_id": w["queued"]},
        "forge_job_list": {},
        "forge_job_events": {"job_id": w["queued"]},
        "forge_job_wait": {"job_id": w["queued"], "timeout_s": 0},
        "forge_seal_verify": {},
    }


async def test_every_tool_has_a_title_annotations_and_a_description_for_every_argument(world):
    tools = (await world["client"].list_tools()).tools
    assert len(tools) == 19
    for tool in tools:
        assert tool.title and tool.annotations is not None, tool.name
        assert len(tool.description) > 60 and "\n    " not in tool.description, tool.name  # dedented docstrings
        nested = {f"{d}.{n}": p for d, sub in tool.input_schema.get("$defs", {}).items()
                  for n, p in sub.get("properties", {}).items()}  # Message.role, Hyperparameters.lora_r, …
        for name, schema in {**tool.input_schema.get("properties", {}), **nested}.items():
            assert schema.get("description"), f"{tool.name}.{name} has no description"
    hints = {t.name: t.annotations for t in tools}
    read_only = {name for name in hints if hint(hints[name], "read_only_hint")}
    assert read_only == set(read_only_calls(world))  # the test below exercises each of them
    assert hint(hints["forge_publish"], "open_world_hint") and hint(hints["forge_publish"], "destructive_hint")
    assert not hint(hints["forge_seal_snapshot"], "idempotent_hint")
    assert not hint(hints["forge_modelfile"], "destructive_hint") and hint(hints["forge_modelfile"], "idempotent_hint")


async def test_read_only_tools_change_no_file_and_no_row(world):
    client = world["client"]
    await call_ok(client, "forge_seal_snapshot", {"job_ids": [world["finished"]], "note": "a seal to verify"})
    for name, args in read_only_calls(world).items():
        before = tree(world["home"])
        first = await call_ok(client, name, args)
        assert tree(world["home"]) == before, f"{name} changed FORGE_HOME"
        second = await call_ok(client, name, args)  # read-only tools are idempotent too
        assert stable(first) == stable(second), name


async def test_idempotent_writers_give_the_same_result_twice_and_change_nothing_the_second_time(world):
    client = world["client"]
    calls = {
        "forge_demo_assets": {"dir": str(world["home"] / "demo")},
        "forge_modelfile": {"gguf": world["gguf"], "system_prompt": "Be brief."},
        "forge_job_cancel": {"job_id": world["queued"]},
    }
    for name, args in calls.items():
        await call_ok(client, name, args)  # the first call has its effect
        before = tree(world["home"])
        second, third = await call_ok(client, name, args), await call_ok(client, name, args)
        assert second == third, name
        assert tree(world["home"]) == before, f"{name} repeated changed FORGE_HOME"


async def test_tools_that_are_not_idempotent_are_not(world):
    client, args = world["client"], {"job_ids": [world["finished"]]}
    one, two = await call_ok(client, "forge_seal_snapshot", args), await call_ok(client, "forge_seal_snapshot", args)
    assert one["seal_id"] != two["seal_id"] and two["previous"] == one["seal_id"]
    train = {"base_model": world["assets"]["model_dir"], "dataset": world["assets"]["dataset"]}
    first, second = await call_ok(client, "forge_train", train), await call_ok(client, "forge_train", train)
    assert first["job_id"] != second["job_id"]
    keyed = {**train, "client_request_id": "retry-1"}
    assert (await call_ok(client, "forge_train", keyed))["job_id"] == (await call_ok(client, "forge_train", keyed))[
        "job_id"]


async def test_a_sealed_modelfile_is_never_changed_and_every_seal_still_verifies(world):
    client = world["client"]
    first = await call_ok(client, "forge_modelfile", {"gguf": world["gguf"], "system_prompt": "Be brief."})
    sealed = await call_ok(client, "forge_seal_snapshot", {"job_ids": [world["finished"]]})
    content = Path(first["path"]).read_bytes()
    other = await call_ok(client, "forge_modelfile", {"gguf": world["gguf"], "system_prompt": "Be verbose.",
                                                      "parameters": {"temperature": 0.7}})
    again = await call_ok(client, "forge_modelfile", {"gguf": world["gguf"], "system_prompt": "Be verbose.",
                                                      "parameters": {"temperature": 0.7}})
    assert Path(first["path"]).read_bytes() == content  # not overwritten
    assert other["path"] != first["path"] and other["path"].endswith("Modelfile-2") and again == other
    assert "Be verbose." in Path(other["path"]).read_text(encoding="utf-8")
    verified = await call_ok(client, "forge_seal_verify", {"seal_id": sealed["seal_id"]})
    assert verified["ok"] and verified["mismatches"] == [] and verified["missing"] == []
    newest = await call_ok(client, "forge_seal_snapshot", {"job_ids": [world["finished"]]})
    record = await client.read_resource(f"forge://seals/{newest['seal_id']}")
    assert "Modelfile-2" in record.contents[0].text  # the new file is sealed next time


async def test_seal_snapshot_without_arguments_seals_the_newest_finished_chain(home, assets, monkeypatch):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["model_dir"]).parent))
    server = create_server()
    try:
        async with Client(server) as client:
            empty = await call(client, "forge_seal_snapshot", {})
            train = await call_ok(client, "forge_train", {"base_model": assets["model_dir"],
                                                          "dataset": assets["dataset"],
                                                          "hyperparameters": {"max_steps": 2}})
            await wait_job(client, train["job_id"])
            merge = await call_ok(client, "forge_merge", {"adapter": train["job_id"]})
            merged = await wait_job(client, merge["job_id"])
            sealed = await call_ok(client, "forge_seal_snapshot", {})
            record = await client.read_resource(f"forge://seals/{sealed['seal_id']}")
    finally:
        stop_runner(server.runner)
    assert empty["error"]["code"] == "job_not_found" and "job_ids" in empty["error"]["hint"]
    assert merged["next_actions"] == [f'forge_quantize(model="{merge["job_id"]}")']
    text = record.contents[0].text
    assert train["job_id"] in text and merge["job_id"] in text  # both jobs of the chain, one run
    assert sealed["next_actions"] == [f'forge_seal_verify(seal_id="{sealed["seal_id"]}")']
