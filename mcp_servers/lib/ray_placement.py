"""Where a job can run on a Ray cluster, decided when it is submitted: what it asks Ray for, and whether
any node has that. A job no node can take is refused at once, with the cluster's nodes in the error,
rather than left in Ray's queue forever.

- A job in one process (the Ray job itself trains): CPUs (FORGE_RAY_JOB_CPUS, default 1), a GPU for a
  kind that runs a model when the cluster has GPUs, host memory from the memory planner where the base
  model's shape is known, and the custom resources FORGE_RAY_RESOURCES names (the nodes jobs belong on).
- A train through Ray Train (``num_processes > 1``, or restarts allowed with ``max_failures``): the Ray
  job only follows, on the head node, which lives as long as the cluster; each worker asks for a CPU (or
  a GPU) and the custom resources, and the workers together must fit the nodes.
- A sweep follows its Ray Tune trials from the head node in the same way (each trial asks for what a
  job in one process asks: forge.sweep_tune); with carry_through it merges and quantizes the winner
  itself, so it asks as a job does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.train.ray_train import custom_resources, ray_train_workers

GIB = 1024**3
GPU_KINDS = ("train", "pipeline", "evaluate")  # kinds that run a model on a GPU when the cluster has one
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node


def train_fields(kind: str, params: dict) -> dict:
    """A train or pipeline job's train settings (a pipeline keeps them under "train")."""
    if kind == "pipeline":
        return {**params, **(params.get("train") or {})}
    return params if kind == "train" else {}


def workers_of(kind: str, params: dict) -> int:
    fields = train_fields(kind, params)
    if not fields:
        return 0
    return ray_train_workers(int(fields.get("num_processes") or 1), fields.get("max_failures"))


def asks(kind: str, params: dict, cluster_gpus: float) -> dict:
    """What the Ray job asks for (num_cpus, num_gpus, memory, resources) and, through Ray Train, what each
    of its ``workers`` asks for (``per_worker``)."""
    custom = custom_resources()
    workers = workers_of(kind, params)
    per_worker = {"GPU" if cluster_gpus >= workers else "CPU": 1.0, **custom}
    if workers and kind == "train":  # the Ray job only follows its workers
        return {"num_cpus": 0, "num_gpus": 0, "resources": {HEAD_RESOURCE: 0.001}, "workers": workers,
                "per_worker": per_worker}
    if kind == "sweep" and not params.get("carry_through"):  # the Ray job only follows its Ray Tune trials
        return {"num_cpus": 0, "num_gpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
    # a pipeline's job merges, quantizes and evaluates after its Ray Train workers end: it asks as a job does
    # a sweep that carries its winner through merges and evaluates it: a GPU too
    runs_model = kind in GPU_KINDS or (kind == "sweep" and params.get("carry_through"))
    gpus = 1 if cluster_gpus and runs_model and not workers else 0
    out = {"num_cpus": float(os.environ.get("FORGE_RAY_JOB_CPUS") or 1), "num_gpus": gpus, "resources": custom}
    memory = planned_memory(kind, params, on_gpu=bool(gpus))
    if memory:
        out["memory"] = memory
    if workers:
        out.update(workers=workers, per_worker=per_worker)
    return out


def cuda_reason(kind: str, params: dict) -> str | None:
    """Why a job cannot run without a CUDA GPU, or None."""
    fields = train_fields(kind, params)
    if fields.get("attn_implementation") in ("flex_attention", "flash_attention_2"):
        return f"attn_implementation={fields['attn_implementation']}"
    if fields.get("use_liger_kernel"):
        return "use_liger_kernel=true"
    return None


def refusal(kind: str, params: dict, nodes: list[dict]) -> ForgeError | None:
    """Why no node of ``nodes`` (the cluster's, alive) could ever run the job, or None when one can."""
    if not nodes:
        return None  # a cluster that lists no node: Ray's own error, when it comes, says more
    listing = [describe(n) for n in nodes]
    cuda = cuda_reason(kind, params)
    if cuda and not any(n["gpus"] for n in nodes):
        return ForgeError(Codes.NO_NODE_FITS, f"this {kind} job needs a CUDA GPU ({cuda}) and no node of the Ray "
                          f"cluster has one: {'; '.join(listing)}",
                          "add a GPU node to the cluster (`ray start --address=<head>` on it), or leave that "
                          "setting at its default", details=listing)
    wanted = asks(kind, params, sum(n["gpus"] for n in nodes))
    single = {"CPU": wanted["num_cpus"], "GPU": wanted["num_gpus"], **wanted["resources"]}
    if wanted.get("memory"):
        single["memory"] = wanted["memory"]
    room = sum(_fits(n, wanted["per_worker"]) for n in nodes) if wanted.get("workers") else 0
    if wanted.get("workers") and room < wanted["workers"]:
        need = f"{wanted['workers']} Ray Train workers of {amounts(wanted['per_worker'])} each (room for {room})"
    elif not any(_fits(n, single) for n in nodes):
        need = amounts(single)
    else:
        return None
    return ForgeError(Codes.NO_NODE_FITS, f"no node of the Ray cluster can run this {kind} job, which needs {need}; "
                      f"the nodes: {'; '.join(listing)}",
                      "add a node that has it (`ray start --address=<head>` with --num-cpus, --memory or --resources), "
                      "or ask for less: a smaller base model, method=qlora, a lower max_length or num_processes",
                      details=listing)


def describe(node: dict) -> str:
    extra = "".join(f", {k} {v:g}" for k, v in sorted((node.get("resources") or {}).items()))
    return (f"{node.get('name') or node['ip']}{' (head)' if node.get('head') else ''}: {node['cpus']:g} CPU, "
            f"{node['gpus']:g} GPU, {node['memory_gib']:g} GiB{extra}")


def _fits(node: dict, each: dict) -> int:
    """How many of ``each`` the node holds in all (its total resources, not what is free now)."""
    have = {"CPU": node["cpus"], "GPU": node["gpus"], "memory": node["memory_gib"] * GIB,
            **(node.get("resources") or {})}
    counts = [have.get(name, 0) // amount for name, amount in each.items() if amount and name != HEAD_RESOURCE]
    return int(min(counts)) if counts else 1


def amounts(each: dict) -> str:
    parts = []
    for name, amount in each.items():
        if name == HEAD_RESOURCE or not amount:
            continue
        parts.append(f"{amount / GIB:.1f} GiB memory" if name == "memory" else f"{amount:g} {name}")
    return ", ".join(parts)


def planned_memory(kind: str, params: dict, on_gpu: bool) -> int | None:
    """Host memory a job needs, from the memory planner, when its base model is a local dir: on a GPU
    node the weights pass through host memory while loading; on a CPU node the whole run lives there."""
    if kind not in ("train", "pipeline", "merge"):
        return None
    from forge.planner import ModelShape, estimate

    fields = train_fields(kind, params) or params
    base = fields.get("base_model")
    if not base or not (Path(base) / "config.json").is_file():
        return None
    try:
        shape = ModelShape.from_config(json.loads((Path(base) / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    weights = (shape.layer_params() + shape.embedding_params()) * 2
    if kind == "merge" or on_gpu:
        return int(weights * 1.2)
    tokens = int(fields.get("max_length") or 1024)
    return estimate(shape, fields.get("method") or "lora", tokens, True, False, int(fields.get("lora_r") or 16))
