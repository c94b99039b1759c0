"""Bad input gets a clear, structured error and nothing runs: dataset bytes the validator must survive,
arguments out of bounds or unknown, absurd plans, shell-hostile names; and what Forge writes is the
user's alone."""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from forge.data import MAX_LINE_BYTES, DataConfig, load_dataset, validate
from forge.errors import Codes, ForgeError
from helpers import call, stop_runner, wait_job
from mcp_servers.forge.server import create_server

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"instruction": "Say hi", "output": "Hi."}


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def dataset_problems(path: Path) -> list[str]:
    with pytest.raises(ForgeError) as info:
        load_dataset(path)
    assert info.value.code == Codes.DATASET_INVALID
    return info.value.details


# ---- the validator reads bytes ----

def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode() + b"\n")
    ds = load_dataset(path)
    assert len(ds.conversations) == 2 and ds.format == "alpaca"


def test_every_kind_of_unreadable_line_is_reported_with_its_number_and_the_rest_still_checked(tmp_path):
    good = json.dumps(GOOD).encode()
    path = write_lines(tmp_path / "bad.jsonl", [
        good,                                               # 1
        b'{"instruction": "caf\xe9", "output": "x"}',        # 2 Latin-1, not UTF-8
        b"[" * 5000 + b"]" * 5000,                           # 3 nested far too deep
        b'{"instruction": "n", "output": ' + b"9" * 5000 + b"}",  # 4 an integer of 5000 digits
        b'{"instruction": "\\ud800", "output": "x"}',        # 5 a lone surrogate
        b'{"instruction": "x"}',                             # 6 an ordinary problem, still found
        b'{"a": ' * 100 + b"1" + b"}" * 100,                 # 7 deep objects (under the recursion limit)
        good,                                               # 8
    ])
    problems = dataset_problems(path)
    text = "\n".join(problems)
    expected = [(2, "not valid UTF-8 (byte 0xe9"), (3, "JSON nested deeper than"), (4, "a value cannot be read"),
                (5, "field 'instruction' holds an unpaired surrogate"), (6, "missing field 'output'"),
                (7, "JSON nested deeper than")]
    for line, needle in expected:
        assert f"line {line}: {needle}" in text, (line, text)
    assert len(problems) == 6


def test_a_line_over_the_size_limit_is_reported_not_loaded(tmp_path):
    huge = json.dumps({"instruction": "x" * (MAX_LINE_BYTES + 10), "output": "y"}).encode()
    path = write_lines(tmp_path / "huge.jsonl", [json.dumps(GOOD).encode(), huge])
    assert dataset_problems(path) == [f"line 2: {len(huge):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit per "
                                      "record; split or shorten the record"]


def test_format_detection_does_not_depend_on_the_hash_seed(tmp_path):
    path = write_lines(tmp_path / "tie.jsonl", [
        json.dumps(GOOD).encode(),
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}).encode()])
    code = ("import sys; from forge.data import load_dataset\ntry:\n    load_dataset(sys.argv[1])\n"
            "except Exception as e:\n    print(e.message.split(' dataset:')[0].split(' in ')[-1])")
    answers = {subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in range(6)}
    assert answers == {"messages"}  # a tie goes to the first of messages, alpaca, prompt_completion


def test_a_huge_first_record_is_not_echoed_whole(tmp_path):
    path = write_lines(tmp_path / "long.jsonl", [json.dumps({"instruction": "w" * 200_000, "output": "y"}).encode()])
    report = validate(DataConfig(path=path))
    assert len(json.dumps(report["example"])) < 1000


# ---- tool arguments ----



@pytest.fixture
def paused_server(home, monkeypatch, assets):
    """A server whose queue never starts a job: what these tests check happens at submit."""
    monkeypatch.setenv("FORGE_MAX_CONCURRENT_JOBS", "0")
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["model_dir"]).parent))
    server = create_server()
    yield server
    stop_runner(server.runner)


def train_args(assets, **extra) -> dict:
    return {"base_model": assets["model_dir"], "dataset": assets["dataset"], **extra}


