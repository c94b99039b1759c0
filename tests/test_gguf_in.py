"""What a user brings in besides a Hugging Face model dir: a GGUF as the base model (turned into a model dir
once, cached by sha256, announced in the job's events), a chat template of their own as a Jinja file, and
`forge query` on the command line."""

import json
import shutil
from pathlib import Path

import pytest
from mcp import Client

from forge.cli import main
from forge.errors import Codes, ForgeError
from forge.gguf_import import ORIGIN_FILE, import_gguf
from forge.tokens import prepare_tokenizer
from helpers import call, call_ok, stop_runner, wait_job
from mcp_servers.forge.server import create_server


def f16_of(quantized) -> Path:
    return Path(next(o["path"] for o in quantized["outputs"] if o["quant"] == "f16"))


def test_a_gguf_is_turned_into_a_model_dir_once_and_then_found_by_sha256(quantized, home, tmp_path):
    gguf = tmp_path / "copy.gguf"
    shutil.copyfile(f16_of(quantized), gguf)
    first, made = import_gguf(gguf)
    again, made_again = import_gguf(gguf)
    assert made and not made_again and first == again
    assert first.parent == home / "cache" / "gguf-models"
    origin = json.loads((first / ORIGIN_FILE).read_text(encoding="utf-8"))
    assert origin["file_type"] == "MOSTLY_F16" and first.name == origin["sha256"]
    assert json.loads((first / "config.json").read_text())["model_type"] == "qwen2"  # the tiny model's architecture


def test_a_file_that_only_looks_like_a_gguf_gets_a_structured_error(home, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ForgeError) as info:
        import_gguf(fake)
    assert info.value.code == Codes.MODEL_NOT_FOUND and "GGUF" in info.value.message and info.value.hint
    assert not list((home / "cache" / "gguf-models").glob("*/config.json"))  # nothing half-made is kept


@pytest.mark.anyio
async def test_training_on_a_gguf_says_so_in_the_events_and_warns_of_dequantization(quantized, assets, home):
    home.mkdir(parents=True, exist_ok=True)
    gguf = home / "tiny-f16.gguf"
    shutil.copyfile(f16_of(quantized), gguf)
    dataset = shutil.copy(assets["dataset"], home)
    server = create_server()
    try:
        async with Client(server) as client:
            handle = await call_ok(client, "forge_train", {"base_model": str(gguf), "dataset": dataset,
                                                           "hyperparameters": {"max_steps": 1, "eval_fraction": 0}})
            status = await wait_job(client, handle["job_id"])
            events = await call(client, "forge_job_events", {"job_id": handle["job_id"], "limit": 200})
    finally:
        stop_runner(server.runner)
    assert status["status"] == "succeeded", status
    text = json.dumps(events["events"])
    assert "converting_gguf" in text and "dequantized" in text and "MOSTLY_F16" in text


def test_a_jinja_file_is_a_chat_template_and_its_source_is_recorded(tmp_path):
    from forge.demo import DemoAssetsConfig, write_demo_assets

    base = write_demo_assets(DemoAssetsConfig(dir=tmp_path / "base", model="tiny-base"))
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", encoding="utf-8")
    tokenizer, info = prepare_tokenizer(base["model_dir"], str(jinja))
    assert info["source"] == f"file:{jinja.resolve()}" and info["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    with pytest.raises(ForgeError) as info:
        prepare_tokenizer(base["model_dir"], str(tmp_path / "missing.jinja"))
    assert info.value.code == Codes.INVALID_ARGUMENT and "chatml" in info.value.hint


def test_forge_query_asks_a_gguf_or_a_runs_last_gguf(capsys, quantized, merged):
    run_dir = Path(merged["merged_dir"]).parent
    for model in (f16_of(quantized), run_dir):
        code = main(["query", str(model), "--prompt", "What is LoRA?", "--max-tokens", "8", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 0 and out["completion_tokens"] <= 8 and out["finish_reason"] in ("stop", "length")
    assert out["model"].endswith("-Q4_K_M.gguf")  # a run dir means its most quantized GGUF
    code = main(["query", str(run_dir / "nowhere"), "--prompt", "x", "--json"])
    assert code == 2 and json.loads(capsys.readouterr().out)["error"]["code"]
