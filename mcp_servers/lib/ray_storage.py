"""Whether every node of a Ray cluster sees the server's FORGE_HOME, checked rather than assumed: the
server writes a new token into FORGE_HOME, and a Ray job runs a task on each node (pinned to it) that
reads the token back. A node that reads nothing, or another token, does not share the storage: jobs
there would write their outputs where the server never finds them.

The server side (``StorageCheck``) runs the check in the background when the executor starts and again
whenever the cluster's set of nodes changes; until a check of the current nodes passes, Ray jobs wait
in Forge's queue, and after one fails they are refused with the nodes named. The Ray job's side is
this module's ``main``: ``python -m mcp_servers.lib.ray_storage TOKEN_FILE``.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import threading
import time
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.workspace import atomic_write_text

log = logging.getLogger("forge.ray")
TOKEN_FILE = ".forge-shared-storage-token"
REPORT_MARK = "FORGE_SHARED_STORAGE "
CHECK_TIMEOUT_S = 180.0  # a node that does not answer by then is named as not answering


class StorageCheck:
    """The shared-storage check of one cluster: started for a set of nodes, its result kept for that set."""

    def __init__(self, home: Path, client_of, python: str, head_resource: str):
        self.home, self._client_of, self.python, self.head_resource = Path(home), client_of, python, head_resource
        self._lock = threading.Lock()
        self._nodes: frozenset[str] | None = None  # the node ids the result (or the check running) is for
        self.result: dict | None = None
        self._thread: threading.Thread | None = None

    def state(self, node_ids) -> dict | None:
        """The result for these nodes ({"ok": ...}); starts a check (in the background) when none was made
        for them, and gives None while one runs."""
        nodes = frozenset(node_ids)
        with self._lock:
            if self._nodes == nodes and (self.result is not None or self._running()):
                return self.result
            if self._running():  # a check of other nodes still runs: its end starts the next
                return None
            self._nodes, self.result = nodes, None
            self._thread = threading.Thread(target=self._check, args=(nodes,), name="forge-storage-check", daemon=True)
            self._thread.start()
            return None

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check(self, nodes: frozenset[str]) -> None:
        try:
            result = self._run()
        except Exception as exc:  # the check could not be made: say so, and make it again next time
            result = {"ok": False, "incomplete": True, "error": ForgeError(
                Codes.EXECUTOR_UNAVAILABLE, f"the shared-storage check could not run on the Ray cluster: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
                "check the cluster (`ray status`); Forge checks again when the next job is submitted",
                retryable=True).to_dict()}
        with self._lock:
            if self._nodes == nodes:
                self.result = result
                if result.get("incomplete"):
                    self._nodes = None  # the next state() starts a new check
        if not result["ok"]:
            log.error("%s %s", result["error"]["message"], result["error"]["hint"])

    def _run(self) -> dict:
        token = secrets.token_hex(16)
        path = self.home / TOKEN_FILE
        atomic_write_text(path, token)
        client = self._client_of()
        job_id = client.submit_job(
            entrypoint=f"{self.python} -m mcp_servers.lib.ray_storage {path}", entrypoint_num_cpus=0,
            entrypoint_resources={self.head_resource: 0.001}, metadata={"forge_kind": "storage_check"},
            runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
        deadline = time.time() + CHECK_TIMEOUT_S + 60
        while str(client.get_job_status(job_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            if time.time() > deadline:
                client.stop_job(job_id)
                raise TimeoutError(f"the check's Ray job {job_id} did not end in {CHECK_TIMEOUT_S + 60:g} s")
            time.sleep(0.5)
        logs = client.get_job_logs(job_id)
        lines = [line for line in logs.splitlines() if line.startswith(REPORT_MARK)]
        if not lines:
            raise RuntimeError(f"the check's Ray job {job_id} reported nothing: {logs[-300:]}")
        return verdict(json.loads(lines[-1][len(REPORT_MARK):]), token, self.home)


def verdict(nodes: list[dict], token: str, home: Path) -> dict:
    """The check's result from what each node read back."""
    for node in nodes:
        node["sees"] = node.pop("read", None) == token
    blind = [n for n in nodes if not n["sees"]]
    result = {"ok": not blind, "home": str(home), "checked_at": round(time.time(), 3),
              "nodes": [{k: n.get(k) for k in ("name", "ip", "sees")} for n in nodes]}
    if blind:
        named = "; ".join(f"{n['name']} ({n['ip']}, id {n['id'][:12]}): {n.get('problem') or 'another token'}"
                          for n in blind)
        result["error"] = ForgeError(
            Codes.STORAGE_NOT_SHARED, f"{len(blind)} node(s) of the Ray cluster do not see FORGE_HOME {home}: "
            f"{named}", f"mount the storage that holds {home} at the same path on every node (NFS, a cluster "
            "filesystem), or remove those nodes from the cluster; Forge checks again when the nodes change",
            details=[f"node: {n['name']} {n['ip']} {n['id']}" for n in blind]).to_dict()
    return result


def main(argv: list[str] | None = None) -> int:
    """On the cluster: read the token file on every alive node and print what each read."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = (argv if argv is not None else sys.argv[1:])[0]
    ray.init()

    @ray.remote(num_cpus=0, max_retries=0)
    def read_token(token_path: str) -> dict:
        try:
            with open(token_path, encoding="utf-8") as fh:  # noqa: PTH123 - the plainest read there is
                return {"read": fh.read(64)}
        except OSError as exc:
            return {"problem": f"{type(exc).__name__}: {exc.strerror or exc}"}

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [read_token.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(path) for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=CHECK_TIMEOUT_S)
    report = []
    for node, ref in zip(nodes, refs, strict=True):
        row = {"id": node["NodeID"], "name": node.get("NodeName") or node["NodeManagerAddress"],
               "ip": node["NodeManagerAddress"]}
        try:
            row.update(ray.get(ref, timeout=1) if ref in ready else {"problem": "did not answer in time"})
        except Exception as exc:  # the node died while it was asked
            row["problem"] = f"could not run the check: {str(exc).splitlines()[0][:200]}"
        report.append(row)
    print(REPORT_MARK + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
