"""The ranks of a Ray Train run, as the run dir keeps them: where each one started, each time Ray Train
started them, so a restart continues from the run's last checkpoint, the result lists every restart with
the nodes that left, and a failed run says which node it lost.

Each start is a file of its own under ``ray_train_ranks/`` (``rank<R>-attempt<N>.json``, written whole):
ranks on several nodes never append to one file over a network filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.progress import ProgressWriter
from forge.runs import PROGRESS_FILE
from forge.train.run_dir import checkpoint_step, latest_checkpoint
from forge.workspace import atomic_write_json

RANKS_DIR = "ray_train_ranks"
IN_RANK_ENV = "FORGE_IN_RAY_TRAIN"
NODE_DEATH_WAIT_S = 90.0  # how long a failed run waits for Ray to declare a lost rank's node dead


def in_ray_train_rank() -> bool:
    return os.environ.get(IN_RANK_ENV) == "1"


def clear_starts(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / RANKS_DIR, ignore_errors=True)


def read_starts(run_dir: Path) -> list[dict]:
    """Every start recorded for the run's ranks (a file that cannot be read is left out)."""
    starts = []
    for path in sorted((Path(run_dir) / RANKS_DIR).glob("rank*-attempt*.json")):
        try:
            starts.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return starts


def rank_start(config):
    """Each Ray Train worker, as it starts: note the node it runs on, and continue from the run's last
    checkpoint when there is one. One rule for every rank, so they never disagree: the driver refused a run
    dir with checkpoints unless resuming, and no rank saves before all ranks have joined, so a checkpoint
    there is this job's own (a restart) or the one it resumes from. Rank 0 says when it is a restart."""
    import ray

    os.environ[IN_RANK_ENV] = "1"
    run_dir = Path(config.run_dir())
    rank = ray.train.get_context().get_world_rank()
    starts = read_starts(run_dir)
    attempt = 1 + sum(s["rank"] == rank for s in starts)
    record = {"rank": rank, "attempt": attempt, "at": round(time.time(), 3), "node": node_name(_this_node())}
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is not None:
        config = config.model_copy(update={"resume": True, "resume_from": None})
        record.update(resume_from=str(checkpoint), step=checkpoint_step(checkpoint))
    atomic_write_json(run_dir / RANKS_DIR / f"rank{rank}-attempt{attempt}.json", record)
    if rank == 0 and attempt > 1:
        ProgressWriter(run_dir / PROGRESS_FILE).stage(
            "restarted", attempt=attempt, resume_from=record.get("resume_from"), step=record.get("step"))
    return config


def last_starts(starts: list[dict]) -> dict[int, dict]:
    """Each rank's last start, by rank."""
    latest: dict[int, dict] = {}
    for start in starts:
        if start["attempt"] >= latest.get(start["rank"], {}).get("attempt", 0):
            latest[start["rank"]] = start
    return latest


def restarts_of(starts: list[dict]) -> list[dict]:
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
                    "lost_nodes": [node_name(dead[i]) for i in sorted(before) if i in dead]})
    return out


def node_name(node: dict | None) -> dict:
    node = node or {}
    return {"name": node.get("NodeName") or node.get("NodeManagerAddress"), "ip": node.get("NodeManagerAddress"),
            "id": node.get("NodeID")}


def _this_node() -> dict | None:
    import ray

    here = ray.get_runtime_context().get_node_id()
    return next((n for n in ray.nodes() if n["NodeID"] == here), None)


def failure(run_dir: Path, error: BaseException) -> ForgeError:
    """Why Ray Train failed, in Forge's words: a rank's own ForgeError as it was raised; a node of the ranks
    that left the cluster (worker_lost, with the node and the checkpoint to resume from); else each rank's
    error (internal_error)."""
    import ray

    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        raised = cause if isinstance(cause, ForgeError) else getattr(cause, "cause", None)
        if isinstance(raised, ForgeError):
            return raised
    latest = last_starts(read_starts(run_dir))  # where the failed attempt ran
    ranks_on: dict[str, list[int]] = {}
    for rank, start in latest.items():
        ranks_on.setdefault(start["node"]["id"], []).append(rank)
    last = max((s["attempt"] for s in latest.values()), default=1)
    # a rank's worker is seen gone at once; its node is declared dead only after the missed health checks
    lost_kind = type(error).__name__ in ("WorkerGroupError", "ControllerError", "TrainingFailedError")
    deadline = time.time() + (NODE_DEATH_WAIT_S if lost_kind else 0)
    while not (dead := [node_name(n) for n in ray.nodes() if n["NodeID"] in ranks_on and not n.get("Alive")]):
        if time.time() >= deadline:
            break
        time.sleep(1)
    if not dead:
        said = "; ".join(f"rank {r}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__}"
                         for r, e in sorted(failures.items())) or str(error).strip().splitlines()[0][:400]
        return ForgeError(Codes.INTERNAL, f"Ray Train failed: {said}",
                          "read the job's log (forge://jobs/{id}/log); num_processes must not exceed the "
                          "cluster's GPUs (or CPUs)")
    checkpoint = latest_checkpoint(Path(run_dir) / "checkpoints")
    names = ", ".join(f"{n['name']} ({n['ip']}, id {n['id'][:12]})" for n in dead)
    ranks = sorted(r for n in dead for r in ranks_on[n["id"]])
    where = (f"from {checkpoint.name} (step {checkpoint_step(checkpoint)})" if checkpoint
             else "from the start (no checkpoint was saved yet)")
    restarted = f", after {last - 1} restart(s)" if last > 1 else ""
    return ForgeError(
        Codes.WORKER_LOST, f"node {names} left the Ray cluster while it trained rank(s) "
        f"{', '.join(map(str, ranks))}{restarted}",
        f"forge_train(resume_from_job=...) continues {where} where the cluster has room for its ranks; "
        "max_failures (or FORGE_RAY_MAX_FAILURES) lets Ray Train restart on its own", retryable=True,
        details=[f"node: {n['name']} {n['ip']} {n['id']}" for n in dead]
        + ([f"checkpoint: {checkpoint}"] if checkpoint else []))
