"""Heavy jobs as Ray jobs (``FORGE_EXECUTOR=ray``): Ray's job submission API places each one on the
cluster with the CPUs, GPUs and memory it needs, and Ray's queue holds what does not fit.

The job id is the Ray submission id. The worker reports through its channel file in the run dir
(``mcp_servers.lib.channel``), which must be on storage every node sees; the server applies it to its
own store, reads Ray's status for what the worker could not say (it never started, it was killed),
and tails Ray's log. A restarted server finds its Ray jobs in the store and carries on.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.paths import CONFINED_ENV
from mcp_servers.lib import channel
from mcp_servers.lib.errors import JobCodes
from mcp_servers.lib.store import TERMINAL, JobStore, Status

log = logging.getLogger("forge.ray")
RAY_PIN = "ray[default,train]==2.60.0"
INSTALL_HINT = f"pip install 'forge-finetune[ray]' (pins {RAY_PIN}), or unset FORGE_EXECUTOR to run jobs here"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STATUS_EVERY_S = 2.0  # how often Ray is asked about each job (the channel is read on every pass)
GPU_KINDS = ("train", "pipeline", "evaluate")  # kinds that run a model on a GPU when the cluster has one
# What a Ray job's environment carries from the server's: Forge's own settings and the caches' places.
# Secrets (HF_TOKEN, FORGE_MCP_TOKEN) never go: Ray shows a job's runtime_env to anyone who can see
# the cluster. A publish job runs on the server's machine.
PASSED_ENV = ("FORGE_ALLOWED_ROOTS", "LLAMA_CPP_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
              "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "FORGE_NO_LIGER", "FORGE_LLAMA_CPP_SDIST")
GIB = 1024**3


def ray_address() -> str:
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


class RayExecutor:
    """Submits, follows and cancels the jobs a runner places on a Ray cluster."""

    def __init__(self, home: Path, store: JobStore, address: str | None = None):
        self.home, self.store = home, store
        self.address = address or ray_address()
        self._client = None
        self._asked: dict[str, float] = {}  # job id → when Ray was last asked about it

    # ---- the cluster ----

    @property
    def client(self):
        if self._client is None:
            try:
                from ray.job_submission import JobSubmissionClient
            except ImportError:
                raise ForgeError(Codes.EXECUTOR_UNAVAILABLE, "FORGE_EXECUTOR=ray, but Ray is not installed",
                                 INSTALL_HINT) from None
            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError or ValueError here
                raise ForgeError(Codes.EXECUTOR_UNAVAILABLE, f"no Ray cluster answers at {self.address}: "
                                 f"{str(exc).splitlines()[0][:300]}",
                                 "start one with `ray start --head` (see the README's Ray section) or set "
                                 "RAY_ADDRESS to the cluster's dashboard address, e.g. http://head:8265",
                                 retryable=True) from None
        return self._client

    def _get(self, route: str) -> dict:
        import requests

        reply = requests.get(self.client.get_address().rstrip("/") + route, timeout=10,
                             headers=getattr(self.client, "_headers", None) or {})
        reply.raise_for_status()
        return reply.json()["data"]

    def cluster(self) -> dict:
        """The cluster's nodes with their CPUs, GPUs and memory, and what is free across it now."""
        nodes = []
        for node in self._get("/api/v0/nodes?detail=1")["result"]["result"]:  # Ray's state API, from the GCS
            if node.get("state") != "ALIVE":
                continue
            total = node.get("resources_total") or {}
            nodes.append({"ip": node.get("node_ip"), "head": bool(node.get("is_head_node")),
                          "cpus": total.get("CPU", 0), "gpus": total.get("GPU", 0),
                          "memory_gib": round(total.get("memory", 0) / GIB, 1)})
        usage = self._get("/api/cluster_status")["clusterStatus"]["loadMetricsReport"]["usage"]
        free = {name: round(total - used, 2) for name, (used, total) in usage.items()
                if name in ("CPU", "GPU", "memory")}
        if "memory" in free:
            free["memory_gib"] = round(free.pop("memory") / GIB, 1)
        return {"address": self.client.get_address(), "nodes": nodes, "free": free}

    # ---- submit ----

    def resources(self, kind: str, params: dict) -> dict:
        """What a job asks Ray for: CPUs (FORGE_RAY_JOB_CPUS, default 1), a GPU for a model-running kind
        when the cluster has GPUs (a multi-process train's Ray Train workers ask for their own), and
        memory from the memory planner where the base model's shape is known."""
        ranks = int(params.get("num_processes") or 1)
        # a multi-process train's driver only follows its Ray Train workers, which ask for their own CPUs
        cpus = 0 if ranks > 1 else float(os.environ.get("FORGE_RAY_JOB_CPUS") or 1)
        try:
            cluster_gpus = sum(n["gpus"] for n in self.cluster()["nodes"])
        except Exception:  # a cluster that answers jobs but not the dashboard's routes: no GPU asked
            cluster_gpus = 0
        gpus = 1 if cluster_gpus and kind in GPU_KINDS and ranks <= 1 else 0
        out = {"num_cpus": cpus, "num_gpus": gpus}
        memory = _planned_memory(kind, params, on_gpu=bool(gpus))
        if memory:
            out["memory"] = memory
        return out

    def submit(self, job: dict) -> None:
        """Hand a queued job to Ray; it stays 'queued' in Forge until its worker starts on a node."""
        run_dir = Path(job["run_dir"])
        resources = self.resources(job["kind"], job["params"])
        channel.place(run_dir, {k: job[k] for k in ("id", "kind", "params", "run_dir", "status")})
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(FORGE_HOME=str(self.home), FORGE_EXECUTOR="ray", PYTHONUNBUFFERED="1", **{CONFINED_ENV: "1"},
                   # Ray's stop: SIGTERM (the trainer saves a checkpoint), SIGKILL after this many seconds
                   RAY_JOB_STOP_WAIT_TIME_S=os.environ.get("FORGE_RAY_CANCEL_GRACE_S", "60"))
        python = os.environ.get("FORGE_RAY_PYTHON") or sys.executable
        entrypoint = f"{shlex.quote(python)} -m mcp_servers.lib.worker --channel {shlex.quote(str(run_dir))}"
        self.client.submit_job(
            entrypoint=entrypoint, submission_id=job["id"], runtime_env={"env_vars": env},
            metadata={"forge_kind": job["kind"]}, entrypoint_num_cpus=resources["num_cpus"],
            entrypoint_num_gpus=resources["num_gpus"], entrypoint_memory=resources.get("memory"))
        self.store.update(job["id"], stage=waiting_stage(resources),
                          placement={"executor": "ray", "address": self.address, "resources": resources})
        log.info("job %s submitted to Ray at %s with %s", job["id"], self.address, resources)

    # ---- follow ----

    def sync(self, job: dict) -> None:
        """Apply the job's channel to the store; when Ray says it ended and the worker did not say how,
        record what Ray knows."""
        self._ingest(job)
        job = self.store.get(job["id"])
        if Status(job["status"]) in TERMINAL or time.time() - self._asked.get(job["id"], 0) < STATUS_EVERY_S:
            return
        self._asked[job["id"]] = time.time()
        try:
            info = self.client.get_job_info(job["id"])
        except ForgeError:
            return  # the cluster is unreachable: the job's state is unknown, not failed; asked again later
        except Exception as exc:
            if "does not exist" not in str(exc):
                log.warning("Ray did not answer about job %s: %s", job["id"], exc)
                return
            info = None  # the cluster lost the job (it was restarted)
        status = str(info.status.value if hasattr(info.status, "value") else info.status) if info else "LOST"
        if status in ("PENDING", "RUNNING"):
            return
        self._ingest(self.store.get(job["id"]))  # what the worker wrote just before it ended
        job = self.store.get(job["id"])
        if Status(job["status"]) in TERMINAL:
            return
        self._asked.pop(job["id"], None)
        if job["status"] == Status.CANCELLING.value or status == "STOPPED":
            self.store.transition(job["id"], Status.CANCELLED)
            return
        message = (info.message or "") if info else "the Ray cluster no longer knows this job"
        self.store.transition(job["id"], Status.FAILED, error={
            "code": JobCodes.WORKER_LOST, "retryable": True,
            "message": f"the Ray job ended ({status}) without recording a final state: {message[:300]}",
            "hint": "read the job's log (forge://jobs/{id}/log); start it again — a train job continues "
                    "from its last checkpoint with resume_from_job", "details": [f"ray status: {status}"]})

    def _ingest(self, job: dict) -> None:
        ops, offset = channel.read(Path(job["run_dir"]), job["channel_offset"])
        if offset != job["channel_offset"]:
            self.store.apply(job["id"], ops, offset)

    # ---- cancel and logs ----

    def cancel(self, job: dict, force: bool) -> dict:
        """Ray stops the job: SIGTERM to its processes (a trainer saves a checkpoint and ends), SIGKILL
        after FORGE_RAY_CANCEL_GRACE_S. Forced: the worker also kills its process group at once. A job
        still in Ray's queue is cancelled on the spot."""
        status = Status(job["status"])
        if force:
            channel.request_kill(Path(job["run_dir"]))
        try:
            self.client.stop_job(job["id"])
        except Exception as exc:
            if "does not exist" not in str(exc):
                raise
        if status == Status.QUEUED:
            return self.store.transition(job["id"], Status.CANCELLED)
        if status == Status.RUNNING:
            self.store.transition(job["id"], Status.CANCELLING)
        return self.store.get(job["id"])

    def log_tail(self, job_id: str, lines: int) -> str:
        try:
            text = self.client.get_job_logs(job_id)
        except Exception as exc:
            return f"(the Ray job's log could not be read: {str(exc).splitlines()[0][:200]})"
        return "\n".join(text.splitlines()[-lines:])


def waiting_stage(resources: dict) -> str:
    asks = [f"{resources['num_cpus']:g} CPU", f"{resources['num_gpus']:g} GPU"]
    if resources.get("memory"):
        asks.append(f"{resources['memory'] / GIB:.1f} GiB memory")
    return f"ray_queue: waiting in Ray's queue for {', '.join(asks)}"


def _planned_memory(kind: str, params: dict, on_gpu: bool) -> int | None:
    """Host memory a job needs, from the memory planner, when its base model is a local dir: on a GPU
    node the weights pass through host memory while loading; on a CPU node the whole run lives there."""
    if kind not in ("train", "pipeline", "merge"):
        return None
    from forge.planner import ModelShape, estimate

    base = params.get("base_model")
    if not base or not (Path(base) / "config.json").is_file():
        return None
    try:
        shape = ModelShape.from_config(json.loads((Path(base) / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    weights = (shape.layer_params() + shape.embedding_params()) * 2
    if kind == "merge" or on_gpu:
        return int(weights * 1.2)
    tokens = int(params.get("max_length") or 1024)
    return estimate(shape, params.get("method") or "lora", tokens, True, False, int(params.get("lora_r") or 16))
