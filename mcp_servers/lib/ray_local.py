"""A Ray cluster on this machine that its owner starts and stops (the tests and the Ray bench): a head
and any number of worker nodes, each ``ray start --block`` in a process group of its own, on free
ports, with a short temp dir (Ray's socket paths must stay under the OS limit).

Every process of a node, the Ray workers and job drivers it starts included (some in sessions of their
own), carries the node's mark in its environment: removing a node (a node failure) or stopping the
cluster signals every process with the mark, never ``ray stop``, which would stop every Ray cluster on
the machine. A worker node can be started without the storage others see (``hide``): it runs in a
mount namespace of its own with an empty tmpfs over that path, as a machine without the shared mount
would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from mcp_servers.lib.ray_executor import ADDRESS_ENV, submission_client

MARK_ENV = "FORGE_RAY_LOCAL_NODE"
OBJECT_STORE_BYTES = 200 * 1024**2  # small: several nodes share this machine's /dev/shm


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _marked(mark: str) -> list[int]:
    """The pids whose environment carries ``mark`` (exact), as a node's processes do."""
    needle = f"{MARK_ENV}={mark}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # ended meanwhile, or not ours
            continue
    return pids


def _children(parents: set[int]) -> list[int]:
    """Every process whose parent is one of ``parents``, and theirs in turn: the raylet starts its dashboard
    and runtime-env agents with an environment of their own, without the node's mark."""
    found, frontier = set(), set(parents)
    while frontier:
        step = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in found and _parent(int(entry)) in frontier:
                step.add(int(entry))
        found |= step
        frontier = step
    return sorted(found)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2:].split()[1])


def _node_pids(mark: str) -> list[int]:
    marked = set(_marked(mark))
    return sorted(p for p in marked | set(_children(marked)) if p != os.getpid())


def _kill_marked(mark: str, deadline_s: float = 60) -> None:
    """SIGKILL every process of a node (those carrying its mark, and their children: the raylet's agents
    carry none), again until none is left (one may fork while the first go runs), and wait until each has
    died (a zombie waits only for its parent to reap it)."""
    end, killed = time.time() + deadline_s, set()
    while pids := _node_pids(mark):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        if time.time() > end:
            raise TimeoutError(f"processes of Ray node {mark} survive SIGKILL: {pids}")
        time.sleep(0.2)
    while any(_state(pid) not in ("", "Z") for pid in killed) and time.time() < end:
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2:].split()[0]