@pytest.mark.anyio
@pytest.mark.parametrize("hyperparameters,field", [
    ({"num_train_epochs": 1e9}, "num_train_epochs"), ({"num_train_epochs": 1e308}, "num_train_epochs"),
    ({"seed": 2**64}, "seed"), ({"lora_r": 10**9}, "lora_r"), ({"num_processes": 10**6}, "num_processes"),
    ({"max_length": -1}, "max_length"), ({"learning_rate": 0}, "learning_rate"), ({"epochs": 3}, "epochs"),
], ids=lambda v: str(v))
async def test_out_of_bounds_training_knobs_are_refused_at_submit_naming_the_field(paused_server, assets,
                                                                                  hyperparameters, field):
    async with Client(paused_server) as client:
        out = await call(client, "forge_train", train_args(assets, hyperparameters=hyperparameters))
        listed = await call(client, "forge_job_list", {})
    assert out["error"]["code"] == Codes.INVALID_ARGUMENT and field in out["error"]["message"]
    assert listed["jobs"] == []  # nothing queued


@pytest.mark.anyio
async def test_unknown_arguments_are_errors_that_name_them(paused_server, assets):
    async with Client(paused_server) as client:
        train = await call(client, "forge_train", train_args(assets, epochs=100))
        publish = await call(client, "forge_publish", {"source": assets["model_dir"], "repo_id": "me/x",
                                                       "token": "hf_secret"})
        listed = await call(client, "forge_job_list", {})
    assert train["error"]["code"] == Codes.INVALID_ARGUMENT and "'epochs'" in train["error"]["message"]
    assert publish["error"]["code"] == Codes.INVALID_ARGUMENT and "'token'" in publish["error"]["message"]
    assert "hf_secret" not in json.dumps(publish) and listed["jobs"] == []


@pytest.mark.anyio
@pytest.mark.parametrize("tool,extra,accepted", [
    ("forge_train", {"chat_template": "qwen3"}, ["chatml", "llama3", "qwen2.5", "mistral-tools"]),
    ("forge_train", {"chat_template": "Llama2"}, ["chatml", "llama3.1"]),
    ("forge_pipeline", {"chat_template": "zephyr"}, ["chatml", "gemma"]),
    ("forge_pipeline", {"quantizations": ["Q4_K_X"]}, ["auto", "Q4_K_M", "Q8_0", "IQ4_XS"]),
    ("forge_train", {"method": "sft"}, ["'lora'", "'qlora'", "'dpo'", "'orpo'"]),
    ("forge_validate_dataset", {"chat_template": "vicuna"}, ["chatml", "phi4"]),
], ids=lambda v: str(v))
async def test_an_unknown_name_in_a_closed_set_is_answered_with_the_accepted_ones(paused_server, assets, tool,
                                                                                   extra, accepted):
    """Never as a path outside the roots: the agent learns the names it may use."""
    args = {"path": assets["dataset"], **extra} if tool == "forge_validate_dataset" else train_args(assets, **extra)
    async with Client(paused_server) as client:
        out = await call(client, tool, args)
        listed = await call(client, "forge_job_list", {})
    error = out["error"]
    assert error["code"] == Codes.INVALID_ARGUMENT and "path" not in error["message"], error
    assert all(name in error["hint"] or name in error["message"] for name in accepted), error
    assert listed["jobs"] == []


@pytest.mark.anyio
async def test_an_absurd_plan_is_refused_before_it_takes_the_slot(paused_server, assets, monkeypatch):
    monkeypatch.setenv("FORGE_MAX_TRAIN_STEPS", "100")
    async with Client(paused_server) as client:
        out = await call(client, "forge_train", train_args(assets, hyperparameters={"num_train_epochs": 50}))
        ok = await call(client, "forge_train", train_args(assets, hyperparameters={"max_steps": 100}))
    assert out["error"]["code"] == Codes.PLAN_TOO_LARGE and "FORGE_MAX_TRAIN_STEPS" in out["error"]["hint"]
    assert "planned_steps: 700" in out["error"]["details"]  # 54 train records / 4 per step → 14 steps × 50
    assert ok["status"] == "queued"


