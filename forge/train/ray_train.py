"""Training across nodes on a Ray cluster: Ray Train's TorchTrainer runs Forge's own train stage once
per worker (DDP; FSDP when ``distributed="fsdp"``), over gloo on CPUs and NCCL on GPUs.

Used when a train job runs as a Ray job (``FORGE_EXECUTOR=ray``) with ``num_processes > 1``, or with
restarts allowed (``max_failures``, even for one worker). Ray Train sets each worker's rank and starts
the process group; from there it is the same code as a torchrun rank: rank 0 alone writes progress,
checkpoints' extras, the adapter and the metrics, into the run dir on storage every node sees.

Each worker notes where it runs in the run dir (``ray_train_ranks.jsonl``). When Ray Train starts the
ranks again after a worker or its node was lost, each rank finds its earlier start there and continues
from the run's last checkpoint; rank 0 names the nodes that left, and the result lists every restart.
Without restarts left, a lost node ends the job as ``worker_lost``, with the node and the checkpoint.

The worker's function comes from the caller (``forge.train.run``), so this launcher never imports the
train stage back.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.paths import open_output
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import PROGRESS_FILE, STAGES_DIR, Outcome, record_stage
from forge.train.callbacks import STOP_FILE
from forge.train.launch import relay_rank0
from forge.train.run_dir import checkpoint_step, latest_checkpoint

RANKS_FILE = "ray_train_ranks.jsonl"
MAX_FAILURES_ENV = "FORGE_RAY_MAX_FAILURES"
RESOURCES_ENV = "FORGE_RAY_RESOURCES"  # JSON: custom resources each job (each Ray Train worker) asks for
IN_RANK_ENV = "FORGE_IN_RAY_TRAIN"
NODE_DEATH_WAIT_S = 120.0  # how long a failed run waits for Ray to declare a rank's node dead


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


def in_ray_train_rank() -> bool:
    return os.environ.get(IN_RANK_ENV) == "1"


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
    (run_dir / RANKS_FILE).unlink(missing_ok=True)  # the starts of this job's ranks only
    per_worker = {"GPU" if use_gpu else "CPU": 1.0, **custom_resources()}
    trainer = TorchTrainer(
        rank_main, train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name="ray_train", storage_path=str(run_dir.resolve()),
                             failure_config=FailureConfig(max_failures=restarts)))
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
        raise _failure(run_dir, outcome["error"], restarts)
    result = json.loads((run_dir / STAGES_DIR / "train.json").read_text(encoding="utf-8"))
    starts = _starts(run_dir)
    last = max((s["attempt"] for s in starts), default=1)
    result["metrics"]["nodes"] = [s["node"] for s in sorted(starts, key=lambda s: s["rank"]) if s["attempt"] == last]
    result["metrics"]["restarts"] = _restarts(starts)
    record_stage(run_dir, "train", result)
    return result


def rank_start(config):
    """Each Ray Train worker, as it starts: note the node it runs on; when Ray Train has started the ranks
    again (a worker or node was lost), continue from the run's last checkpoint, and rank 0 says so."""
    import ray

    os.environ[IN_RANK_ENV] = "1"
    run_dir = Path(config.run_dir())
    rank = ray.train.get_context().get_world_rank()
    earlier = [s for s in _starts(run_dir) if s["rank"] == rank]
    record = {"rank": rank, "attempt": len(earlier) + 1, "at": round(time.time(), 3),
              "node": _node_name(_this_node())}
    if earlier:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is not None:
            config = config.model_copy(update={"resume": True, "resume_from": None})
            record.update(resume_from=str(checkpoint), step=checkpoint_step(checkpoint))
    with open_output(run_dir / RANKS_FILE, "Ray Train ranks file", append=True) as fh:  # never through a link
        fh.write((json.dumps(record) + "\n").encode("utf-8"))
    if earlier and rank == 0:
        ProgressWriter(run_dir / PROGRESS_FILE).stage(
            "restarted", attempt=record["attempt"], resume_from=record.get("resume_from"), step=record.get("step"))
    return config


def _restarts(starts: list[dict]) -> list[dict]:
    """Each time Ray Train started the ranks again: from which checkpoint, and which nodes of the ranks before
    had left the cluster (none when a worker process died on a node that is still there)."""
    import ray

    dead = {n["NodeID"]: n for n in ray.nodes() if not n.get("Alive")}
    out = []
    for start in starts:
        if start["rank"] != 0 or start["attempt"] == 1:
            continue
        before = {s["node"]["id"] for s in starts if s["attempt"] == start["attempt"] - 1}
        out.append({**{k: start.get(k) for k in ("attempt", "resume_from", "step")},
                    "lost_nodes": [_node_name(dead[i]) for i in sorted(before) if i in dead]})
    return out


def _node_name(node: dict | None) -> dict:
    node = node or {}
    return {"name": node.get("NodeName") or node.get("NodeManagerAddress"), "ip": node.get("NodeManagerAddress"),
            "id": node.get("NodeID")}


def _this_node() -> dict | None:
    import ray

    here = ray.get_runtime_context().get_node_id()
    return next((n for n in ray.nodes() if n["NodeID"] == here), None)


def _starts(run_dir: Path) -> list[dict]:
    path = run_dir / RANKS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _looks_lost(error: BaseException) -> bool:
    """A Ray Train failure that a lost worker or node can cause (its actor died or cannot be reached)."""
    text = f"{type(error).__name__} {error} {error.__cause__!r}".lower()
    return any(word in text for word in ("died", "unavailable", "node", "worker group", "actor"))


def _failure(run_dir: Path, error: BaseException, restarts: int) -> ForgeError:
    """Why Ray Train failed, in Forge's words: a node of the ranks left the cluster (worker_lost, with
    the node and the checkpoint to resume from), or anything else (internal_error)."""
    import ray

    starts = _starts(run_dir)
    last = max((s["attempt"] for s in starts), default=1)
    used = {s["node"]["id"]: s for s in starts if s["attempt"] == last}
    # a rank's worker is seen gone at once; its node is declared dead after the missed health checks
    deadline = time.time() + (NODE_DEATH_WAIT_S if _looks_lost(error) else 0)
    while not (dead := [_node_name(n) for n in ray.nodes() if n["NodeID"] in used and not n.get("Alive")]):
        if time.time() >= deadline:
            break
        time.sleep(1)
    if not dead:
        return ForgeError(Codes.INTERNAL, f"Ray Train failed: {str(error).splitlines()[0][:400]}",
                          "read the job's log (forge://jobs/{id}/log); num_processes must not exceed the "
                          "cluster's GPUs (or CPUs)")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    names = ", ".join(f"{n['name']} ({n['ip']}, id {n['id'][:12]})" for n in dead)
    where = (f"from {checkpoint.name} (step {checkpoint_step(checkpoint)})" if checkpoint
             else "from the start (no checkpoint was saved yet)")
    tried = f" after {restarts} restart(s)" if restarts else ""
    return ForgeError(
        Codes.WORKER_LOST, f"node {names} left the Ray cluster while it trained rank(s) "
        f"{', '.join(str(used[n['id']]['rank']) for n in dead)}{tried}",
        f"resume with forge_train(resume_from_job=...): it continues {where} on the nodes left; "
        "max_failures (or FORGE_RAY_MAX_FAILURES) lets Ray Train restart on its own", retryable=True,
        details=[f"node: {n['name']} {n['ip']} {n['id']}" for n in dead]
        + ([f"checkpoint: {checkpoint}"] if checkpoint else []))
