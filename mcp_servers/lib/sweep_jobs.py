"""A sweep's trials as jobs an agent can follow: one ``trial`` job per configuration, created with the sweep
(``{sweep_id}-t1``, …), placed inside it (never queued on their own), moved through running → succeeded /
failed by the sweep's worker, each with its own stage, progress and result. The sweep's own result holds the
table so far. A trial left unfinished when its sweep ended is closed with the sweep's outcome."""

from __future__ import annotations

import os
import time

from forge.errors import ForgeError
from forge.runs import Outcome
from mcp_servers.lib.store import TERMINAL, JobStore, Status

TRIAL_KIND = "trial"
ROW_KEYS = ("trial", "learning_rate", "num_train_epochs", "lora_r", "status", "learned", "of", "final_loss",
            "kept_pct", "prose_ppl_change_pct", "stopped", "within_budget")


def trial_id(sweep_id: str, name: str) -> str:
    return f"{sweep_id}-{name}"


def create_trials(store: JobStore, sweep: dict, params: dict) -> list[dict]:
    """The sweep's trial jobs, planned from its (checked) params now, so an agent can follow them at once."""
    from forge.sweep import SweepConfig, plan

    config = SweepConfig.build(**{k: v for k, v in params.items() if not k.startswith("_")})
    created = []
    for trial in plan(config):
        job_params = {"sweep": sweep["id"], "trial": trial.name, **trial.values}
        job, _ = store.create(TRIAL_KIND, job_params, job_id=trial_id(sweep["id"], trial.name),
                              placement={"executor": "sweep", "sweep": sweep["id"]}, run_dir=str(trial.run_dir))
        created.append(job)
    return created


def compact(row: dict) -> dict:
    return {k: row[k] for k in ROW_KEYS if row.get(k) is not None}


class StoreHooks:
    """The sweep worker's hooks: each trial's moves, stage and progress to its job, the table to the sweep's."""

    def __init__(self, store, sweep_id: str, tracker):
        self.store, self.sweep_id, self.tracker = store, sweep_id, tracker
        self.rows: dict[str, dict] = {}
        self.trackers: dict[str, object] = {}

    def _id(self, trial) -> str:
        return trial_id(self.sweep_id, trial.name)

    def started(self, trial) -> None:
        self.trackers[trial.name] = self.tracker()
        self.store.transition(self._id(trial), Status.RUNNING, pid=os.getpid(), heartbeat_at=time.time(),
                              stage="starting")
        self.rows[trial.name] = {**trial.row(), "status": Status.RUNNING.value}
        self._table()

    def progress(self, trial, event: dict) -> None:
        tracker = self.trackers.get(trial.name)
        if tracker is None:
            return
        if not event.get("evaluating"):  # a trial's steps and percent are its training's
            tracker.update(event)
        kind = event.get("event")
        if kind == "stage":
            self.store.update(self._id(trial), stage=event["stage"], progress=tracker.progress)
            self.store.add_event(self._id(trial), "stage", event)
        elif kind == "progress":
            self.store.update(self._id(trial), progress=tracker.progress, heartbeat_at=time.time())
        elif kind:
            self.store.add_event(self._id(trial), kind, event)

    def finished(self, trial, row: dict, result: dict | None) -> None:
        """The trial's final move: succeeded, failed or cancelled; a trial never started (skipped) is
        cancelled with the reason."""
        status = {Outcome.SUCCEEDED: Status.SUCCEEDED, Outcome.CANCELLED: Status.CANCELLED}.get(
            row.get("status"), Status.FAILED)
        tracker = self.trackers.get(trial.name)
        error = row.get("error")
        if tracker is None or row.get("status") == "skipped":  # never started, or stopped by the time budget
            status = Status.CANCELLED
            error = {"code": "skipped", "message": row.get("why") or "the sweep ended first", "retryable": False,
                     "hint": "start a new sweep with more minutes or fewer trials"}
        progress = tracker.finish() if tracker and status == Status.SUCCEEDED else (
            tracker.progress if tracker else {})
        outcome = {"status": row.get("status"), "run_dir": str(trial.run_dir), "row": compact(row),
                   **({"adapter_dir": str(trial.run_dir / "adapter")} if status == Status.SUCCEEDED else {}),
                   **({"stages": {"evaluate": result}} if result and "table" in result else {})}
        try:
            self.store.transition(self._id(trial), status, result=outcome, progress=progress,
                                  error=None if status == Status.SUCCEEDED else error,
                                  stage="done" if status == Status.SUCCEEDED else None)
        except ForgeError:  # settled already (the sweep was cancelled meanwhile)
            pass
        self.rows[trial.name] = row
        self._table()

    def _table(self) -> None:
        self.store.update(self.sweep_id, result={"status": "running", "trials": [compact(r) for r in
                                                                                   self.rows.values()]})


def settle(store: JobStore) -> None:
    """Close the trials whose sweep ended while they were unfinished (a crash, a cancel): with the sweep's
    outcome, and the reason."""
    for job in store.unfinished():
        if job["kind"] != TRIAL_KIND:
            continue
        sweep = store.get(job["params"]["sweep"])
        if Status(sweep["status"]) not in TERMINAL:
            continue
        cancelled = sweep["status"] == Status.CANCELLED.value
        error = None if cancelled else {
            "code": "sweep_ended", "retryable": True, "hint": "see the sweep's status; start a new sweep",
            "message": f"the sweep {sweep['id']} ended ({sweep['status']}) before this trial finished"}
        try:
            store.transition(job["id"], Status.CANCELLED if cancelled else Status.FAILED, error=error)
        except ForgeError:  # moved on by the worker in between: nothing to settle
            continue
