"""Training across nodes on a Ray cluster: Ray Train's TorchTrainer runs Forge's own train stage once
per worker (DDP; FSDP when ``distributed="fsdp"``), over gloo on CPUs and NCCL on GPUs.

Used when a train job runs as a Ray job (``FORGE_EXECUTOR=ray``) with ``num_processes > 1``, or with
restarts allowed (``max_failures``, even for one worker). Ray Train sets each worker's rank and starts
the process group; from there it is the same code as a torchrun rank: rank 0 alone writes progress,
checkpoints' extras, the adapter and the metrics, into the run dir on storage every node sees.

Each worker notes where it runs (``ray_ranks``). When Ray Train starts the ranks again after a worker or
its node was lost, every rank continues from the run's last checkpoint, and the result lists every
restart with the nodes that left. Without restarts left, a lost node ends the job as ``worker_lost``,
with the node and the checkpoint.

The worker's function comes from the caller (``forge.train.run``), so this launcher never imports the
train stage back.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import STAGES_DIR, Outcome, update_record
from forge.train.callbacks import STOP_FILE
from forge.train.launch import relay_rank0
from forge.train.ray_ranks import clear_starts, failure, last_starts, read_starts, restarts_of
from forge.train.run_dir import latest_checkpoint

MAX_FAILURES_ENV = "FORGE_RAY_MAX_FAILURES"
RESOURCES_ENV = "FORGE_RAY_RESOURCES"  # JSON: custom resources each job (each Ray Train worker) asks for
START_RETRIES = 3  # Ray Train's tries to place a restart's workers (a minute each) before the run fails


def max_failures(value: int | None) -> int:
    """The restarts a train on Ray may take: the job's max_failures, else FORGE_RAY_MAX_FAILURES, else 0."""
    if value is not None:
        return int(value)
    configured = os.environ.get(MAX_FAILURES_ENV, "").strip()
    if not configured:
        return 0
    if not configured.isdigit():
        raise ForgeError(Codes.INVALID_ARGUMENT, f"{MAX_FAILURES_ENV}={configured!r} is not a whole number",
                         f"set {MAX_FAILURES_ENV} to the restarts Ray Train may take, e.g. 2, or unset it")
    return int(configured)


def ray_train_workers(num_processes: int, failures: int | None) -> int:
    """How many Ray Train workers a train job on Ray runs as; 0 when it runs in the Ray job's own process."""
    return num_processes if num_processes > 1 or max_failures(failures) > 0 else 0


def custom_resources() -> dict[str, float]:
    """FORGE_RAY_RESOURCES: the custom resources of the nodes jobs belong on, e.g. {"trainer": 1}."""
    text = os.environ.get(RESOURCES_ENV, "").strip()
    if not text:
        return {}
    try:
        parsed = json.loads(text)
        ok = isinstance(parsed, dict) and all(isinstance(v, int | float) and v > 0 for v in parsed.values())
    except ValueError:
        ok = False
    if not ok or any(k in ("CPU", "GPU", "memory") for k in parsed):
        raise ForgeError(Codes.INVALID_ARGUMENT, f"{RESOURCES_ENV}={text[:200]!r} is not a JSON object of custom "
                         "resources with positive amounts",
                         f'set it like {RESOURCES_ENV}=\'{{"trainer": 1}}\' (names given to `ray start --resources`); '
                         "CPUs, GPUs and memory Forge asks for itself")
    return {str(k): float(v) for k, v in parsed.items()}


def launch_ray_train(config, run_dir: Path, writer: ProgressWriter, on_progress: ProgressCallback | None,
                     rank_main: Callable[[dict], None]) -> dict:
    """Run the Ray Train workers, each calling ``rank_main`` with the config as a dict (the train stage, as a
    rank), and follow rank 0's progress until they end. A SIGTERM (Ray stopping the job) writes the run's
    STOP file: every rank saves a checkpoint and ends."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(ignore_reinit_error=True, log_to_driver=True)  # inside a Ray job: the job's own cluster
    workers, restarts = ray_train_workers(config.num_processes, config.max_failures), max_failures(config.max_failures)
    total = ray.cluster_resources()
    use_gpu = total.get("GPU", 0) >= workers
    if total.get("CPU", 0) < workers:  # Ray Train would wait for them forever
        raise ForgeError(Codes.NO_NODE_FITS,
                         f"num_processes={workers} needs {workers} Ray Train workers of a CPU each; the cluster has "
                         f"{total.get('CPU', 0):g} CPUs",
                         "lower num_processes, or add nodes to the cluster (`ray start --address=<head>`)")
    writer.stage("launching", num_processes=workers, distributed=config.distributed, launcher="ray_train",
                 use_gpu=use_gpu, max_failures=restarts)
    clear_starts(run_dir)  # the starts of this job's ranks only
    per_worker = {"GPU" if use_gpu else "CPU": 1.0, **custom_resources()}
    trainer = TorchTrainer(
        rank_main, train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name="ray_train", storage_path=str(run_dir.resolve()),
                             # a restart whose workers cannot be placed (too few nodes left) ends, not retried forever
                             failure_config=FailureConfig(max_failures=restarts,
                                                          controller_failure_limit=START_RETRIES)))
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
        raise failure(run_dir, outcome["error"])
    result = json.loads((run_dir / STAGES_DIR / "train.json").read_text(encoding="utf-8"))
    starts = read_starts(run_dir)
    latest = last_starts(starts)
    result["metrics"]["nodes"] = [latest[rank]["node"] for rank in sorted(latest)]  # where each rank finished
    result["metrics"]["restarts"] = restarts_of(starts)
    update_record(run_dir, "train", result)  # the record rank 0 made, completed: one training, one record
    return result
