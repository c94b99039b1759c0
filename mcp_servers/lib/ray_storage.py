"""Whether every node of a Ray cluster sees the server's FORGE_HOME, checked rather than assumed: the
server writes a new token into FORGE_HOME, and a Ray job runs a task on each node (pinned to it) that
reads the token back. A node that reads nothing, or another token, does not share the storage: jobs
there would write their outputs where the server never finds them.

Each check writes a token file of its own (``.forge-storage-check-<token>``, removed after), so two
checks (two servers on one FORGE_HOME) never read each other's; each node compares what it reads with
the token itself and answers only whether it matched (a link planted there is not followed, and no
file's content reaches Ray's job log).

The server side (``StorageCheck``) runs the check in the background when the executor starts and again
when it finds the cluster's nodes changed (a job submitted or placed, ``forge_environment``); until a
check of the current nodes passes, Ray jobs wait in Forge's queue, and after one fails they are refused
with the nodes named. A failed check is made again after RECHECK_S (the storage may have been mounted
since). The Ray job's side is this module's ``main``: ``python -m mcp_servers.lib.ray_storage FILE TOKEN``.
"""

from __future__ import annotations

import json
import logging
import secrets
import shlex
import sys
import threading
import time
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.workspace import atomic_write_text

log = logging.getLogger("forge.ray")
TOKEN_PREFIX = ".forge-storage-check-"
REPORT_MARK = "FORGE_SHARED_STORAGE "
CHECK_TIMEOUT_S = 180.0  # a node that does not answer by then is named as not answering
RECHECK_S = 60.0  # a check that failed (or could not run) is made again after this long


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
        for them, or the last one failed RECHECK_S ago. None until the first check of these nodes ends; a
        failed result stands while it is checked again."""
        nodes = frozenset(node_ids)
        with self._lock:
            if self._running():
                return self.result if self._nodes == nodes else None
            stale = self.result is not None and not self.result["ok"] and \
                time.time() - self.result["checked_at"] > RECHECK_S
            if self._nodes == nodes and self.result is not None and not stale:
                return self.result
            if self._nodes != nodes:  # other nodes: nothing is known of them yet
                self._nodes, self.result = nodes, None
            self._thread = threading.Thread(target=self._check, args=(nodes,), name="forge-storage-check", daemon=True)
            self._thread.start()
            return self.result  # a failed result stands until the new check says otherwise

    def wait(self, timeout_s: float) -> None:
        """Let a check under way end (a server stopping)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout_s)

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check(self, nodes: frozenset[str]) -> None:
        try:
            result = self._run()
        except Exception as exc:  # the check could not be made: say so; it is made again after RECHECK_S
            result = incomplete(f"the shared-storage check could not run on the Ray cluster: "
                                f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}")
        with self._lock:
            if self._nodes == nodes:
                self.result = result
        if not result["ok"]:
            log.error("%s %s", result["error"]["message"], result["error"]["hint"])

    def _run(self) -> dict:
        token = secrets.token_hex(16)
        path = self.home / f"{TOKEN_PREFIX}{token}"
        atomic_write_text(path, token)
        try:
            client = self._client_of()
            job_id = client.submit_job(
                entrypoint=f"{self.python} -m mcp_servers.lib.ray_storage {shlex.quote(str(path))} {token}",
                entrypoint_num_cpus=0, entrypoint_resources={self.head_resource: 0.001},
                metadata={"forge_kind": "storage_check"}, runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
            deadline = time.time() + CHECK_TIMEOUT_S + 60
            while str(client.get_job_status(job_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
                if time.time() > deadline:
                    client.stop_job(job_id)
                    raise TimeoutError(f"the check's Ray job {job_id} did not end in {CHECK_TIMEOUT_S + 60:g} s")
                time.sleep(0.5)
            logs = client.get_job_logs(job_id)
        finally:
            path.unlink(missing_ok=True)
        lines = [line for line in logs.splitlines() if line.startswith(REPORT_MARK)]
        if not lines:
            raise RuntimeError(f"the check's Ray job {job_id} reported nothing (is Forge installed for "
                               f"{self.python} on the head node?): {logs.strip()[-300:]}")
        return verdict(json.loads(lines[-1][len(REPORT_MARK):]), self.home)


def incomplete(message: str) -> dict:
    """A check that could not be made: jobs are refused (executor_unavailable, retryable) until one is."""
    return {"ok": False, "incomplete": True, "checked_at": time.time(), "error": ForgeError(
        Codes.EXECUTOR_UNAVAILABLE, message,
        f"check the cluster (`ray status`) and that the head node runs Forge; checked again after {RECHECK_S:g} s",
        retryable=True).to_dict()}


def verdict(nodes: list[dict], home: Path) -> dict:
    """The check's result from what each node answered."""
    blind = [n for n in nodes if not n.get("sees")]
    result = {"ok": not blind, "home": str(home), "checked_at": round(time.time(), 3),
              "nodes": [{"name": n["name"], "ip": n["ip"], "sees": bool(n.get("sees"))} for n in nodes]}
    if blind:
        named = "; ".join(f"{n['name']} ({n['ip']}, id {n['id'][:12]}): {n.get('problem') or 'read another file'}"
                          for n in blind)
        result["error"] = ForgeError(
            Codes.STORAGE_NOT_SHARED, f"{len(blind)} node(s) of the Ray cluster do not see FORGE_HOME {home}: "
            f"{named}", f"mount the storage that holds {home} at the same path on every node (NFS, a cluster "
            f"filesystem), or remove those nodes from the cluster; Forge checks again after {RECHECK_S:g} s "
            "and when the nodes change", details=[f"node: {n['name']} {n['ip']} {n['id']}" for n in blind]).to_dict()
    return result


def main(argv: list[str] | None = None) -> int:
    """On the cluster: on every alive node, read the token file and say whether it holds the token."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path, token = (argv if argv is not None else sys.argv[1:])[:2]
    ray.init()

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(token_path: str, expected: str) -> dict:
        import os

        try:
            fd = os.open(token_path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                return {"sees": os.read(fd, 64).decode("utf-8", "replace") == expected}
            finally:
                os.close(fd)
        except OSError as exc:
            return {"sees": False, "problem": f"{type(exc).__name__}: {exc.strerror or exc}"}

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(path, token) for n in nodes]
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
