"""Several processes on one machine: where this process stands among the ranks, torchrun starting N of them
(``-m forge._dist_train``, each running the train stage), and following rank 0's progress file while they
run (Ray Train's launcher follows it the same way)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.paths import open_output
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import PROGRESS_FILE, STAGES_DIR
from forge.train.config import TrainConfig
from forge.workspace import atomic_write_json


def rank_index() -> int:
    return int(os.environ.get("RANK", "0"))


def in_launched_rank() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relay_rank0(run_dir: Path, on_progress: ProgressCallback | None, running) -> None:
    """Pass rank 0's progress lines on to ``on_progress`` while ``running()`` is true, then the rest."""
    progress_path = run_dir / PROGRESS_FILE
    seen = len(progress_path.read_text(encoding="utf-8").splitlines()) if progress_path.is_file() else 0
    while True:
        done = not running()
        if on_progress and progress_path.is_file():
            lines = progress_path.read_text(encoding="utf-8").splitlines()
            for line in lines[seen:]:
                on_progress(json.loads(line))
            seen = len(lines)
        if done:
            return
        time.sleep(0.5)


def launch_distributed(config: TrainConfig, run_dir: Path, writer: ProgressWriter,
                       on_progress: ProgressCallback | None) -> dict:
    """Start N ranks with torch.distributed.run and follow rank 0's progress file until they end."""
    import subprocess
    import sys

    launch_config = run_dir / "launch_config.json"
    atomic_write_json(launch_config, config.model_dump(mode="json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", str(config.num_processes), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "forge._dist_train", str(launch_config)]
    writer.stage("launching", num_processes=config.num_processes, distributed=config.distributed)
    with open_output(run_dir / "ranks.log", "ranks log", append=True) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=False)
        try:
            relay_rank0(run_dir, on_progress, lambda: proc.poll() is None)
        except BaseException:
            proc.terminate()
            proc.wait(timeout=60)
            raise
    if proc.returncode != 0:
        tail = "\n".join((run_dir / "ranks.log").read_text(encoding="utf-8", errors="replace").splitlines()[-8:])
        raise ForgeError(Codes.INTERNAL, f"multi-process training failed (exit {proc.returncode}): {tail}",
                         f"see {run_dir / 'ranks.log'}; num_processes must not exceed the GPUs (or CPU cores)")
    return json.loads((run_dir / STAGES_DIR / "train.json").read_text(encoding="utf-8"))
