"""Heavy jobs as Ray jobs (``FORGE_EXECUTOR=ray``): Ray's job submission API places each one on the
cluster with the CPUs, GPUs and memory it needs, and Ray's queue holds what does not fit.

The job id is the Ray submission id. The worker reports through its channel file in the job's own dir
(``mcp_servers.lib.channel``), which must be on storage every node sees; the server applies it to its
own store, reads Ray's status for what the worker could not say (it never started, it was killed),
and tails Ray's log. A restarted server finds its Ray jobs in the store and carries on.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import threading
import time
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.paths import CONFINED_ENV
from mcp_servers.lib import channel, ray_placement
from mcp_servers.lib.errors import JobCodes
from mcp_servers.lib.paths import job_dir
from mcp_servers.lib.ray_storage import StorageCheck, incomplete
from mcp_servers.lib.store import TERMINAL, JobStore, Status

log = logging.getLogger("forge.ray")
RAY_PIN = "ray[default,train]==2.60.0"
INSTALL_HINT = f"pip install 'forge-finetune[ray]' (pins {RAY_PIN}), or unset FORGE_EXECUTOR to run jobs here"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CLUSTER_TTL_S = 2.0  # how long a listing of the cluster's nodes serves
STATUS_EVERY_S = 2.0  # how often Ray is asked about each job (the channel is read on every pass)
OWN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
OWN_PREFIXES = ("node:", "accelerator_type:")
# What a Ray job's environment carries from the server's: Forge's own settings and the caches' places.
# Secrets (HF_TOKEN, FORGE_MCP_TOKEN) never go: Ray shows a job's runtime_env to anyone who can see
# the cluster. A publish job runs on the server's machine.
PASSED_ENV = ("FORGE_ALLOWED_ROOTS", "FORGE_RAY_RESOURCES", "FORGE_RAY_MAX_FAILURES", "LLAMA_CPP_DIR", "HF_HOME",
              "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
              "FORGE_NO_LIGER", "FORGE_LLAMA_CPP_SDIST")
GIB = 1024**3
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_ENV_LOCK = threading.Lock()


def ray_address() -> str:
    with _ENV_LOCK:  # never read while submission_client has it out of the environment
        return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def submission_client(address: str):
    """Ray's JobSubmissionClient for ``address`` itself. Ray's constructor takes RAY_API_SERVER_ADDRESS or
    RAY_ADDRESS from the environment over the address it is given, which would follow a job placed on one
    cluster on another (the server's RAY_ADDRESS changed since, or a test's cluster after another's)."""
    from ray.job_submission import JobSubmissionClient

    with _ENV_LOCK:
        saved = {k: os.environ.pop(k) for k in ADDRESS_ENV if k in os.environ}
        try:
            return JobSubmissionClient(address)
        finally:
            os.environ.update(saved)


def ray_python() -> str:
    """The Python a Ray job runs Forge with on the nodes: FORGE_RAY_PYTHON, else this server's."""
    return os.environ.get("FORGE_RAY_PYTHON") or sys.executable


class RayExecutor:
    """Submits, follows and cancels the jobs a runner places on a Ray cluster."""

    def __init__(self, home: Path, store: JobStore, address: str | None = None):
        self.home, self.store = home, store
        self.address = address or ray_address()
        self._client = None
        self._asked: dict[str, float] = {}  # job id → when Ray was last asked about it
        self._cluster: tuple[float, dict] | None = None
        self._storage = StorageCheck(home, lambda: self.client, shlex.quote(ray_python()), ray_placement.HEAD_RESOURCE)

    # ---- the cluster ----

    @property
    def client(self):
        if self._client is None:
            try:
                import ray.job_submission  # noqa: F401
            except ImportError:
                raise ForgeError(Codes.EXECUTOR_UNAVAILABLE, "FORGE_EXECUTOR=ray, but Ray is not installed",
                                 INSTALL_HINT) from None
            try:
                self._client = submission_client(self.address)
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
        """The cluster's nodes with their CPUs, GPUs and memory, and what is free across it now (asked at
        most every CLUSTER_TTL_S: a pass placing several jobs asks once)."""
        cached = self._cluster
        if cached is not None and time.monotonic() - cached[0] < CLUSTER_TTL_S:
            return cached[1]
        self._cluster = (time.monotonic(), self._ask_cluster())
        return self._cluster[1]

    def _ask_cluster(self) -> dict:
        nodes = []
        for node in self._state_nodes():
            if node.get("state") != "ALIVE":
                continue
            total = node.get("resources_total") or {}
            custom = {k: v for k, v in total.items() if k not in OWN_RESOURCES and not k.startswith(OWN_PREFIXES)
                      and "_group_" not in k}  # a placement group's bundles, while Ray Train holds them
            nodes.append({"name": node.get("node_name") or node.get("node_ip"), "ip": node.get("node_ip"),
                          "id": node.get("node_id"), "head": bool(node.get("is_head_node")),
                          "cpus": total.get("CPU", 0), "gpus": total.get("GPU", 0),
                          "memory_gib": round(total.get("memory", 0) / GIB, 1),
                          **({"resources": custom} if custom else {})})
        usage = self._get("/api/cluster_status")["clusterStatus"]["loadMetricsReport"]["usage"]
        free = {name: round(total - used, 2) for name, (used, total) in usage.items()
                if name in ("CPU", "GPU", "memory")}
        if "memory" in free:
            free["memory_gib"] = round(free.pop("memory") / GIB, 1)
        return {"address": self.client.get_address(), "nodes": nodes, "free": free}

    def node_states(self) -> dict[str, dict]:
        """Every node Ray's state API knows, dead ones too, by id: name, ip, state and why it died."""
        return {n.get("node_id"): {"name": n.get("node_name") or n.get("node_ip"), "ip": n.get("node_ip"),
                                   "id": n.get("node_id"), "state": n.get("state"),
                                   "why": n.get("state_message") or ""}
                for n in self._state_nodes()}

    def _state_nodes(self) -> list[dict]:
        """Every node Ray's state API (from the GCS) knows, alive or dead, as it lists them."""
        return self._get("/api/v0/nodes?detail=1")["result"]["result"]

    # ---- what every node sees, and what fits ----

    def storage(self, nodes: list[dict]) -> dict | None:
        """The shared-storage check's result for these nodes (None while it runs; it starts if needed)."""
        return self._storage.state(n["id"] for n in nodes)

    def placeable(self) -> dict | None:
        """Before a job is handed to Ray: the shared-storage check of the nodes there now ({"ok": ...}), or
        None while it runs (or the dashboard did not answer: asked again on the next pass)."""
        client = self.client  # no cluster at the address: ForgeError executor_unavailable
        try:
            nodes = self.cluster()["nodes"]
        except Exception as exc:
            return incomplete(f"the Ray dashboard at {client.get_address()} did not list the cluster's nodes, so "
                              f"Forge cannot check that they see FORGE_HOME: {str(exc).splitlines()[0][:200]}")
        return self.storage(nodes)

    def close(self, timeout_s: float = 60) -> None:
        """A server stopping: let a storage check under way end."""
        self._storage.wait(timeout_s)

    def report(self) -> dict:
        """For forge_environment: the cluster's nodes and free resources, and the shared-storage check."""
        report = self.cluster()
        checked = self.storage(report["nodes"])
        if checked is None:
            report["shared_storage"] = {"checking": True, "home": str(self.home)}
        else:
            report["shared_storage"] = {k: checked[k] for k in ("ok", "home", "nodes") if k in checked}
            if checked.get("error"):
                report["shared_storage"]["error"] = checked["error"]
        return report

    def admit(self, kind: str, params: dict) -> None:
        """Refuse, at submit, a job that could never run here: a cluster whose nodes do not all see
        FORGE_HOME, or no node with what the job asks for. A cluster that does not answer is not refused
        here: the job fails with executor_unavailable when it is placed."""
        try:
            nodes = self.cluster()["nodes"]
        except Exception:
            return
        checked = self.storage(nodes)
        if checked is not None and not checked["ok"]:
            raise ForgeError(**_error_args(checked["error"]))
        refused = ray_placement.refusal(kind, params, nodes)
        if refused is not None:
            raise refused

    # ---- submit ----

    def resources(self, kind: str, params: dict) -> dict:
        """What a job asks Ray for (``ray_placement.asks``), from the cluster's GPUs."""
        try:
            cluster_gpus = sum(n["gpus"] for n in self.cluster()["nodes"])
        except Exception:  # a cluster that answers jobs but not the dashboard's routes: no GPU asked
            cluster_gpus = 0
        return ray_placement.asks(kind, params, cluster_gpus)

    def submit(self, job: dict) -> None:
        """Hand a queued job to Ray; it stays 'queued' in Forge until its worker starts on a node."""
        own_dir = job_dir(self.home, job["id"])  # the channel, kill file and working dir
        resources = self.resources(job["kind"], job["params"])
        channel.place(own_dir, {k: job[k] for k in ("id", "kind", "params", "run_dir", "status")})
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(FORGE_HOME=str(self.home), FORGE_EXECUTOR="ray", PYTHONUNBUFFERED="1", **{CONFINED_ENV: "1"},
                   # Ray's stop: SIGTERM (the trainer saves a checkpoint), SIGKILL after this many seconds
                   RAY_JOB_STOP_WAIT_TIME_S=os.environ.get("FORGE_RAY_CANCEL_GRACE_S", "60"))
        entrypoint = f"{shlex.quote(ray_python())} -m mcp_servers.lib.worker --channel {shlex.quote(str(own_dir))}"
        self.client.submit_job(
            entrypoint=entrypoint, submission_id=job["id"], runtime_env={"env_vars": env},
            metadata={"forge_kind": job["kind"]}, entrypoint_num_cpus=resources["num_cpus"],
            entrypoint_num_gpus=resources["num_gpus"], entrypoint_memory=resources.get("memory"),
            entrypoint_resources=resources["resources"] or None)
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
        if status == "RUNNING" and not (job["placement"] or {}).get("node"):
            self._note_node(job, getattr(info, "driver_node_id", None))
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
        self.store.transition(job["id"], Status.FAILED,
                              error=self._lost(job, status, message, getattr(info, "driver_node_id", None)))

    def _note_node(self, job: dict, node_id: str | None) -> None:
        """Record the node a job's worker runs on (the Ray job's driver node) in its placement."""
        try:
            node = self.node_states().get(node_id) if node_id else None
        except Exception:
            return  # asked again on the next pass
        if node:
            placement = {**(job["placement"] or {}), "node": {k: node[k] for k in ("name", "ip", "id")}}
            self.store.update(job["id"], placement=placement)

    def _lost(self, job: dict, status: str, message: str, driver_node: str | None) -> dict:
        """The error of a Ray job that ended without its worker saying how: the node it ran on when that
        node left the cluster, and for a train the checkpoint a resume continues from."""
        from forge.train.run_dir import checkpoint_step, latest_checkpoint

        node_id = ((self.store.get(job["id"])["placement"] or {}).get("node") or {}).get("id") or driver_node
        try:
            node = self.node_states().get(node_id) or {}
        except Exception:
            node = {}
        details = [f"ray status: {status}"]
        gone = node.get("state") == "DEAD"
        if gone:
            text = (f"node {node['name']} ({node['ip']}, id {node['id'][:12]}) running the job left the Ray "
                    f"cluster{': ' + node['why'][:200] if node['why'] else ''}")
            details.append(f"node: {node['name']} {node['ip']} {node['id']}")
        else:
            text = f"the Ray job ended ({status}) without recording a final state: {message[:300]}"
        hint = "read the job's log (forge://jobs/{id}/log) and start the job again"
        run_dir = Path((job["params"] or {}).get("output_dir") or job["run_dir"])
        checkpoint = latest_checkpoint(run_dir / "checkpoints") if job["kind"] == "train" else None
        if checkpoint is not None:
            hint = (f"forge_train(resume_from_job=\"{job['id']}\") continues from {checkpoint.name} (step "
                    f"{checkpoint_step(checkpoint)}){' on the nodes left' if gone else ''}")
            details.append(f"checkpoint: {checkpoint}")
        elif job["kind"] == "train":
            hint += "; no checkpoint was saved yet, so a train starts from the beginning"
        return {"code": JobCodes.WORKER_LOST, "retryable": True, "message": text, "hint": hint, "details": details}

    def _ingest(self, job: dict) -> None:
        ops, offset = channel.read(job_dir(self.home, job["id"]), job["channel_offset"])
        if offset != job["channel_offset"]:
            self.store.apply(job["id"], ops, offset)

    # ---- cancel and logs ----

    def cancel(self, job: dict, force: bool) -> dict:
        """Ray stops the job: SIGTERM to its processes (a trainer saves a checkpoint and ends), SIGKILL
        after FORGE_RAY_CANCEL_GRACE_S. Forced: the worker also kills its process group at once. A job
        still in Ray's queue is cancelled on the spot."""
        status = Status(job["status"])
        if force:
            channel.request_kill(job_dir(self.home, job["id"]))
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
    if resources.get("workers") and not resources["num_cpus"]:  # a train that only follows its workers
        return (f"ray_queue: waiting in Ray's queue for {resources['workers']} Ray Train workers of "
                f"{ray_placement.amounts(resources['per_worker'])}")
    asks = [f"{resources['num_cpus']:g} CPU", f"{resources['num_gpus']:g} GPU"]
    if resources.get("memory"):
        asks.append(f"{resources['memory'] / GIB:.1f} GiB memory")
    asks += [f"{v:g} {k}" for k, v in resources["resources"].items()]
    return f"ray_queue: waiting in Ray's queue for {', '.join(asks)}"


def _error_args(error: dict) -> dict:
    return {"code": error["code"], "message": error["message"], "hint": error.get("hint", ""),
            "retryable": error.get("retryable", False), "details": error.get("details") or []}