@pytest.mark.anyio
async def test_ray_restarts_are_refused_where_jobs_run_locally(paused_server, assets, tmp_path):
    """max_failures means Ray Train restarts: accepted and ignored here, an agent would count on them."""
    from forge.errors import ForgeError
    from forge.train import TrainConfig, train

    async with Client(paused_server) as client:
        out = await call(client, "forge_train", train_args(assets, hyperparameters={"max_failures": 2}))
        listed = await call(client, "forge_job_list", {})
    assert out["error"]["code"] == Codes.INVALID_ARGUMENT and "Ray" in out["error"]["message"]
    assert "resume_from_job" in out["error"]["hint"] and listed["jobs"] == []
    with pytest.raises(ForgeError) as refused:  # the library and `forge train --max-failures` too
        train(TrainConfig(base_model=assets["model_dir"], dataset=assets["dataset"], max_failures=1,
                          output_dir=tmp_path / "run"))
    assert refused.value.code == Codes.INVALID_ARGUMENT and "--resume" in refused.value.hint
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.anyio
async def test_a_bad_dataset_is_refused_at_submit_with_every_line(paused_server, home):
    bad = home / "bad.jsonl"
    bad.write_bytes(b'{"instruction": "x"}\n\xff\xfe\n')
    async with Client(paused_server) as client:
        assets = await call(client, "forge_demo_assets")
        out = await call(client, "forge_train", {"base_model": assets["model_dir"], "dataset": str(bad)})
    assert out["error"]["code"] == Codes.DATASET_INVALID
    assert [d.split(":")[0] for d in out["error"]["details"]] == ["line 1", "line 2"]


@pytest.mark.anyio
async def test_modelfile_names_and_parameters_cannot_smuggle_anything(paused_server, quantized, monkeypatch):
    gguf = next(o["path"] for o in quantized["outputs"] if o["quant"] == "Q4_K_M")
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(gguf).parent.parent.parent))
    async with Client(paused_server) as client:
        hostile = await call(client, "forge_modelfile", {"gguf": gguf, "model_name": "x; touch /tmp/PWNED #"})
        collide = await call(client, "forge_modelfile", {"gguf": gguf, "parameters": {"gguf": 1.0}})
        fine = await call(client, "forge_modelfile", {"gguf": gguf, "model_name": "me/support-bot:q4"})
        no_role = await call(client, "forge_query_model", {"model": gguf, "messages": [{"content": "hi"}]})
    assert hostile["error"]["code"] == Codes.INVALID_ARGUMENT and "model_name" in hostile["error"]["message"]
    assert collide["error"]["code"] == Codes.INVALID_ARGUMENT and "parameters.gguf" in collide["error"]["message"]
    assert shlex.split(fine["ollama_create"]) == ["ollama", "create", "me/support-bot:q4", "-f", fine["path"]]
    assert no_role["error"]["code"] == Codes.INVALID_ARGUMENT and "role" in no_role["error"]["message"]
    assert not Path("/tmp/PWNED").exists()


@pytest.mark.anyio
async def test_a_worker_killed_by_sigkill_is_reported_as_killed_not_as_out_of_memory(home, assets, monkeypatch):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["model_dir"]).parent))
    server = create_server()
    try:
        async with Client(server) as client:
            handle = await call(client, "forge_train", train_args(assets, hyperparameters={"max_steps": 5000}))
            with anyio.fail_after(600):
                while (await call(client, "forge_job_status", {"job_id": handle["job_id"]}))["stage"] != "training":
                    await anyio.sleep(0.2)
            os.kill(server.runner.store.get(handle["job_id"])["pid"], signal.SIGKILL)
            status = await wait_job(client, handle["job_id"], deadline_s=300)
    finally:
        stop_runner(server.runner)
    assert status["status"] == "failed" and status["error"]["code"] == "worker_killed"
    assert "killed by a signal (SIGKILL), often the out-of-memory killer" in status["error"]["message"]
    assert status["error"]["retryable"] is True


@pytest.mark.anyio
async def test_forge_home_and_what_the_server_writes_are_the_users_alone(tmp_path):
    home = tmp_path / "fresh-home"
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_servers.forge.server"],
                                   env={**os.environ, "FORGE_HOME": str(home)}, cwd=str(ROOT))
    async with Client(params, read_timeout_seconds=600) as client:
        assets = await call(client, "forge_demo_assets")
    assert "error" not in assets

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(home) == 0o700 and mode(home / "forge.db") == 0o600
    written = [p for p in home.rglob("*") if p.is_file()]
    assert written and all(mode(p) & 0o077 == 0 for p in written), [(p, oct(mode(p))) for p in written]
    assert all(mode(p) & 0o077 == 0 for p in home.rglob("*") if p.is_dir())
