"""Evaluation (what the fine-tune gained, what each quantization cost, whether answers stop) and a LoRA alone
as a GGUF for Ollama's ADAPTER, on a tiny run made by the pipeline, through the library, the CLI and MCP."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from mcp import Client

from forge.cli import main
from forge.errors import Codes, ForgeError
from forge.evaluate import EvaluateConfig, evaluate
from forge.lora_gguf import LoraGgufConfig, lora_gguf
from forge.modelfile import parse_modelfile, validate_modelfile
from forge.pipeline import PipelineConfig, run_pipeline
from forge.seal import SealConfig, seal
from helpers import call_ok, stop_runner, wait_job
from mcp_servers.forge.server import create_server

# the last row: Q4_K_M made again without the importance matrix, measured by the quantize stage on the same
# tokens and deleted, so the table shows what the matrix bought
TABLE_MODELS = ["base", "fine-tuned", "f16 GGUF", "Q4_K_M GGUF", "Q4_K_M GGUF (no imatrix)"]


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    out = run_pipeline(PipelineConfig(base_model=assets["model_dir"], dataset=assets["dataset"],
                                      output_dir=tmp_path_factory.mktemp("eval") / "run",
                                      train={"num_train_epochs": 3, "learning_rate": 3e-3, "save_steps": 100}))
    assert out["status"] == "succeeded"
    return out


def test_the_pipeline_measures_base_fine_tuned_and_each_gguf_on_the_same_tokens(run):
    ev = run["stages"]["evaluate"]
    rows = {r["model"]: r for r in ev["table"]}
    assert list(rows) == TABLE_MODELS and ev["source"]["kind"] == "eval split" and ev["tokens"] > 0
    assert all(r["tokens"] == ev["tokens"] and math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-3)
               for r in rows.values())
    assert rows["fine-tuned"]["perplexity"] < rows["base"]["perplexity"]  # training taught the held-out answers
    assert abs(rows["f16 GGUF"]["vs_fine_tuned_pct"]) < 1.0  # f16 costs (almost) nothing
    assert rows["Q4_K_M GGUF"]["loss"] != rows["f16 GGUF"]["loss"]  # and 4 bits cost something measurable
    # llama.cpp's own measure against the f16 GGUF: the f16 itself is 0 / 100 %, measured; 4 bits lose some
    assert rows["f16 GGUF"]["kld_mean"] < 1e-6 and rows["f16 GGUF"]["same_top_pct"] == 100.0
    assert rows["Q4_K_M GGUF"]["kld_mean"] > 0 and rows["Q4_K_M GGUF"]["kld_p99"] >= rows["Q4_K_M GGUF"]["kld_mean"]
    assert rows["Q4_K_M GGUF"]["imatrix"] and not rows["Q4_K_M GGUF (no imatrix)"]["imatrix"]
    assert rows["Q4_K_M GGUF"]["bpw"] < 6 < rows["f16 GGUF"]["bpw"]
    assert ev["measured_on"]["tokens"] == ev["tokens"] and ev["reference"].endswith("-f16.gguf")
    assert ev["quantization"]["imatrix"]["used_for"] == ["Q4_K_M"]
    # the quantize stage measured these very files on these very tokens: its numbers are taken, not redone
    assert {r["measured_by"] for r in ev["table"][2:]} == {"quantize stage"}
    assert len(ev["samples"]) == ev["source"]["records"] == 6  # every eval prompt, up to samples (8)
    for sample in ev["samples"]:
        assert sample["prompt"] and sample["expected"] and sample["quantized_model"] == "Q4_K_M"
        for who in ("base", "fine-tuned", "quantized"):  # each answer scored against the record's
            assert {"text", "stopped", "tokens"} <= set(sample[who]) and isinstance(sample[who]["stopped"], bool)
            assert sample[who]["match"] in ("exact", "normalised", "contains", None)
    assert set(ev["stopped_on_its_own"]) == {"base", "fine-tuned", "quantized"}
    assert set(ev["learned"]) == {"base", "fine-tuned", "Q4_K_M GGUF"}
    assert all(t["of"] == 6 and t["exact"] <= t["normalised"] <= t["contains"] == t["matched"]
               for t in ev["learned"].values())
    # the eval split is a share of the same kind of records, said plainly
    assert ev["source"]["held_out"]["of"] == 6 and "eval records" in ev["source"]["held_out"]["text"]
    # what the fine-tune and each GGUF kept of the base's general ability, on the general set
    assert set(ev["forgetting"]) == {"fine-tuned", "f16 GGUF", "Q4_K_M GGUF"}
    tuned = ev["forgetting"]["fine-tuned"]
    assert tuned["of"] == 24 and tuned["prose_ppl"] > 1 and tuned["base_prose_ppl"] > 1
    # the f16 GGUF scores the very prose ids the fine-tuned model scored: the same perplexity, give or take f16
    assert math.isclose(ev["forgetting"]["f16 GGUF"]["prose_ppl"], tuned["prose_ppl"], rel_tol=0.02)


def test_the_seal_and_retrospective_carry_the_eval_table_and_the_answers_side_by_side(run):
    record = json.loads(Path(run["stages"]["seal"]["seal_path"]).read_text(encoding="utf-8"))
    evaluation = record["runs"][0]["evaluation"]
    assert [r["model"] for r in evaluation["table"]] == TABLE_MODELS and len(evaluation["samples"]) == 6
    assert set(evaluation["forgetting"]) == {"fine-tuned", "f16 GGUF", "Q4_K_M GGUF"}
    text = Path(run["stages"]["seal"]["retrospective_path"]).read_text(encoding="utf-8")
    assert "### Evaluation" in text and "| Prompt | Expected | Base | Fine-tuned | Q4_K_M |" in text
    assert "Forgetting, on Forge's general set against the base" in text and "| Q4_K_M GGUF |" in text
    for row in evaluation["table"]:
        assert f"| {row['model']} | {row['loss']:.4f} |" in text
    assert evaluation["samples"][0]["expected"][:40] in text


def test_eval_on_a_file_of_ones_own_from_the_cli(run, tmp_path, capsys):
    records = tmp_path / "mine.jsonl"
    records.write_text(json.dumps({"instruction": "What is LoRA?", "output": "A low-rank adapter."}) + "\n",
                       encoding="utf-8")
    code = main(["eval", "--run-dir", run["run_dir"], "--dataset", str(records), "--samples", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["source"]["kind"] == "file" and out["source"]["records"] == 1
    ggufs = [r for r in out["table"] if r["model"].endswith("GGUF")]  # other tokens: measured here, again
    assert [r["measured_by"] for r in ggufs] == ["evaluate", "evaluate"] and ggufs[0]["kld_mean"] < 1e-6
    assert not any("no imatrix" in r["model"] for r in out["table"])  # its numbers were on other tokens
    assert len(out["samples"]) == 1 and out["samples"][0]["expected"] == "A low-rank adapter."


def test_a_dir_that_was_never_trained_cannot_be_evaluated(tmp_path):
    with pytest.raises(ForgeError) as info:
        evaluate(EvaluateConfig(run_dir=tmp_path))
    assert info.value.code == Codes.RUN_NOT_FOUND and info.value.hint


def test_a_lora_gguf_runs_on_its_base_gguf_as_peft_does(run, go_render):
    out = lora_gguf(LoraGgufConfig(adapter_dir=Path(run["run_dir"]) / "adapter"))
    check = out["verification"]
    # llama.cpp (f16 base GGUF + f16 LoRA GGUF) against PEFT (fp32 base + adapter), on a chat prompt: within
    # 2% of the largest logit, and far below what the adapter itself changes
    assert check["passed"] and check["max_abs_diff"] <= check["bound"] and check["adapter_effect"] > 10 * check[
        "max_abs_diff"]
    lora = Path(out["lora_gguf"])
    assert lora.name.endswith("-lora-f16.gguf") and lora.stat().st_size < Path(out["base_gguf"]["path"]).stat().st_size
    modelfile = Path(out["modelfile"])
    parsed = parse_modelfile(modelfile.read_text(encoding="utf-8"), base_dir=modelfile.parent)
    assert parsed.from_ == out["base_gguf"]["path"] and ("ADAPTER", f"./{lora.name}") in parsed.instructions
    assert validate_modelfile(modelfile)["stops"] == ["<|im_end|>"]
    rendered = subprocess.run([str(go_render)], input=json.dumps({"template": parsed.template, "messages": [
        {"role": "user", "content": "Hi"}]}), capture_output=True, text=True, check=True).stdout
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    again = lora_gguf(LoraGgufConfig(adapter_dir=Path(run["run_dir"]) / "adapter", force=True, verify=False))
    assert again["base_gguf"]["source"] == "cached f16 conversion of the base"  # converted once
    record = json.loads(Path(seal(SealConfig(run_dirs=[Path(run["run_dir"])]))["seal_path"]).read_text())
    assert record["runs"][0]["lora_gguf"]["lora_gguf"] == str(lora)
    assert any(a["path"] == str(lora) for a in record["runs"][0]["artifacts"])


def test_an_adapter_that_trained_token_rows_is_refused_with_the_merge_route(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "x", "trainable_token_indices": {"embed_tokens": [1, 2]}}), encoding="utf-8")
    with pytest.raises(ForgeError) as info:
        lora_gguf(LoraGgufConfig(adapter_dir=adapter))
    assert info.value.code == Codes.ADAPTER_INVALID and "forge quantize" in info.value.hint


@pytest.mark.anyio
async def test_agents_evaluate_and_export_a_lora_through_mcp(run, assets, home, monkeypatch):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["dataset"]).parent))  # the base and the data
    copy = home / "runs" / "mine"  # the run as an agent's own, in its FORGE_HOME
    shutil.copytree(run["run_dir"], copy, ignore=shutil.ignore_patterns("*lora*", "Modelfile.adapter*"))
    for record in (copy / "stages").glob("*.json"):  # its records name its own files
        record.write_text(record.read_text(encoding="utf-8").replace(run["run_dir"], str(copy)), encoding="utf-8")
    server = create_server()
    try:
        async with Client(server) as client:
            evaluated = await call_ok(client, "forge_evaluate", {"run": str(copy)})
            evaluated = await wait_job(client, evaluated["job_id"])
            exported = await call_ok(client, "forge_quantize", {"model": str(copy / "adapter")})
            exported = await wait_job(client, exported["job_id"])
            modelfile = await call_ok(client, "forge_modelfile", {"gguf": exported["job_id"]})
    finally:
        stop_runner(server.runner)
    assert evaluated["status"] == "succeeded" and evaluated["kind"] == "evaluate", evaluated.get("error")
    assert exported["status"] == "succeeded" and exported["kind"] == "lora_gguf", exported.get("error")
    assert "forge_seal_snapshot()" in exported["next_actions"]
    assert "ADAPTER ./" in modelfile["content"] and Path(modelfile["path"]).name.startswith("Modelfile.adapter")
