"""Continuing a train job: what forge_train(resume_from_job=…) takes from it, what the call changed, and
whether anything is left to train.

The job being resumed knows its base model, dataset (the copy it trained on), method, template, run dir and
hyperparameters; an argument the call gives overrides one of them and is named in the reply. A schedule the
checkpoint already reached is refused at submit with both numbers, never run as a success that trained
nothing."""

from __future__ import annotations

from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.train.run_dir import checkpoint_step, latest_checkpoint, refuse_finished_schedule
from mcp_servers.forge.schemas import AGENT_TRAIN_FIELDS
from mcp_servers.lib.errors import JobCodes
from mcp_servers.lib.store import JobStore, Status

INHERITED = ("base_model", "method", "chat_template", "dataset", *AGENT_TRAIN_FIELDS)
# Knobs that change how many steps the schedule plans: with none of them changed, the job's own total stands.
SCHEDULE_KNOBS = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "eval_fraction", "seed", "num_processes", "dataset")
# A checkpoint continues the weights of one base model, trained one way, with adapters of one shape.
FIXED = ("base_model", "method", "lora_r", "load_in_4bit")


def resumable(store: JobStore, job_id: str) -> dict:
    """The train job to continue: one that ended (failed, cancelled, or succeeded and to be extended)."""
    job = store.require(job_id, "train", finished=False)
    if Status(job["status"]) not in (Status.FAILED, Status.CANCELLED, Status.SUCCEEDED):
        raise ForgeError(JobCodes.JOB_NOT_FINISHED, f"train job {job_id} is {job['status']}: it has not stopped",
                         f"cancel it with forge_job_cancel(job_id=\"{job_id}\") (it checkpoints first), then resume")
    if job["status"] != Status.SUCCEEDED.value:  # a stopped run is continued once, in its own run dir
        store.refuse_resumed(job_id)
    run_dir = job["params"]["output_dir"]
    busy = [j["id"] for j in store.unfinished()
            if j["kind"] == "train" and j["params"].get("output_dir") == run_dir]
    if busy:  # two jobs training into one run dir would interleave their checkpoints
        if job["status"] != Status.SUCCEEDED.value:
            store.refuse_resumed(job_id)  # the job that continues this one, named as such
        raise ForgeError(JobCodes.JOB_NOT_FINISHED,
                         f"train job {busy[0]} is already continuing {job_id} in its run dir",
                         f"follow it with forge_job_wait(job_id=\"{busy[0]}\"), or cancel it first")
    return job


def _first_config(run_dir: Path) -> dict:
    """The run's first recorded configuration (train_config.json), or nothing when it cannot be read."""
    import json

    try:
        return json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _shown(value) -> str:
    return "default" if value is None else repr(value)


def resume_fields(job: dict, given: dict, checkpoint: Path) -> tuple[dict, dict[str, tuple]]:
    """The train fields the new job runs with: the job's own, each given one over it; and what changed, as
    {field: (was, now)}."""
    params = job["params"]
    fields = {k: params[k] for k in INHERITED if k in params}
    chosen = _first_config(Path(params["output_dir"]))  # what the run resolved (a size-based default included)
    trained_with = {**{k: chosen.get(k) for k in FIXED}, **{k: v for k, v in params.items() if v is not None}}
    changed = {}
    for key, value in given.items():
        if value is None or value == params.get(key):
            continue
        if key in FIXED and value == trained_with.get(key):
            continue
        if key in FIXED:
            raise ForgeError(Codes.INVALID_ARGUMENT,
                             f"{key} {value!r} differs from the {trained_with.get(key)!r} job {job['id']} trained "
                             "with",
                             f"a checkpoint continues the {key} it was made with: leave {key} out to resume, or "
                             "start a new run without resume_from_job")
        changed[key] = (params.get(key), value)
        fields[key] = value
    if job["status"] == Status.SUCCEEDED.value:
        # a finished run is extended in a run dir of its own, from a copy of its last checkpoint: its adapter,
        # and what was merged, quantized and sealed from it, stay as they were
        return {**fields, "resume_from": str(checkpoint)}, changed
    # _resumes: the store lets one job continue this one in its run dir, and no second (already_resumed)
    return {**fields, "output_dir": params["output_dir"], "resume": True, "_resumes": job["id"]}, changed


def step_reached(job: dict) -> tuple[int, Path]:
    """How far the job got: its last checkpoint's step (a succeeded job: at least its final step)."""
    checkpoint = latest_checkpoint(Path(job["params"]["output_dir"]) / "checkpoints")
    if checkpoint is None:
        raise ForgeError(Codes.NO_CHECKPOINT, f"train job {job['id']} left no checkpoint to resume from",
                         "start a new run without resume_from_job (save_steps sets how often a run checkpoints)")
    final = ((job.get("result") or {}).get("metrics") or {}).get("global_step") or 0
    return max(checkpoint_step(checkpoint), int(final)), checkpoint


def check_schedule(job: dict, changed: dict, planned: int, reached: int) -> int:
    """Refuse a resume with nothing left; return the steps planned. With no schedule knob changed, the job's
    own total (the Trainer's count) stands for ``planned``, the estimate."""
    own_total = (job.get("progress") or {}).get("total_steps")
    if own_total and not set(changed) & set(SCHEDULE_KNOBS):
        planned = int(own_total)
    refuse_finished_schedule(reached, planned, f"train job {job['id']}")
    return planned


def resume_note(job: dict, checkpoint: Path, planned: int, changed: dict) -> str:
    how = "extends" if job["status"] == Status.SUCCEEDED.value else "continues"
    note = f"{how} {job['id']} from {checkpoint.name} (step {checkpoint_step(checkpoint)} of {planned})"
    if how == "extends":
        note += f" in a new run dir; {job['id']}'s own files stay as they are"
    said = "; ".join(f"{key}: {_shown(was)} -> {_shown(now)}" for key, (was, now) in changed.items())
    return note + (f"; changed: {said}" if said else "; nothing changed")
