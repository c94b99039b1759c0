"""Training across nodes on a Ray cluster: Ray Train's TorchTrainer runs Forge's own train stage once
per worker (DDP; FSDP when ``distributed="fsdp"``), over gloo on CPUs and NCCL on GPUs.

Used when a train job with ``num_processes > 1`` runs as a Ray job (``FORGE_EXECUTOR=ray``). Ray
Train sets each worker's rank and starts the process group; from there it is the same code as a
torchrun rank: rank 0 alone writes progress, checkpoints' extras, the adapter and the metrics, into
the run dir on storage every node sees, and resuming reads the checkpoints from there.

The worker's function comes from the caller (``forge.train.run``), so this launcher never imports the
train stage back.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import STAGES_DIR, Outcome
from forge.train.callbacks import STOP_FILE
from forge.train.launch import relay_rank0
from forge.train.run_dir import latest_checkpoint


def launch_ray_train(config, run_dir: Path, writer: ProgressWriter, on_progress: ProgressCallback | None,
                     rank_main: Callable[[dict], None]) -> dict:
    """Run ``config.num_processes`` Ray Train workers, each calling ``rank_main`` with the config as a dict
    (the train stage, as a rank), and follow rank 0's progress until they end. A SIGTERM (Ray stopping the
    job) writes the run's STOP file: every rank saves a checkpoint and ends."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(ignore_reinit_error=True, log_to_driver=True)  # inside a Ray job: the job's own cluster
    total = ray.cluster_resources()
    use_gpu = total.get("GPU", 0) >= config.num_processes
    if total.get("CPU", 0) < config.num_processes:  # Ray Train would wait for them forever
        raise ForgeError(Codes.INVALID_ARGUMENT,
                         f"num_processes={config.num_processes} needs {config.num_processes} Ray Train workers of "
                         f"a CPU each; the cluster has {total.get('CPU', 0):g} CPUs",
                         "lower num_processes, or add nodes to the cluster (`ray start --address=<head>`)")
    writer.stage("launching", num_processes=config.num_processes, distributed=config.distributed,
                 launcher="ray_train", use_gpu=use_gpu)
    trainer = TorchTrainer(
        rank_main, train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=config.num_processes, use_gpu=use_gpu),
        run_config=RunConfig(name="ray_train", storage_path=str(run_dir.resolve())))
    outcome: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # reported below, in the launching thread
            outcome["error"] = exc

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: (run_dir / STOP_FILE).touch())
    thread = threading.Thread(target=fit, name="ray-train", daemon=True)
    thread.start()
    relay_rank0(run_dir, on_progress, thread.is_alive)
    if (run_dir / STOP_FILE).exists():  # stopped: the ranks saved a checkpoint
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        writer.stage("cancelled", checkpoint=str(checkpoint))
        return {"status": Outcome.CANCELLED, "run_dir": str(run_dir), "checkpoint": str(checkpoint)}
    if "error" in outcome:
        raise ForgeError(Codes.INTERNAL, f"Ray Train failed: {str(outcome['error']).splitlines()[0][:400]}",
                         "read the job's log (forge://jobs/{id}/log); num_processes must not exceed the "
                         "cluster's GPUs (or CPUs)") from outcome["error"]
    return json.loads((run_dir / STAGES_DIR / "train.json").read_text(encoding="utf-8"))