class LocalCluster:
    """A head (``start``), worker nodes (``add_node``), a node failure (``kill_node``), ``stop``."""

    def __init__(self, head_cpus: int = 2, start_timeout_s: float = 300):
        self.head_cpus, self.timeout_s = head_cpus, start_timeout_s
        self.temp = tempfile.mkdtemp(prefix="fray", dir="/tmp")
        self.id = uuid.uuid4().hex[:12]
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, subprocess.Popen] = {}  # node name → its `ray start` process
        self._logs: list = []

    # ---- nodes ----

    def _ray_start(self, name: str, args: list[str], hide: Path | None) -> None:
        agent_ports = [str(_free_port()) for _ in range(4)]
        command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-name", name,
                   "--node-ip-address", "127.0.0.1", "--object-store-memory", str(OBJECT_STORE_BYTES),
                   # the fixed default ports would clash with another node or cluster on this machine
                   "--dashboard-agent-listen-port", agent_ports[0], "--dashboard-agent-grpc-port", agent_ports[1],
                   "--runtime-env-agent-port", agent_ports[2], "--metrics-export-port", agent_ports[3],
                   "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats", *args]
        if hide is not None:
            command = _without_storage(Path(hide), command)
        log = open(Path(self.temp) / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        env = {k: v for k, v in os.environ.items() if k not in ADDRESS_ENV}  # never another cluster's address
        self.nodes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**env, "RAY_USAGE_STATS_ENABLED": "0", MARK_ENV: f"{self.id}:{name}"})

    def start(self) -> str:
        """Start the head node (dashboard and job API included); return its address (RAY_ADDRESS)."""
        self._ray_start("head", ["--head", "--num-cpus", str(self.head_cpus), "--num-gpus", "0",
                                 "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                                 "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
                                 "--temp-dir", self.temp], None)
        self._wait_for("head", lambda: _cpus_reported(self.address) >= self.head_cpus and self._takes_jobs())
        return self.address

    def add_node(self, name: str, num_cpus: int = 1, resources: dict | None = None,
                 hide: Path | None = None) -> None:
        """Start a worker node joining the head, with its CPUs and custom resources; wait until it is alive."""
        args = ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(num_cpus), "--num-gpus", "0"]
        if resources:
            args += ["--resources", json.dumps(resources)]
        self._ray_start(name, args, hide)
        self._wait_for(name, lambda: (self.node(name) or {}).get("state") == "ALIVE")

    def node(self, name: str) -> dict | None:
        """The node's row in Ray's state API (node_id, state, ...); the newest if the name was reused."""
        rows = [n for n in _state_nodes(self.address) if n.get("node_name") == name]
        return max(rows, key=lambda n: n.get("start_time_ms") or 0) if rows else None

    def kill_node(self, name: str) -> None:
        """A node failure: every process of the node killed at once; returns when the head sees it dead."""
        _kill_marked(f"{self.id}:{name}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.nodes.pop(name).wait(timeout=30)
        self._wait_for(f"{name} to be seen dead", lambda: (self.node(name) or {}).get("state") == "DEAD")

    def stop(self) -> None:
        """Every process of every node killed (the cluster goes as a whole: nothing to hand over)."""
        try:
            for name in sorted(self.nodes, key=lambda n: n == "head"):  # the workers first, then the head
                try:
                    _kill_marked(f"{self.id}:{name}")
                finally:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.nodes[name].wait(timeout=30)
        finally:
            self.nodes.clear()
            for log in self._logs:
                log.close()
            shutil.rmtree(self.temp, ignore_errors=True)

    # ---- waiting ----

    def _takes_jobs(self) -> bool:
        client = submission_client(self.address)
        probe = client.submit_job(entrypoint="true", entrypoint_num_cpus=0)
        deadline = time.time() + 120
        while (status := str(client.get_job_status(probe).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            if time.time() > deadline:
                raise TimeoutError(f"the probe job {probe} did not end in 120 s")
            time.sleep(0.5)
        return status == "SUCCEEDED"

    def _wait_for(self, what: str, ready) -> None:
        deadline = time.time() + self.timeout_s
        name = what.split()[0]
        while True:
            proc = self.nodes.get(name)
            if proc is not None and proc.poll() is not None:
                log = (Path(self.temp) / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ray start ({name}) exited {proc.returncode}: {log}")
            try:
                if ready():
                    return
            except Exception:
                if time.time() > deadline:
                    raise
            if time.time() > deadline:
                raise TimeoutError(f"gave up waiting for Ray node {what} after {self.timeout_s:g} s")
            time.sleep(1)


def can_hide_storage() -> bool:
    """Whether a node can be started without a path (``hide``): mount namespaces are allowed here."""
    probe = _without_storage(Path(tempfile.gettempdir()), ["true"])
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _without_storage(path: Path, command: list[str]) -> list[str]:
    """``command`` in a mount namespace of its own where ``path`` is an empty tmpfs (root, or a user
    namespace where unprivileged ones are allowed)."""
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *userns, "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount -t tmpfs forge-not-shared "$1" && shift && exec "$@"', "sh", str(path), *command]


def _state_nodes(address: str) -> list[dict]:
    import requests

    reply = requests.get(f"{address}/api/v0/nodes?detail=1", timeout=10)
    reply.raise_for_status()
    return reply.json()["data"]["result"]["result"]


def _cpus_reported(address: str) -> float:
    import requests

    status = requests.get(f"{address}/api/cluster_status", timeout=10).json()["data"]["clusterStatus"]
    return ((status or {}).get("loadMetricsReport") or {}).get("usage", {}).get("CPU", [0, 0])[1]


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2, start_timeout_s: float = 300, workers: dict | None = None):
    """A started cluster (``workers``: node name → add_node's keyword arguments), stopped on the way out."""
    cluster = LocalCluster(num_cpus, start_timeout_s)
    try:
        cluster.start()
        for name, spec in (workers or {}).items():
            cluster.add_node(name, **spec)
        yield cluster
    finally:
        cluster.stop()
