"""Every `forge` subcommand's --json output, called in-process through main(argv)."""

import json
from pathlib import Path

import pytest

from forge.cli import main


def run_json(capsys, *argv) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_env_json(capsys):
    code, out = run_json(capsys, "env")
    assert code == 0
    assert out["torch"] and out["versions"]["trl"] and out["versions"]["llama-cpp-python"]
    assert isinstance(out["devices"], list) and out["disk_free_bytes"] > 0
    assert "converter_available" in out


def test_demo_assets_json(capsys, tmp_path):
    code, out = run_json(capsys, "demo-assets", str(tmp_path))
    assert code == 0 and Path(out["model_dir"], "config.json").is_file() and out["records"] == 60


def test_data_validate_and_stats_json(capsys, assets):
    code, out = run_json(capsys, "data", "validate", assets["dataset"])
    assert code == 0 and out["format"] == "alpaca" and out["records"] == 60 and "tokens" not in out
    code, out = run_json(capsys, "data", "stats", assets["dataset"], "--base-model", assets["model_dir"],
                         "--max-length", "512")
    assert code == 0 and out["tokens"]["records"] == 60 and out["tokens"]["max_length"] == 512


def test_data_errors_are_json_with_code_and_hint(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n', encoding="utf-8")
    code, out = run_json(capsys, "data", "validate", str(bad))
    assert code == 2
    assert out["error"]["code"] == "dataset_invalid" and out["error"]["hint"]
    assert out["error"]["details"] == ["line 1: missing field 'output'; each alpaca record needs non-empty "
                                       "'instruction' and 'output' strings ('input' optional)"]


def test_human_errors_go_to_stderr_without_traceback(capsys, tmp_path):
    code = main(["data", "validate", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error [dataset_not_found]") and "Traceback" not in err


def test_train_merge_quantize_modelfile_seal_json(capsys, assets, tmp_path):
    run = tmp_path / "run"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"base_model: {assets['model_dir']}\ndataset: {assets['dataset']}\nmax_steps: 2\n"
                   "learning_rate: 0.001\n", encoding="utf-8")
    code, out = run_json(capsys, "train", "--config", str(cfg), "--output-dir", str(run), "--lora-r", "8")
    assert code == 0 and out["metrics"]["global_step"] == 2
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8  # CLI beats YAML defaults

    code, out = run_json(capsys, "merge", "--adapter-dir", str(run / "adapter"))
    assert code == 0 and out["parity"]["passed"] and Path(out["merged_dir"]) == run / "merged"

    code, out = run_json(capsys, "quantize", "--model-dir", str(run / "merged"), "--quantizations", "Q8_0",
                         "--no-verify")
    assert code == 0 and [o["quant"] for o in out["outputs"]] == ["f16", "Q8_0"]
    gguf = out["outputs"][-1]["path"]

    code, out = run_json(capsys, "modelfile", "--gguf", gguf, "--temperature", "0.3")
    assert code == 0 and out["template_family"] == "chatml" and "PARAMETER temperature 0.3" in out["content"]
    code, out = run_json(capsys, "modelfile", "--check", out["path"])
    assert code == 0 and out["stops"] == ["<|im_end|>"]

    code, out = run_json(capsys, "seal", "create", "--run-dirs", str(run), "--note", "from the CLI")
    assert code == 0 and out["seal_id"].startswith("sha256:")
    assert Path(out["retrospective_path"]).is_file() and (run / "retrospective.md").is_file()
    code, verified = run_json(capsys, "seal", "verify", out["seal_id"])
    assert code == 0 and verified["ok"] and verified["mismatches"] == []


def test_train_with_unknown_yaml_key_fails_with_the_key_named(capsys, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("base_model: m\ndataset: d.jsonl\nepochs: 3\n", encoding="utf-8")
    code, out = run_json(capsys, "train", "--config", str(cfg))
    assert code == 2 and out["error"]["code"] == "config_invalid"
    assert "'epochs' is not a known field" in out["error"]["message"]


@pytest.mark.slow
def test_demo_runs_every_stage(capsys, tmp_path):
    code, out = run_json(capsys, "demo", "--dir", str(tmp_path), "--model", "tiny")
    assert code == 0 and out["status"] == "succeeded"
    assert list(out["stages"]) == ["train", "merge", "quantize", "evaluate", "modelfile", "seal"]
    run_dir = Path(out["run_dir"])
    assert (run_dir / "retrospective.md").is_file() and (run_dir / "gguf" / "Modelfile").is_file()
    assert list((run_dir / "gguf").glob("*-Q4_K_M.gguf"))
