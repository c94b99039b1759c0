import json
import math
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from forge.errors import Codes, ForgeError
from forge.progress import read_progress
from forge.train import TrainConfig, latest_checkpoint, train


def test_lora_training_changes_adapter_weights_and_reports_finite_loss(trained):
    metrics = trained["metrics"]
    assert trained["status"] == "succeeded"
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["final_epoch"] == 2.0
    assert metrics["tokens_per_s"] > 0 and metrics["real_tokens"] > 0 and metrics["peak_memory_bytes"] > 0
    weights = load_file(f"{trained['adapter_dir']}/adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    # PEFT initialises lora_B to zero: non-zero values prove the optimizer moved the adapter
    assert lora_b and all(float(t.abs().max()) > 0 for t in lora_b)
    cfg = json.loads(Path(trained["adapter_dir"], "adapter_config.json").read_text(encoding="utf-8"))
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (16, 32, 0.05)
    adapted = {name.rsplit(".", 1)[-1] for name in cfg["target_modules"]}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_adapter_dir_carries_tokenizer_and_chat_template(trained):
    from pathlib import Path

    adapter = Path(trained["adapter_dir"])
    assert (adapter / "tokenizer.json").is_file()
    assert "<|im_start|>" in (adapter / "chat_template.jinja").read_text(encoding="utf-8")


def test_progress_lines_and_metrics_file(trained):
    from pathlib import Path

    events = read_progress(Path(trained["run_dir"]) / "progress.jsonl")
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, "no progress line written"
    for key in ("step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_s", "eta_s"):
        assert key in progress[-1]
    assert progress[-1]["step"] == progress[-1]["total_steps"]
    assert [e["stage"] for e in events if e["event"] == "stage"][:3] == ["preparing_data", "loading_model", "training"]
    metrics = json.loads((Path(trained["run_dir"]) / "metrics.json").read_text())
    for key in ("final_epoch", "duration_s", "train_loss", "eval_loss", "samples_per_s", "steps_per_s",
                "tokens_per_s", "peak_memory_bytes"):
        assert metrics[key] is not None, key


def test_qlora_trains_on_a_4bit_base(assets, tmp_path):
    result = train(TrainConfig(base_model=assets["model_dir"], dataset=assets["dataset"], method="qlora",
                               output_dir=tmp_path / "q", max_steps=3, learning_rate=2e-3))
    assert result["status"] == "succeeded"
    assert math.isfinite(result["metrics"]["train_loss"])
    weights = load_file(f"{result['adapter_dir']}/adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)


def test_resume_continues_the_step_count_from_the_highest_checkpoint(assets, tmp_path):
    common = dict(base_model=assets["model_dir"], dataset=assets["dataset"], output_dir=tmp_path / "r",
                  save_steps=2, save_total_limit=3, learning_rate=1e-3)
    first = train(TrainConfig(max_steps=4, **common))
    assert first["metrics"]["global_step"] == 4
    with pytest.raises(ForgeError) as info:
        train(TrainConfig(max_steps=6, **common))
    assert info.value.code == Codes.OUTPUT_EXISTS  # a finished run is not silently overwritten
    second = train(TrainConfig(max_steps=6, resume=True, **common))
    assert second["metrics"]["global_step"] == 6
    assert second["metrics"]["resumed_from"].endswith("checkpoint-4")
    steps = [e["step"] for e in read_progress(tmp_path / "r" / "progress.jsonl") if e["event"] == "progress"]
    assert steps[-1] == 6 and 4 in steps


def test_latest_checkpoint_orders_numerically(tmp_path):
    for n in (200, 1000, 30):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-5000").mkdir()  # incomplete: no trainer_state.json
    assert latest_checkpoint(tmp_path).name == "checkpoint-1000"


def test_a_resume_whose_checkpoint_reached_the_schedule_is_refused_not_reported_as_trained(assets, tmp_path):
    config = dict(base_model=assets["model_dir"], dataset=assets["dataset"], output_dir=tmp_path / "run",
                  max_steps=2, save_steps=1)
    assert train(TrainConfig(**config))["metrics"]["global_step"] == 2
    with pytest.raises(ForgeError) as info:
        train(TrainConfig(**config, resume=True))
    assert info.value.code == Codes.SCHEDULE_COMPLETE and "max_steps=4" in info.value.hint
    assert info.value.details == ["step_reached: 2", "steps_planned: 2"]
    more = train(TrainConfig(**{**config, "max_steps": 3}, resume=True))["metrics"]
    assert more["global_step"] == 3 and more["resumed_from"].endswith("checkpoint-2")


def test_resume_without_checkpoint_is_a_clear_error(assets, tmp_path):
    with pytest.raises(ForgeError) as info:
        train(TrainConfig(base_model=assets["model_dir"], dataset=assets["dataset"], output_dir=tmp_path / "x",
                          resume=True))
    assert info.value.code == Codes.NO_CHECKPOINT


def test_unknown_config_keys_are_rejected_with_their_names():
    with pytest.raises(ForgeError) as info:
        TrainConfig.build(base_model="m", dataset="d.jsonl", lora_rank=8, learning_rate=-1)
    assert info.value.code == Codes.CONFIG_INVALID
    assert "'lora_rank' is not a known field" in info.value.message
    assert "learning_rate" in info.value.message


def test_missing_base_model_names_the_value_and_the_fix(assets, tmp_path):
    with pytest.raises(ForgeError) as info:
        train(TrainConfig(base_model=str(tmp_path / "no-such-model"), dataset=assets["dataset"],
                          output_dir=tmp_path / "y"))
    assert info.value.code == Codes.BASE_MODEL_NOT_FOUND
    assert "no-such-model" in info.value.message and info.value.hint


def test_gpu_only_kernels_asked_for_on_cpu_are_cuda_required(assets, tmp_path):
    with pytest.raises(ForgeError) as info:
        train(TrainConfig(base_model=assets["model_dir"], dataset=assets["dataset"], output_dir=tmp_path / "f",
                          attn_implementation="flex_attention", max_steps=1))
    assert info.value.code == Codes.CUDA_REQUIRED and "auto" in info.value.hint


def test_report_to_writes_each_trackers_files_inside_the_run_dir(assets, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "tracked"
    out = train(TrainConfig(base_model=assets["model_dir"], dataset=assets["dataset"], output_dir=run, max_steps=3,
                            logging_steps=1, report_to=["tensorboard", "mlflow"]))
    events = list((run / "trackers" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"train/loss" in events[0].read_bytes()
    losses = list((run / "trackers" / "mlruns").glob("*/*/metrics/loss"))
    assert len(losses) == 1 and len(losses[0].read_text().splitlines()) == 3  # one line per logged step
    assert set(out["trackers"]) == {"tensorboard", "mlflow"}
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ  # set for the run only


def test_a_tracker_that_is_not_installed_is_named_with_the_install_line(assets, tmp_path):
    import importlib.util

    if importlib.util.find_spec("trackio"):
        pytest.skip("trackio is installed here; the test needs a tracker that is not")
    with pytest.raises(ForgeError) as info:
        train(TrainConfig(base_model=assets["model_dir"], dataset=assets["dataset"], output_dir=tmp_path / "r",
                          max_steps=1, report_to=["trackio"]))
    assert info.value.code == Codes.INVALID_ARGUMENT and "trackio" in info.value.message
    assert "pip install" in info.value.hint
