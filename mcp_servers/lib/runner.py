"""Runs jobs: a queue behind a concurrency limit, one worker subprocess per job in its own session,
cancel (SIGTERM, or SIGKILL of the process group when forced), and reconciliation after restarts.

With ``FORGE_EXECUTOR=ray`` the heavy jobs go to a Ray cluster instead (``ray_executor``): Ray's queue
holds them, and the same store, statuses and events follow them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from forge import disk
from forge.errors import Codes
from forge.failures import error_from
from forge.paths import CONFINED_ENV, forge_home, open_output
from mcp_servers.lib import sweep_jobs
from mcp_servers.lib.errors import ForgeError, JobCodes
from mcp_servers.lib.jobs import HEAVY_KINDS
from mcp_servers.lib.paths import job_dir, planned_run_dir
from mcp_servers.lib.ray_placement import train_fields
from mcp_servers.lib.store import TERMINAL, JobStore, Status, new_job_id

log = logging.getLogger("forge.runner")
HEARTBEAT_STALE_S = 30.0
PUMP_INTERVAL_S = 0.5
EXECUTORS = ("local", "ray")
CHECKING_STORAGE = "ray_queue: checking that every node of the cluster sees FORGE_HOME"


def executor_choice() -> str:
    """FORGE_EXECUTOR: ``local`` (the default: worker subprocesses on this machine) or ``ray``."""
    choice = (os.environ.get("FORGE_EXECUTOR") or "local").strip().lower()
    if choice not in EXECUTORS:
        raise ForgeError(Codes.INVALID_ARGUMENT, f"FORGE_EXECUTOR={choice!r} is not an executor",
                         f"set it to one of {', '.join(EXECUTORS)}, or leave it unset for local")
    return choice


def default_concurrency() -> int:
    """FORGE_MAX_CONCURRENT_JOBS (0 holds every job in the queue), else one per GPU, one on a CPU."""
    configured = os.environ.get("FORGE_MAX_CONCURRENT_JOBS", "").strip()
    if configured:
        try:
            return max(0, int(configured))
        except ValueError:
            log.warning("FORGE_MAX_CONCURRENT_JOBS=%r is not a number; using the default", configured)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        gpus = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.TimeoutExpired):
        gpus = 0
    return max(1, gpus)  # one per GPU; one on a CPU-only machine


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Runner:
    def __init__(self, home: Path | None = None, max_concurrent: int | None = None):
        self.executor = executor_choice()  # refused before anything is opened
        self.home = Path(home) if home else forge_home()
        self.store = JobStore(self.home / "forge.db")
        self.max_concurrent = default_concurrency() if max_concurrent is None else max_concurrent
        self.procs: dict[str, subprocess.Popen] = {}
        self._ray: dict[str, object] = {}  # Ray address → RayExecutor (jobs placed under another setting too)
        self._lock = threading.Lock()
        self._ray_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._checking: threading.Thread | None = None  # starts the shared-storage check (Ray)

    # ---- lifecycle ----

    def start(self) -> None:
        if self._thread is None:
            disk.ensure_reserve(self.home)  # room for a job to record that the disk filled up
            self.reconcile()
            if self.executor == "ray":  # every node must see FORGE_HOME: checked now, in the background
                self._checking = threading.Thread(target=self._check_ray_storage, name="forge-ray-storage",
                                                  daemon=True)
                self._checking.start()
            self._thread = threading.Thread(target=self._loop, name="forge-runner", daemon=True)
            self._thread.start()

    def _check_ray_storage(self) -> None:
        try:
            self.ray().placeable()
        except Exception as exc:  # no cluster yet: each job says so when it is placed
            log.warning("the shared-storage check did not start: %s", str(exc).splitlines()[0] if str(exc) else exc)

    def stop(self) -> None:
        """Stop scheduling. Running workers carry on: they outlive the server by design."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._checking is not None:
            self._checking.join(timeout=60)
        for executor in list(self._ray.values()):
            executor.close()
        active = {j["id"] for j in self.store.active()}
        for job_id, proc in list(self.procs.items()):
            if job_id not in active:  # its final state is written; the process is only exiting
                proc.wait(timeout=60)
                self.procs.pop(job_id)

    def _loop(self) -> None:
        while not self._stop.wait(PUMP_INTERVAL_S):
            try:
                self.pump()
            except Exception:  # the loop must outlive one bad pass; the next pass retries
                log.exception("scheduling pass failed; retrying in %.1f s", PUMP_INTERVAL_S)

    # ---- submit and schedule ----

    def job_dir(self, job_id: str) -> Path:
        """The job's own dir (its log, its working dir); where its outputs go is the store's ``run_dir``."""
        return job_dir(self.home, job_id)

    def submit(self, kind: str, params: dict, client_request_id: str | None = None) -> tuple[dict, bool]:
        if self.executor == "ray" and kind in HEAVY_KINDS:
            self.ray().admit(kind, params)  # a job no node could ever take is refused now, not queued forever
        elif train_fields(kind, params).get("max_failures"):
            raise ForgeError(Codes.INVALID_ARGUMENT, "max_failures restarts training on a Ray cluster, and this "
                             "server runs jobs here (FORGE_EXECUTOR=local)",
                             "leave max_failures out: a stopped train continues from its last checkpoint with "
                             "forge_train(resume_from_job=...)")
        job_id = new_job_id(kind)
        own_dir = self.job_dir(job_id)
        if kind in ("train", "pipeline", "sweep") and not params.get("output_dir"):
            # runs/<job_id>/ is the run dir, or runs/<run_name>/ when the caller named it
            name = params.get("run_name")
            params = {**{k: v for k, v in params.items() if k != "run_name"},
                      "output_dir": str(own_dir.parent / name if name else own_dir)}
        # where the outputs go is known from the start, so every status says it, the first one too
        run_dir = str(planned_run_dir(kind, params, own_dir))
        job, created = self.store.create(kind, params, client_request_id, held=kind == "sweep", job_id=job_id,
                                         run_dir=run_dir)
        if created and kind == "sweep":  # held out of the queue until its trials exist
            try:
                sweep_jobs.create_trials(self.store, job, params)
            except BaseException as exc:
                self.store.transition(job["id"], Status.FAILED, error=error_from(exc).to_dict())
                raise
            self.store.update(job["id"], placement=None)
        self.pump()
        return self.store.get(job["id"]), created

    def queue_position(self, job_id: str) -> int | None:
        ids = [j["id"] for j in self.store.queued()]
        return ids.index(job_id) + 1 if job_id in ids else None

    def ray(self, address: str | None = None):
        from mcp_servers.lib.ray_executor import RayExecutor, ray_address

        address = address or ray_address()
        with self._ray_lock:  # one executor (and one storage check) per address, whichever thread asks first
            if address not in self._ray:
                self._ray[address] = RayExecutor(self.home, self.store, address)
            return self._ray[address]

    def executor_report(self) -> dict:
        """Where heavy jobs run: here (with the concurrency limit) or on a Ray cluster (its nodes, GPUs
        and free resources, or why it does not answer)."""
        if self.executor == "local":
            return {"name": "local", "max_concurrent_jobs": self.max_concurrent}
        try:
            return {"name": "ray", **self.ray().report()}
        except ForgeError as err:
            return {"name": "ray", "address": self.ray().address, "error": err.to_dict()}
        except Exception as exc:  # the dashboard answered, but not as expected
            return {"name": "ray", "address": self.ray().address, "error": {"message": str(exc)[:300]}}

    def _ray_of(self, job: dict):
        """The Ray executor holding a job, or None for a local one."""
        placement = job.get("placement") or {}
        return self.ray(placement.get("address")) if placement.get("executor") == "ray" else None

    def pump(self) -> None:
        with self._lock:
            self.reconcile()
            running = sum(1 for j in self.store.active() if j["kind"] in HEAVY_KINDS and not self._ray_of(j))
            for job in self.store.queued():
                if self.max_concurrent == 0:
                    break
                if job["kind"] in HEAVY_KINDS and self.executor == "ray":
                    self._place_on_ray(job)  # Ray's queue holds it until the cluster has room
                    continue
                if job["kind"] in HEAVY_KINDS and running >= self.max_concurrent:
                    break
                self._spawn(job)
                running += job["kind"] in HEAVY_KINDS

    def _place_on_ray(self, job: dict) -> None:
        try:
            checked = self.ray().placeable()
            if checked is None:  # Ray gets the job once every node is known to see FORGE_HOME
                if job["stage"] != CHECKING_STORAGE:
                    self.store.update(job["id"], stage=CHECKING_STORAGE)
                return
            if not checked["ok"]:
                self.store.transition(job["id"], Status.FAILED, error=checked["error"])
                return
            self._prepare_job_dir(job["id"]).close()
            self.ray().submit(job)
        except ForgeError as err:
            self.store.transition(job["id"], Status.FAILED, error=err.to_dict())
        except Exception as exc:  # Ray refused the submission
            if "already exists" in str(exc):  # submitted before a restart cut the record short
                self.store.update(job["id"], placement={"executor": "ray", "address": self.ray().address})
                return
            if "try again" in str(exc):  # a head node still starting its job agent: the next pass retries
                self.store.update(job["id"], stage=f"ray_queue: the cluster is not taking jobs yet "
                                                   f"({str(exc).splitlines()[0][:120]})")
                return
            self.store.transition(job["id"], Status.FAILED, error={
                "code": Codes.EXECUTOR_UNAVAILABLE, "retryable": True,
                "message": f"Ray refused the job: {str(exc).splitlines()[0][:300]}",
                "hint": "check the cluster (`ray status`) and start the job again", "details": []})

    def _spawn(self, job: dict) -> None:
        # Claim the job before starting a worker: two servers on one FORGE_HOME (say Claude Desktop
        # and Claude Code) pump the same queue, and only one claim can succeed.
        try:
            self.store.transition(job["id"], Status.RUNNING, heartbeat_at=time.time())
        except ForgeError as err:
            if err.code == JobCodes.INVALID_TRANSITION:
                return
            raise
        own_dir = self.job_dir(job["id"])
        try:
            log = self._prepare_job_dir(job["id"])
        except ForgeError as err:
            self.store.transition(job["id"], Status.FAILED, error=err.to_dict())
            return
        env = {k: v for k, v in os.environ.items() if k != "FORGE_MCP_TOKEN"}
        env.update(FORGE_HOME=str(self.home), **{CONFINED_ENV: "1"})  # a job's inputs came from an agent
        env.setdefault("PYTHONUNBUFFERED", "1")
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mcp_servers.lib.worker", str(self.store.path), job["id"]],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=own_dir,  # relative names resolve in the job's own dir, never where the server started
                start_new_session=True,  # its own process group: a server restart does not kill it
            )
        self.procs[job["id"]] = proc
        self.store.update(job["id"], pid=proc.pid, placement={"executor": "local"})

    def _prepare_job_dir(self, job_id: str):
        """The job's own dir under FORGE_HOME/runs, made, and its log opened; a link planted there is refused."""
        own_dir = self.job_dir(job_id)
        if own_dir.is_symlink() or not own_dir.resolve().is_relative_to(self.home):
            raise ForgeError(Codes.PATH_NOT_ALLOWED, f"the job's dir {own_dir} is a link, or leads outside "
                             f"{self.home}", "remove what was put at that path and start the job again")
        own_dir.mkdir(parents=True, exist_ok=True)
        return open_output(own_dir / "job.log", "job log", append=True)  # never through a link

    # ---- restart and crash handling ----

    def _reap(self) -> None:
        """Wait for workers that already ended (no zombies); active jobs among them are reconciled."""
        active = {j["id"] for j in self.store.active()}
        for job_id, proc in list(self.procs.items()):
            if proc.poll() is not None and job_id not in active:
                self.procs.pop(job_id)

    def reconcile(self) -> None:
        self._reap()
        for job in self.store.placed("ray"):
            self._ray_of(job).sync(job)
        for job in self.store.active():
            if self._ray_of(job) or job["kind"] == sweep_jobs.TRIAL_KIND:  # a trial lives as long as its sweep
                continue
            proc = self.procs.get(job["id"])
            if proc is not None:
                rc = proc.poll()
                if rc is None:
                    continue
                self.procs.pop(job["id"], None)
                job = self.store.get(job["id"])
                if Status(job["status"]) in TERMINAL:
                    continue
                self._worker_gone(job, rc)
            elif job["pid"] is None and time.time() - (job["started_at"] or 0) < HEARTBEAT_STALE_S:
                continue  # claimed by another server a moment ago; its worker is starting
            elif not _alive(job["pid"]) or time.time() - (job["heartbeat_at"] or 0) > HEARTBEAT_STALE_S:
                self._worker_gone(job, None)
        sweep_jobs.settle(self.store)

    def _worker_gone(self, job: dict, rc: int | None) -> None:
        if job["status"] == Status.CANCELLING.value:
            self.store.transition(job["id"], Status.CANCELLED)
            return
        if rc is not None and rc == -signal.SIGKILL:
            error = {"code": JobCodes.WORKER_KILLED, "retryable": True,
                     "message": "the worker was killed by a signal (SIGKILL), often the out-of-memory killer",
                     "hint": "if memory ran out, lower per_device_train_batch_size or max_length, or use qlora; "
                             "a train job continues from its last checkpoint with resume_from_job",
                     "details": ["signal: SIGKILL"]}
        elif rc is not None and rc < 0:
            error = {"code": JobCodes.WORKER_CRASHED, "retryable": True,
                     "message": f"the worker process died from {signal.Signals(-rc).name}",
                     "hint": "the worker crashed; see the job log (forge://jobs/{id}/log)", "details": []}
        else:
            error = {"code": JobCodes.WORKER_LOST, "retryable": True,
                     "message": "the worker process ended without recording a final state",
                     "hint": "start the job again; a train job continues from its last checkpoint with "
                             "resume_from_job", "details": []}
        self.store.transition(job["id"], Status.FAILED, error=error)

    def log_tail(self, job: dict, lines: int) -> str | None:
        """A Ray job's log, from Ray; None for a local job (its log is job.log in the job's own dir)."""
        executor = self._ray_of(job)
        return executor.log_tail(job["id"], lines) if executor else None

    # ---- cancel ----

    def cancel(self, job_id: str, force: bool = False) -> dict:
        job = self.store.get(job_id)
        status = Status(job["status"])
        if job["kind"] == sweep_jobs.TRIAL_KIND:
            sweep = job["params"]["sweep"]
            raise ForgeError(Codes.INVALID_ARGUMENT, f"{job_id} is a trial of the sweep {sweep}, which runs its "
                             "trials itself", f'cancel the sweep: forge_job_cancel(job_id="{sweep}")')
        if status in TERMINAL:
            return job
        if self._ray_of(job):
            return self._ray_of(job).cancel(job, force)
        if status == Status.QUEUED:
            return self.store.transition(job_id, Status.CANCELLED)
        if status == Status.RUNNING:
            self.store.transition(job_id, Status.CANCELLING)
        pid = job["pid"]
        if pid is None:  # claimed, worker not started yet: it sees 'cancelling' and stops at once
            return self.store.get(job_id)
        try:
            if force:
                os.killpg(pid, signal.SIGKILL)  # the worker leads its own process group
            else:
                os.kill(pid, signal.SIGTERM)  # the trainer saves a checkpoint and exits
        except ProcessLookupError:
            pass
        if force:
            proc = self.procs.pop(job_id, None)
            if proc is not None:
                proc.wait(timeout=30)
            if self.store.get(job_id)["status"] == Status.CANCELLING.value:
                self.store.transition(job_id, Status.CANCELLED)
        return self.store.get(job_id)
