"""Path escapes: every way an agent's arguments (or files planted inside the roots) could make Forge read
or write outside FORGE_HOME and FORGE_ALLOWED_ROOTS.

Each case builds an "outside" dir (not under any root) holding a canary, a valid dataset and a copy of the
tiny model, then asserts what a user would see: one structured error with a code an agent can branch on
(or, for the legitimate controls, success), no outside content in any reply, and nothing written outside.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mcp import Client

from forge.errors import ForgeError
from forge.paths import confinement
from helpers import call, stop_runner, wait_job
from mcp_servers.forge.server import create_server

pytestmark = pytest.mark.anyio

CANARY = f"CANARY-{uuid.uuid4().hex}-do-not-leak"
REFUSALS = {"path_not_allowed", "invalid_argument", "file_not_found", "model_not_found", "job_not_found"}
OK = "ok"
ERROR_KEYS = {"code", "message", "hint", "retryable", "details"}
JOB_ID = "train-20261128-101500-3f9a1c"

PATH_NOT_ALLOWED = {"path_not_allowed"}
INVALID = {"invalid_argument"}
PATH_REFUSED = {"path_not_allowed", "model_not_found"}  # a path form, refused: outside, or not there


def _records(marker: str, n: int = 8) -> bytes:
    rows = [{"instruction": f"Say {marker} number {i}.", "input": "", "output": f"{marker} {i}."} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def listing(root: Path) -> dict:
    """Everything under root (links not followed): type, size, mtime, and the hash of small files."""
    seen = {}
    for current, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(current) / name
            st = os.lstat(path)
            digest = None
            if stat.S_ISREG(st.st_mode) and st.st_size < (1 << 20):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return seen


def _link(link: Path, target: Path | str) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


@pytest.fixture
def w(home, tmp_path, monkeypatch, assets):
    """The world of one case: FORGE_HOME with legitimate inputs and planted links, and the outside dir."""
    monkeypatch.delenv("FORGE_ALLOWED_ROOTS", raising=False)
    monkeypatch.setenv("FORGE_MAX_CONCURRENT_JOBS", "0")  # submit-time checks only: jobs stay queued
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    home.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text(CANARY + "\n", encoding="utf-8")
    (outside / "d.jsonl").write_bytes(_records(CANARY))
    shutil.copytree(assets["model_dir"], outside / "model")
    (outside / "model" / "README.md").write_text(CANARY, encoding="utf-8")
    (outside / "adapter").mkdir()
    (outside / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(outside / "model"), "peft_type": "LORA", "note": CANARY}), encoding="utf-8")
    (outside / "adapter" / "adapter_model.safetensors").write_text(CANARY, encoding="utf-8")
    (outside / "x.gguf").write_bytes(b"GGUF" + CANARY.encode())
    (outside / "record.json").write_text(json.dumps({"status": "succeeded", "method": CANARY}), encoding="utf-8")
    (outside / "progress.jsonl").write_text(json.dumps({"event": "warning", "message": CANARY}) + "\n",
                                            encoding="utf-8")
    (outside / "run" / "stages").mkdir(parents=True)
    (outside / "run" / "stages" / "train.json").write_text(json.dumps({"status": "succeeded", "method": CANARY}),
                                                           encoding="utf-8")
    (outside / "sealdir").mkdir()
    (outside / "sealdir" / "seal.sha256").write_text(f"sha256:abcd1234{CANARY}\n", encoding="utf-8")
    (outside / "sealdir" / "seal.json").write_text(json.dumps({"runs": [], "note": CANARY}), encoding="utf-8")
    (outside / "sealdir" / "retrospective.md").write_text(CANARY, encoding="utf-8")

    # Legitimate inputs inside FORGE_HOME.
    (home / "data.jsonl").write_bytes(_records("inside"))
    adapter = home / "runs" / "r" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "owner/name", "peft_type": "LORA"}), encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (home / "models" / "m").mkdir(parents=True)
    (home / "models" / "m" / "config.json").write_text(json.dumps({"model_type": "qwen2"}), encoding="utf-8")
    (home / "g").mkdir()
    (home / "g" / "x.gguf").write_bytes(b"GGUF" + b"\0" * 60)

    # Links planted inside FORGE_HOME that lead outside.
    _link(home / "link.jsonl", outside / "d.jsonl")
    _link(home / "linkdir", outside)
    _link(home / "linkmodel", outside / "model")
    _link(home / "rel.jsonl", Path("..") / "outside" / "d.jsonl")
    _link(home / "chain2.jsonl", outside / "d.jsonl")
    _link(home / "chain1.jsonl", home / "chain2.jsonl")
    _link(home / "future.jsonl", outside / "future.jsonl")
    _link(home / "futuredir", outside / "newdir")
    _link(home / "loop1", home / "loop2")
    _link(home / "loop2", home / "loop1")

    cwd = tmp_path / "cwd"  # a neutral working dir outside the roots; cases that need another one chdir
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    world = SimpleNamespace(home=home.resolve(), outside=outside, tmp=tmp_path, cwd=cwd, adapter=adapter,
                            monkeypatch=monkeypatch)
    world.before = listing(outside)
    yield world


@pytest.fixture
def server(w):
    srv = create_server()
    yield srv
    stop_runner(srv.runner)


def assert_untouched(w) -> None:
    assert listing(w.outside) == w.before, "something was written under the outside dir"
    assert not Path("/abs").exists()


def assert_answer(reply: dict, codes) -> None:
    """The reply a user sees: success for a legitimate input, else one structured error of an expected code;
    never the canary's text, a traceback, or the SDK's generic wrapper."""
    text = json.dumps(reply, default=str)
    assert CANARY not in text, f"outside content leaked into the reply: {text[:500]}"
    assert "Traceback" not in text and "Error executing tool" not in text, text[:500]
    if codes == OK:
        assert "error" not in reply, reply
        return
    assert "error" in reply, f"expected one of {sorted(codes)}, got success: {text[:500]}"
    error = reply["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["code"] in codes, f"expected one of {sorted(codes)}, got {error['code']}: {error['message'][:300]}"
    assert error["code"] in REFUSALS | {"seal_not_found"}, error


# ---- the call table: tool, legitimate base arguments, and the attack's overrides ----

BASE: dict[str, dict] = {
    "forge_train": {"base_model": "owner/name", "dataset": "{home}/data.jsonl"},
    "forge_pipeline": {"base_model": "owner/name", "dataset": "{home}/data.jsonl"},
    "forge_merge": {"adapter": "{home}/runs/r/adapter"},
    "forge_quantize": {"model": "{home}/models/m"},
    "forge_evaluate": {"run": "{home}/runs/r"},
    "forge_publish": {"source": "{home}/runs/r/adapter", "repo_id": "me/tiny", "dry_run": True},
    "forge_demo_assets": {},
    "forge_validate_dataset": {"path": "{home}/data.jsonl"},
    "forge_modelfile": {"gguf": "{home}/g/x.gguf"},
    "forge_query_model": {"model": "{home}/g/x.gguf", "prompt": "hi"},
}
NAME_ARG = {"forge_train": "run_name", "forge_pipeline": "run_name", "forge_merge": "merged_name",
            "forge_quantize": "gguf_name"}


def _fill(value, w):
    if isinstance(value, str):
        return value.replace("{home}", str(w.home)).replace("{outside}", str(w.outside)).replace("{tmp}", str(w.tmp))
    return value


def arguments(w, tool: str, overrides: dict) -> dict:
    args = {**BASE[tool], **overrides}
    return {k: _fill(v, w) for k, v in args.items()}


async def run_case(server, w, tool: str, overrides: dict, codes, cwd: str | None = None) -> dict:
    if cwd == "home":
        w.monkeypatch.chdir(w.home)
    async with Client(server) as client:
        reply = await call(client, tool, arguments(w, tool, overrides))
    assert_answer(reply, codes)
    assert_untouched(w)
    return reply


# 1. Output names: a plain name or nothing.

BAD_NAMES = [
    ("dotdot-to-outside", "../../outside/x"),
    ("dotdot-deeper", "../../../outside/x"),
    ("absolute-outside", "{outside}/x"),
    ("absolute-root", "/abs/x"),
    ("slash", "a/b"),
    ("dotdot", ".."),
    ("dot", "."),
    ("inner-traversal", "x/../../y"),
    ("nul", "x\x00y"),
    ("300-chars", "a" * 300),
    ("space", "a b"),
    ("semicolon", "a;rm -rf x"),
    ("trailing-newline", "name\n"),
    ("backslash-traversal", "..\\..\\x"),
    ("tilde", "~"),
    ("leading-dash", "-rf"),
]


@pytest.mark.parametrize("name", [pytest.param(v, id=i) for i, v in BAD_NAMES])
@pytest.mark.parametrize("tool", list(NAME_ARG))
async def test_output_names_must_be_plain_names(server, w, tool, name):
    await run_case(server, w, tool, {NAME_ARG[tool]: name}, INVALID)
    assert server.runner.store.list(limit=5) == []  # nothing was queued
    assert not (w.home / "runs" / "x").exists() and not (w.tmp / "x").exists() and not (w.tmp / "y").exists()


@pytest.mark.parametrize("tool", list(NAME_ARG))
async def test_a_plain_output_name_is_accepted(server, w, tool):
    reply = await run_case(server, w, tool, {NAME_ARG[tool]: "ok-run_1.v2"}, OK)
    job = server.runner.store.get(reply["job_id"])
    assert job["status"] == "queued"
    if tool in ("forge_train", "forge_pipeline"):
        assert job["params"]["output_dir"] == str(w.home / "runs" / "ok-run_1.v2")
    if tool == "forge_merge":
        assert job["params"]["output_dir"] == str(w.home / "runs" / "r" / "ok-run_1.v2")


# 2. Input paths outside the roots: absolute, ../ from FORGE_HOME's path, and ../ relative to FORGE_HOME.

INPUTS = [
    ("train-dataset", "forge_train", "dataset", "d.jsonl"),
    ("train-base_model", "forge_train", "base_model", "model"),
    ("pipeline-dataset", "forge_pipeline", "dataset", "d.jsonl"),
    ("pipeline-base_model", "forge_pipeline", "base_model", "model"),
    ("merge-adapter", "forge_merge", "adapter", "adapter"),
    ("merge-base_model", "forge_merge", "base_model", "model"),
    ("quantize-model", "forge_quantize", "model", "model"),
    ("quantize-adapter", "forge_quantize", "model", "adapter"),
    ("quantize-imatrix", "forge_quantize", "imatrix", "x.gguf"),
    ("evaluate-run", "forge_evaluate", "run", "adapter"),
    ("evaluate-dataset", "forge_evaluate", "dataset", "d.jsonl"),
    ("modelfile-gguf", "forge_modelfile", "gguf", "x.gguf"),
    ("publish-source", "forge_publish", "source", "adapter"),
    ("demo-dir", "forge_demo_assets", "dir", "demo"),
    ("validate-path", "forge_validate_dataset", "path", "d.jsonl"),
    ("validate-base_model", "forge_validate_dataset", "base_model", "model"),
    ("query-model", "forge_query_model", "model", "x.gguf"),
]
FORMS = [
    ("absolute", "{outside}/%s", None),
    ("home-dotdot", "{home}/../outside/%s", None),
    ("relative-dotdot", "../outside/%s", "home"),
]


@pytest.mark.parametrize("template,cwd", [pytest.param(*f[1:], id=f[0]) for f in FORMS])
@pytest.mark.parametrize("tool,arg,target", [pytest.param(*i[1:], id=i[0]) for i in INPUTS])
async def test_inputs_outside_the_roots_are_refused(server, w, tool, arg, target, template, cwd):
    await run_case(server, w, tool, {arg: template % target}, PATH_NOT_ALLOWED, cwd=cwd)
    assert not (w.outside / "demo").exists()


# 3. Links inside an allowed dir leading outside: followed before the check.

LINKS = [
    ("file-link-train-dataset", "forge_train", {"dataset": "{home}/link.jsonl"}),
    ("file-link-pipeline-dataset", "forge_pipeline", {"dataset": "{home}/link.jsonl"}),
    ("file-link-validate", "forge_validate_dataset", {"path": "{home}/link.jsonl"}),
    ("relative-link-validate", "forge_validate_dataset", {"path": "{home}/rel.jsonl"}),
    ("link-chain-train-dataset", "forge_train", {"dataset": "{home}/chain1.jsonl"}),
    ("dangling-link-train-dataset", "forge_train", {"dataset": "{home}/future.jsonl"}),
    ("dir-link-train-base_model", "forge_train", {"base_model": "{home}/linkdir/model"}),
    ("model-link-train-base_model", "forge_train", {"base_model": "{home}/linkmodel"}),
    ("dir-link-pipeline-base_model", "forge_pipeline", {"base_model": "{home}/linkmodel"}),
    ("dir-link-merge-adapter", "forge_merge", {"adapter": "{home}/linkdir/adapter"}),
    ("dir-link-merge-base_model", "forge_merge", {"base_model": "{home}/linkmodel"}),
    ("dir-link-quantize-model", "forge_quantize", {"model": "{home}/linkmodel"}),
    ("dir-link-quantize-adapter", "forge_quantize", {"model": "{home}/linkdir/adapter"}),
    ("dir-link-evaluate-run", "forge_evaluate", {"run": "{home}/linkdir/adapter"}),
    ("file-link-evaluate-dataset", "forge_evaluate", {"dataset": "{home}/link.jsonl"}),
    ("dir-link-publish-source", "forge_publish", {"source": "{home}/linkdir/adapter"}),
    ("dir-link-demo-dir", "forge_demo_assets", {"dir": "{home}/linkdir/demo"}),
    ("dangling-dir-link-demo-dir", "forge_demo_assets", {"dir": "{home}/futuredir"}),
    ("dir-link-validate-path", "forge_validate_dataset", {"path": "{home}/linkdir/d.jsonl"}),
    ("dir-link-validate-base_model", "forge_validate_dataset", {"base_model": "{home}/linkmodel"}),
    ("dir-link-modelfile-gguf", "forge_modelfile", {"gguf": "{home}/linkdir/x.gguf"}),
    ("dir-link-query-model", "forge_query_model", {"model": "{home}/linkdir/x.gguf"}),
]


@pytest.mark.parametrize("tool,overrides", [pytest.param(*c[1:], id=c[0]) for c in LINKS])
async def test_links_leading_outside_are_followed_and_refused(server, w, tool, overrides):
    await run_case(server, w, tool, overrides, PATH_NOT_ALLOWED)
    assert not (w.outside / "newdir").exists() and not (w.outside / "demo").exists()


async def test_a_link_loop_is_an_argument_error_not_a_crash(server, w):
    await run_case(server, w, "forge_validate_dataset", {"path": "{home}/loop1"}, INVALID | {"file_not_found"})


async def _run_queued_job(server, w, tool: str, overrides: dict) -> tuple[dict, dict]:
    """Submit (queued), then let the runner start it; return the submit reply and the final status."""
    async with Client(server) as client:
        reply = await call(client, tool, arguments(w, tool, overrides))
        if "error" in reply:
            return reply, {}
        server.runner.max_concurrent = 1
        server.runner.pump()
        status = await wait_job(client, reply["job_id"], deadline_s=180)
        events = await call(client, "forge_job_events", {"job_id": reply["job_id"], "limit": 200})
    assert CANARY not in json.dumps(events, default=str)
    return reply, status


def _assert_refused_naming(reply: dict, status: dict, link: Path) -> None:
    """Refused at submit, or the job failed with path_not_allowed naming the link; no outside content anywhere."""
    assert CANARY not in json.dumps([reply, status], default=str)
    if "error" in reply:
        assert reply["error"]["code"] == "path_not_allowed", reply
        said = reply["error"]["message"] + " ".join(reply["error"]["details"])
    else:
        assert status["status"] == "failed", status
        assert status["error"]["code"] == "path_not_allowed", status["error"]
        assert not status.get("result"), status["result"]  # no plan, no output
        said = status["error"]["message"]
    assert link.name in said, said


@pytest.mark.parametrize("tool,inside,overrides", [
    pytest.param("forge_publish", "runs/r/adapter", {"dry_run": True}, id="publish-dry-run-source"),
    pytest.param("forge_merge", "runs/r/adapter", {}, id="merge-adapter"),
    pytest.param("forge_quantize", "models/m", {}, id="quantize-model"),
])
async def test_a_link_inside_an_input_dir_is_refused_before_anything_is_read(server, w, tool, inside, overrides):
    link = _link(w.home / inside / "extra.bin", w.outside / "canary.txt")
    reply, status = await _run_queued_job(server, w, tool, overrides)
    _assert_refused_naming(reply, status, link)
    assert_untouched(w)


async def test_an_adapter_swapped_for_a_link_after_submit_is_refused_when_the_job_runs(server, w):
    async with Client(server) as client:
        reply = await call(client, "forge_merge", arguments(w, "forge_merge", {}))
        assert reply["status"] == "queued"
        w.adapter.rename(w.adapter.with_name("adapter.orig"))
        _link(w.adapter, w.outside / "adapter")
        server.runner.max_concurrent = 1
        server.runner.pump()
        status = await wait_job(client, reply["job_id"], deadline_s=180)
    assert status["status"] == "failed" and status["error"]["code"] == "path_not_allowed", status
    assert CANARY not in json.dumps(status, default=str)
    assert_untouched(w)


def _seal_run(w, name: str = "s") -> Path:
    run = w.home / "runs" / name
    (run / "stages").mkdir(parents=True)
    (run / "stages" / "train.json").write_text(json.dumps(
        {"status": "succeeded", "method": "lora", "base_model": "owner/name", "metrics": {}}), encoding="utf-8")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    return run


def _plant(w, run: Path, where: str, target: str) -> list[Path]:
    if where == "run_dir":
        return [w.outside / "run"]
    if where == "run_dir_link":
        return [_link(w.home / "runs" / "linkrun", w.outside / "run")]
    if where == "adapter_dir":
        shutil.rmtree(run / "adapter")
        where = "adapter"
    elif (run / where).is_file():
        (run / where).unlink()
    _link(run / where.replace("{pid}", str(os.getpid())), w.outside / target)
    return [run]


SEAL_LINKS = [
    ("adapter-file-link", "adapter/extra.bin", "canary.txt"),
    ("adapter-dir-link", "adapter_dir", "adapter"),
    ("chat-template-link", "adapter/chat_template.jinja", "canary.txt"),
    ("merged-weights-link", "merged/model.safetensors", "model/model.safetensors"),
    ("gguf-link", "gguf/x.gguf", "x.gguf"),
    ("modelfile-link", "gguf/Modelfile", "canary.txt"),
    ("stages-record-link", "stages/train.json", "record.json"),
    ("train-config-link", "train_config.json", "record.json"),
    ("progress-link", "progress.jsonl", "progress.jsonl"),
    ("retrospective-link", "retrospective.md", "canary.txt"),
    ("retrospective-tmp-link", ".retrospective.md.tmp-{pid}", "canary.txt"),
    ("run-dir-outside", "run_dir", ""),
    ("run-dir-link", "run_dir_link", ""),
]


@pytest.mark.parametrize("where,target", [pytest.param(*c[1:], id=c[0]) for c in SEAL_LINKS])
def test_sealing_a_run_with_a_link_leading_outside_is_refused(w, where, target):
    from forge.seal import SealConfig, seal

    run = _seal_run(w)
    if where.startswith(("merged/", "gguf/")):
        (run / where).parent.mkdir(exist_ok=True)
    run_dirs = _plant(w, run, where, target)
    if ".tmp-" in where:
        # A link planted where a temp file might go is simply never used (temp names are unguessable):
        # the seal succeeds and the file it points at is left as it was (assert_untouched below).
        with confinement():
            seal(SealConfig(run_dirs=run_dirs))
    else:
        with confinement(), pytest.raises(ForgeError) as err:
            seal(SealConfig(run_dirs=run_dirs))
        assert err.value.code == "path_not_allowed", f"{err.value.code}: {err.value.message[:300]}"
        assert CANARY not in json.dumps(err.value.to_dict())
    sealed = [p for p in (w.home / "seals").rglob("*") if p.is_file()] if (w.home / "seals").is_dir() else []
    leaked = [str(p) for p in sealed if CANARY in p.read_text(encoding="utf-8", errors="replace")]
    assert not leaked, f"outside content copied into the workspace: {leaked}"
    assert_untouched(w)


# Seals and job logs read back through tools and resources.

SEAL_PLANTS = [
    ("seal-dir-link", "dir"),
    ("seal-record-link", "record"),
    ("seal-head-link", "head"),
]


def _plant_seal(w, how: str) -> str | None:
    seals = w.home / "seals"
    seals.mkdir(parents=True, exist_ok=True)
    if how == "dir":
        _link(seals / "20261128-101500-abcd1234", w.outside / "sealdir")
        return "abcd1234"
    if how == "record":
        real = seals / "20261128-101500-abcd1234"
        real.mkdir()
        (real / "seal.sha256").write_text("sha256:abcd1234\n", encoding="utf-8")
        _link(real / "seal.json", w.outside / "sealdir" / "seal.json")
        _link(real / "retrospective.md", w.outside / "sealdir" / "retrospective.md")
        return "abcd1234"
    _link(seals / "HEAD", w.outside / "canary.txt")
    return None


@pytest.mark.parametrize("how", [pytest.param(h, id=i) for i, h in SEAL_PLANTS])
async def test_seal_verify_does_not_read_through_planted_links(server, w, how):
    seal_id = _plant_seal(w, how)
    args = {"seal_id": seal_id} if seal_id else {}
    async with Client(server) as client:
        reply = await call(client, "forge_seal_verify", args)
    assert_answer(reply, PATH_NOT_ALLOWED | {"seal_not_found"})
    assert_untouched(w)


@pytest.mark.parametrize("how,suffix", [
    pytest.param("dir", "", id="seal-dir-link-record"),
    pytest.param("record", "", id="seal-record-link-record"),
    pytest.param("record", "/retrospective", id="seal-record-link-retrospective"),
])
async def test_seal_resources_do_not_read_through_planted_links(server, w, how, suffix):
    seal_id = _plant_seal(w, how)
    async with Client(server) as client:
        try:
            got = await client.read_resource(f"forge://seals/{seal_id}{suffix}")
            text = json.dumps([c.model_dump() for c in got.contents], default=str)
        except Exception as exc:  # a refusal: fine, as long as it carries no outside content
            text = str(exc)
    assert CANARY not in text, f"outside content served as a seal: {text[:300]}"
    assert_untouched(w)


async def test_a_job_log_planted_as_a_link_is_not_served(server, w):
    async with Client(server) as client:
        job_id = (await call(client, "forge_publish", arguments(w, "forge_publish", {})))["job_id"]
        _link(w.home / "runs" / job_id / "job.log", w.outside / "canary.txt")
        try:
            got = await client.read_resource(f"forge://jobs/{job_id}/log")
            text = json.dumps([c.model_dump() for c in got.contents], default=str)
        except Exception as exc:  # a refusal: fine, as long as it carries no outside content
            text = str(exc)
    assert CANARY not in text, f"the job log resource served outside content: {text[:200]}"
    assert_untouched(w)


async def test_a_job_log_planted_as_a_link_is_not_appended_to(server, w):
    async with Client(server) as client:
        job_id = (await call(client, "forge_publish", arguments(w, "forge_publish", {})))["job_id"]
        log = _link(w.home / "runs" / job_id / "job.log", w.outside / "canary.txt")
        server.runner.max_concurrent = 1
        server.runner.pump()
        status = await wait_job(client, job_id, deadline_s=180)
    assert CANARY not in json.dumps(status, default=str)
    assert log.is_symlink()
    assert_untouched(w)


async def test_a_model_dir_with_a_tokenizer_file_linked_outside_is_refused(server, w):
    model = w.home / "models" / "tok"
    shutil.copytree(w.outside / "model", model, ignore=shutil.ignore_patterns("README.md"))
    (model / "tokenizer_config.json").unlink()
    _link(model / "tokenizer_config.json", w.outside / "model" / "tokenizer_config.json")
    await run_case(server, w, "forge_validate_dataset", {"base_model": str(model)}, PATH_NOT_ALLOWED)


async def test_a_publish_plan_does_not_read_a_seal_planted_as_a_link(server, w):
    (w.home / "runs" / "r" / "stages").mkdir()
    planted = w.outside / "sealdir2"
    planted.mkdir()
    (planted / "seal.sha256").write_text("sha256:abcd1234\n", encoding="utf-8")
    (planted / "seal.json").write_text(json.dumps({"runs": [{"run_dir": str(w.home / "runs" / "r"), "method": "lora",
                                                             "base_model": {"ref": CANARY}}], "hardware": {}}),
                                       encoding="utf-8")
    w.before = listing(w.outside)
    _link(w.home / "seals" / "20261128-101500-abcd1234", planted)
    reply, status = await _run_queued_job(server, w, "forge_publish", {"dry_run": True})
    assert CANARY not in json.dumps([reply, status], default=str), "a seal outside the roots went into the card"
    assert_untouched(w)


async def test_sealing_a_job_whose_run_name_leads_outside_is_refused(server, w):
    _link(w.home / "runs" / "evil", w.outside / "run")
    async with Client(server) as client:
        handle = await call(client, "forge_train", arguments(w, "forge_train", {"run_name": "evil"}))
        if "error" not in handle:
            reply = await call(client, "forge_seal_snapshot", {"job_ids": [handle["job_id"]]})
            assert_answer(reply, PATH_NOT_ALLOWED | {"seal_not_found"})
    sealed = [p for p in (w.home / "seals").rglob("*") if p.is_file()] if (w.home / "seals").is_dir() else []
    leaked = [str(p) for p in sealed if CANARY in p.read_text(encoding="utf-8", errors="replace")]
    assert not leaked, f"outside content copied into the workspace: {leaked}"
    assert_untouched(w)


# 4. Prefix tricks: a sibling whose name starts with the root's name is not inside the root.

PREFIX = [
    ("sibling-prefix", "x/a/bc/file.jsonl", "x/a/b", PATH_NOT_ALLOWED),
    ("dotdot-to-sibling", "x/a/b/../bc/file.jsonl", "x/a/b", PATH_NOT_ALLOWED),
    ("sibling-prefix-root-with-slash", "x/a/bc/file.jsonl", "x/a/b/", PATH_NOT_ALLOWED),
    ("parent-of-root", "x/a/file.jsonl", "x/a/b", PATH_NOT_ALLOWED),
    ("inside-root-control", "x/a/b/file.jsonl", "x/a/b", OK),
]


@pytest.mark.parametrize("tool,arg", [pytest.param("forge_validate_dataset", "path", id="validate"),
                                      pytest.param("forge_train", "dataset", id="train")])
@pytest.mark.parametrize("path,root,codes", [pytest.param(*p[1:], id=p[0]) for p in PREFIX])
async def test_roots_are_directories_not_string_prefixes(server, w, tool, arg, path, root, codes):
    for d in ("x/a/b", "x/a/bc", "x/a"):
        (w.tmp / d).mkdir(parents=True, exist_ok=True)
        (w.tmp / d / "file.jsonl").write_bytes(_records(CANARY if d != "x/a/b" else "root"))
    w.monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(w.tmp) + "/" + root)
    reply = await run_case(server, w, tool, {arg: f"{w.tmp}/{path}"}, codes)
    if codes == OK and tool == "forge_validate_dataset":
        assert reply["records"] == 8


# 5. NUL bytes and over-long paths: argument errors, never a traceback.

LONG_INPUTS = [
    ("validate-path", "forge_validate_dataset", "path"),
    ("train-dataset", "forge_train", "dataset"),
    ("train-base_model", "forge_train", "base_model"),
    ("merge-adapter", "forge_merge", "adapter"),
    ("quantize-model", "forge_quantize", "model"),
    ("publish-source", "forge_publish", "source"),
    ("demo-dir", "forge_demo_assets", "dir"),
    ("modelfile-gguf", "forge_modelfile", "gguf"),
    ("query-model", "forge_query_model", "model"),
]
MALFORMED = [
    ("nul-byte", "{home}/data\x00.jsonl"),
    ("40k-chars", "{home}/" + "a/" * 20_000 + "d.jsonl"),
    ("300-char-component", "{home}/" + "c" * 300 + "/d.jsonl"),
]


@pytest.mark.parametrize("value", [pytest.param(v, id=i) for i, v in MALFORMED])
@pytest.mark.parametrize("tool,arg", [pytest.param(*c[1:], id=c[0]) for c in LONG_INPUTS])
async def test_malformed_paths_are_argument_errors(server, w, tool, arg, value):
    await run_case(server, w, tool, {arg: value}, INVALID)
    assert server.runner.store.list(limit=5) == []


# 6. Job and seal ids used as paths, and paths used as ids.

IDS = [
    ("merge-unknown-train-id", "forge_merge", {"adapter": JOB_ID}, {"job_not_found"}),
    ("quantize-unknown-merge-id", "forge_quantize", {"model": "merge-20261128-101500-3f9a1c"}, {"job_not_found"}),
    ("publish-unknown-quantize-id", "forge_publish", {"source": "quantize-20261128-101500-3f9a1c", "kind": "gguf"},
     {"job_not_found"}),
    ("modelfile-unknown-quantize-id", "forge_modelfile", {"gguf": "quantize-20261128-101500-3f9a1c"},
     {"job_not_found"}),
    ("query-unknown-pipeline-id", "forge_query_model", {"model": "pipeline-20261128-101500-3f9a1c"},
     {"job_not_found"}),
    ("id-with-traversal-suffix", "forge_merge", {"adapter": JOB_ID + "/../../../outside/adapter"},
     PATH_NOT_ALLOWED | {"job_not_found", "invalid_argument"}),
    ("id-with-trailing-newline", "forge_merge", {"adapter": JOB_ID + "\n"}, REFUSALS),
    ("train-resume-from-path", "forge_train", {"resume_from_job": "../../etc/passwd"}, {"job_not_found"}),
]


@pytest.mark.parametrize("tool,overrides,codes", [pytest.param(*c[1:], id=c[0]) for c in IDS])
async def test_unknown_job_ids_where_paths_go(server, w, tool, overrides, codes):
    await run_case(server, w, tool, overrides, codes)


PATH_IDS = [
    ("status-dotdot", "forge_job_status", {"job_id": "../../etc/passwd"}, {"job_not_found"}),
    ("status-absolute", "forge_job_status", {"job_id": "/etc/passwd"}, {"job_not_found"}),
    ("events-dotdot", "forge_job_events", {"job_id": "../../etc/passwd"}, {"job_not_found"}),
    ("wait-dotdot", "forge_job_wait", {"job_id": "../../etc/passwd", "timeout_s": 0}, {"job_not_found"}),
    ("cancel-dotdot", "forge_job_cancel", {"job_id": "../../etc/passwd"}, {"job_not_found"}),
    ("seal-snapshot-dotdot", "forge_seal_snapshot", {"job_ids": ["../../etc/passwd"]}, {"job_not_found"}),
    ("seal-verify-dotdot", "forge_seal_verify", {"seal_id": "../x"}, INVALID),
    ("seal-verify-prefixed-dotdot", "forge_seal_verify", {"seal_id": "sha256:../../x"}, INVALID),
    ("seal-verify-outside-path", "forge_seal_verify", {"seal_id": "{outside}/sealdir"}, INVALID),
]


@pytest.mark.parametrize("tool,args,codes", [pytest.param(*c[1:], id=c[0]) for c in PATH_IDS])
async def test_paths_where_ids_go(server, w, tool, args, codes):
    async with Client(server) as client:
        reply = await call(client, tool, {k: _fill(v, w) for k, v in args.items()})
    assert_answer(reply, codes)
    assert_untouched(w)


@pytest.mark.parametrize("uri", [
    pytest.param("forge://jobs/..%2F..%2Fetc%2Fpasswd/log", id="job-log-encoded-dotdot"),
    pytest.param("forge://jobs/../../outside/log", id="job-log-dotdot"),
    pytest.param("forge://seals/..%2Foutside%2Fsealdir", id="seal-encoded-dotdot"),
])
async def test_resource_ids_that_are_paths(server, w, uri):
    async with Client(server) as client:
        try:
            got = await client.read_resource(uri)
            text = json.dumps([c.model_dump() for c in got.contents], default=str)
        except Exception as exc:
            text = str(exc)
    assert CANARY not in text and "root:" not in text, text[:300]
    assert_untouched(w)


# 7. Hub ids: owner/name only, and only when no local path has that name.

async def test_a_hub_id_is_kept_as_a_hub_id(server, w):
    reply = await run_case(server, w, "forge_train", {"base_model": "owner/name"}, OK)
    assert server.runner.store.get(reply["job_id"])["params"]["base_model"] == "owner/name"


@pytest.mark.parametrize("ref", [
    pytest.param("./owner/name", id="dot-slash"),
    pytest.param("owner/name/extra", id="three-parts"),
    pytest.param("owner/../x", id="dotdot-in-id"),
    pytest.param("owner/..", id="dotdot-name"),
    pytest.param("../owner", id="dotdot-owner"),
    pytest.param("/owner/name", id="absolute"),
    pytest.param("~/owner", id="tilde"),
    pytest.param("owner\\..\\name", id="backslash"),
    pytest.param("owner/name ", id="trailing-space"),
])
@pytest.mark.parametrize("tool", ["forge_train", "forge_merge"])
async def test_hub_id_lookalikes_are_paths_and_refused(server, w, tool, ref):
    await run_case(server, w, tool, {"base_model": ref}, PATH_REFUSED)
    assert server.runner.store.list(limit=5) == []


async def test_a_local_dir_outside_the_roots_shadows_a_hub_id(server, w):
    (w.cwd / "owner" / "name").mkdir(parents=True)
    await run_case(server, w, "forge_train", {"base_model": "owner/name"}, PATH_NOT_ALLOWED)


async def test_a_local_dir_inside_the_roots_is_taken_as_a_path(server, w):
    (w.home / "owner" / "name").mkdir(parents=True)
    reply = await run_case(server, w, "forge_train", {"base_model": "owner/name"}, OK, cwd="home")
    assert server.runner.store.get(reply["job_id"])["params"]["base_model"] == str(w.home / "owner" / "name")


# 8. A dataset swapped for a link after submit: the job trains on the snapshot taken at submit.

@pytest.mark.parametrize("tool", ["forge_train", "forge_pipeline"])
async def test_a_dataset_swapped_after_submit_does_not_change_what_is_trained(server, w, tool):
    original = w.home / "swap.jsonl"
    original.write_bytes(_records("original"))
    want = hashlib.sha256(original.read_bytes()).hexdigest()
    reply = await run_case(server, w, tool, {"dataset": str(original)}, OK)
    tmp_link = _link(w.home / ".swap.tmp", w.outside / "d.jsonl")
    os.replace(tmp_link, original)
    assert CANARY in original.read_text(encoding="utf-8")  # the name now leads outside
    params = server.runner.store.get(reply["job_id"])["params"]
    snapshot = Path(params["dataset"])
    assert snapshot.parent == w.home / "datasets" and snapshot.is_file() and not snapshot.is_symlink()
    data = snapshot.read_bytes()
    assert hashlib.sha256(data).hexdigest() == want == params["_dataset"]["sha256"]
    assert CANARY not in data.decode("utf-8") and data != (w.outside / "d.jsonl").read_bytes()
    assert_untouched(w)


# 9. The audit bundle under a file flipping between a regular file and a link to the canary.

def test_audit_never_bundles_a_file_flipped_to_a_link(w):
    from forge.snapshot import audit

    target = w.home / "notes.txt"
    target.write_text("inside notes\n", encoding="utf-8")
    manifest = w.home / "manifest.json"
    manifest.write_text(json.dumps(["notes.txt"]), encoding="utf-8")
    stop = threading.Event()

    def flip():
        for i in range(200):
            if stop.is_set():
                return
            tmp = w.home / f".flip-{i}"
            if i % 2:
                tmp.write_text("inside notes\n", encoding="utf-8")
            else:
                tmp.symlink_to(w.outside / "canary.txt")
            os.replace(tmp, target)
            time.sleep(0.0005)

    flipper = threading.Thread(target=flip, daemon=True)
    outcomes = []
    flipper.start()
    try:
        for _ in range(20):
            try:
                with confinement():
                    out = audit(manifest)
            except ForgeError as err:
                assert err.code == "path_not_allowed", f"{err.code}: {err.message[:200]}"
                assert CANARY not in json.dumps(err.to_dict())
                outcomes.append("refused")
                continue
            bundle = Path(out["path"]).read_text(encoding="utf-8")
            assert CANARY not in bundle and CANARY not in json.dumps(out), "the audit bundled outside content"
            outcomes.append("bundled")
    finally:
        stop.set()
        flipper.join()
    assert len(outcomes) == 20
    assert_untouched(w)


@pytest.mark.parametrize("entry", [
    pytest.param("{outside}/canary.txt", id="absolute"),
    pytest.param("../outside/canary.txt", id="dotdot"),
    pytest.param("linkdir/canary.txt", id="dir-link"),
    pytest.param("link.jsonl", id="file-link"),
])
def test_audit_refuses_manifest_entries_outside_the_roots(w, entry):
    from forge.snapshot import audit

    manifest = w.home / "manifest.json"
    manifest.write_text(json.dumps([_fill(entry, w)]), encoding="utf-8")
    with confinement(), pytest.raises(ForgeError) as err:
        audit(manifest)
    assert err.value.code == "path_not_allowed"
    assert CANARY not in json.dumps(err.value.to_dict())
    assert not (w.home / "audits").exists() or not any((w.home / "audits").iterdir())
    assert_untouched(w)


# Demo assets written into a dir holding a planted link.

@pytest.mark.parametrize("planted,target", [
    pytest.param("sample_alpaca.jsonl.tmp", "canary.txt", id="dataset-tmp-link"),
    pytest.param("tiny-qwen2", "model", id="model-dir-link"),
])
async def test_demo_assets_do_not_write_through_planted_links(server, w, planted, target):
    demo = w.home / "demo2"
    _link(demo / planted, w.outside / target)
    async with Client(server) as client:
        reply = await call(client, "forge_demo_assets", {"dir": str(demo)})
    text = json.dumps(reply, default=str)
    assert CANARY not in text
    if "error" in reply:
        assert reply["error"]["code"] in REFUSALS, reply
    assert_untouched(w)
