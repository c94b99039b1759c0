"""What the live view reads from a run's progress file while it trains: points as they are appended, a
half-written last line left for the next poll, and a resumed run's curve cut back to where it resumed."""

import json

from mcp_servers.forge import ui_data
from mcp_servers.lib.store import JobStore


def write(path, events, partial: str = "") -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(e) + "\n" for e in events) + partial)


def progress(step: int, loss: float) -> dict:
    return {"event": "progress", "step": step, "total_steps": 10, "loss": loss, "learning_rate": 1e-3,
            "tokens_per_s": 100.0}


def test_curves_follow_the_file_and_a_resume_cuts_what_came_after_its_step(home):
    store = JobStore(home / "forge.db")
    try:
        run_dir = home / "runs" / "r1"
        run_dir.mkdir(parents=True)
        (run_dir / "train_config.json").write_text("{}", encoding="utf-8")
        job, _ = store.create("train", {"output_dir": str(run_dir)})
        path = run_dir / "progress.jsonl"
        write(path, [{"event": "train_begin", "step": 0, "total_steps": 10}, progress(1, 2.0), progress(2, 1.5),
                     {"event": "eval", "step": 2, "eval_loss": 1.7}], partial='{"event": "progress", "st')
        first = ui_data.job_view(store, job["id"])["curves"]
        assert first["loss"] == [[1, 2.0], [2, 1.5]] and first["eval_loss"] == [[2, 1.7]]
        write(path, [], partial='ep": 3, "total_steps": 10, "loss": 1.2}\n')  # the line, finished
        assert ui_data.job_view(store, job["id"])["curves"]["loss"][-1] == [3, 1.2]
        # crashed after step 3, resumed from the checkpoint at step 2: step 3 was never kept
        write(path, [{"event": "train_begin", "step": 2, "total_steps": 10}, progress(3, 1.1)])
        after = ui_data.job_view(store, job["id"])["curves"]
        assert after["loss"] == [[1, 2.0], [2, 1.5], [3, 1.1]]
        write(path, [{"event": "train_begin", "step": 1, "total_steps": 10}])
        assert ui_data.job_view(store, job["id"])["curves"]["loss"] == [[1, 2.0]]
        assert ui_data.job_view(store, job["id"])["curves"]["eval_loss"] == []
    finally:
        store.close()


def test_a_run_dir_outside_the_roots_is_not_read(home, tmp_path):
    store = JobStore(home / "forge.db")
    try:
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        (outside / "train_config.json").write_text("{}", encoding="utf-8")
        write(outside / "progress.jsonl", [progress(1, 2.0)])
        job, _ = store.create("train", {"output_dir": str(outside)})
        assert ui_data.job_view(store, job["id"])["curves"]["loss"] == []
    finally:
        store.close()
