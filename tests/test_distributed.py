"""`forge train --num-processes 2`: two real ranks (torchrun, DDP over gloo) on the CPU."""

import json

from forge.cli import main
from forge.progress import read_progress


def test_two_process_cpu_training_reports_from_rank_zero_only(assets, tmp_path, capsys):
    run = tmp_path / "ddp"
    code = main(["train", "--base-model", assets["model_dir"], "--dataset", assets["dataset"], "--output-dir",
                 str(run), "--max-steps", "4", "--num-processes", "2", "--learning-rate", "0.001", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    metrics = out["metrics"]
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    steps = [e["step"] for e in read_progress(run / "progress.jsonl") if e["event"] == "progress"]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one line per step: rank 0 alone writes
    log = (run / "ranks.log").read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log
