"""A one-node Ray cluster that its owner starts and stops (the tests and the Ray bench): ``ray start
--head --block`` in a process group of its own, on free ports, with a short temp dir (Ray's socket
paths must stay under the OS limit), stopped by signalling that group — never ``ray stop``, which
would stop every Ray cluster on the machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2, start_timeout_s: float = 300):
    """Yield the dashboard address (RAY_ADDRESS) of a fresh head node; stop it on the way out."""
    from ray.job_submission import JobSubmissionClient

    ray_bin = Path(sys.executable).parent / "ray"
    temp = tempfile.mkdtemp(prefix="fray", dir="/tmp")
    gcs_port, dashboard_port, *agent_ports = (_free_port() for _ in range(6))
    address = f"http://127.0.0.1:{dashboard_port}"
    log = open(Path(temp) / "ray-start.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--num-gpus", "0",
         "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         # the agents' fixed default ports would clash with another cluster on this machine
         "--dashboard-agent-listen-port", str(agent_ports[0]), "--dashboard-agent-grpc-port", str(agent_ports[1]),
         "--runtime-env-agent-port", str(agent_ports[2]), "--metrics-export-port", str(agent_ports[3]),
         "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline = time.time() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}: "
                                   f"{(Path(temp) / 'ray-start.log').read_text(errors='replace')[-2000:]}")
            try:
                client = JobSubmissionClient(address)
                if _cpus_reported(address) >= num_cpus:  # the head node registered its resources
                    probe = client.submit_job(entrypoint="true")  # and its job agent takes jobs
                    while str(client.get_job_status(probe).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
                        time.sleep(0.5)
                    break
            except Exception:
                if time.time() > deadline:
                    raise
            if time.time() > deadline:
                raise TimeoutError(f"the Ray head at {address} did not report its CPUs in {start_timeout_s:g} s")
            time.sleep(1)
        yield address
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _cpus_reported(address: str) -> float:
    import requests

    status = requests.get(f"{address}/api/cluster_status", timeout=10).json()["data"]["clusterStatus"]
    return ((status or {}).get("loadMetricsReport") or {}).get("usage", {}).get("CPU", [0, 0])[1]


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
