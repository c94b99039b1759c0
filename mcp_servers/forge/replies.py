"""Store rows turned into the replies agents read: a job's status and a freshly started job's handle."""

from __future__ import annotations

import json

from forge.evaluate import figures
from mcp_servers.forge.schemas import Artifact, ErrorInfo, JobHandle, JobStatus, JobSummary, Progress
from mcp_servers.lib import outcome, results
from mcp_servers.lib.runner import Runner
from mcp_servers.lib.store import TERMINAL, Status

# Bytes of a status's JSON an agent reads back: 3 KB for the job itself, and up to 500 more for its warnings
STATUS_BUDGET, WARNINGS_BUDGET = 3000, 500
# Jobs whose status an agent should poll less often: they run for minutes to hours.
LONG_KINDS = ("train", "pipeline", "sweep")


def finished_stages(runner: Runner, job: dict) -> dict[str, str]:
    """A pipeline's child stages that ended, with their status, from its stage_done events."""
    events = runner.store.events(job["id"], limit=len(results.STAGES), type_="stage_done")
    return {e["data"]["pipeline_stage"]: e["data"].get("status") or Status.SUCCEEDED.value for e in events}


def _short(value):
    """A float to 6 significant digits: the reply is read, the full value lives in the run's records."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


SHOWN_CHARS = 200  # of a long input (a system prompt): the whole of it is in the job's resource
SHOWN_DETAILS = 5


def _cut(value):
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        return value[:SHOWN_CHARS] + f"… ({len(value):,} chars)"
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    return value


def _inputs(params: dict) -> dict:
    # notes for people and seals ("_…") and the run dir (its own field) are left out of the reply; a dataset copy's
    # sha256 name is cut to 12 digits (the resource has it whole)
    return {k: outcome.short_names(v) if k == "dataset" and isinstance(v, str) else _cut(v)
            for k, v in params.items() if not k.startswith("_") and k != "output_dir" and v is not None}


def _publish_result(result: dict | None) -> dict | None:
    """A publish job's result without the model card's text and with a dozen files named (both in full in
    the resource)."""
    if not result:
        return result
    plan = result.get("plan")
    if plan:
        plan = {**{k: v for k, v in plan.items() if k != "model_card"}, "files": plan["files"][:12],
                "file_count": len(plan["files"])}
    return {**result, **({"plan": plan} if plan else {})}


def _has_gguf(result: dict) -> bool:
    return bool((result.get("stages") or {}).get("quantize", {}).get("outputs"))


def _continued_by(runner: Runner, job: dict) -> str | None:
    """The job continuing a stopped train job in its run dir, if one does."""
    stopped = job["status"] in (Status.FAILED.value, Status.CANCELLED.value)
    return runner.store.continued_by(job["id"]) if job["kind"] == "train" and stopped else None


def status_of(runner: Runner, job: dict) -> JobStatus:
    """A job as an agent reads it, within 3 KB: the files it delivers, the metrics that decide, its quality and
    outcome in a line; ``more`` names the resource with the rest (detail_of)."""
    err = job.get("error")
    result = job.get("result")
    # a pipeline's stages while it runs or when it stopped short; once it succeeded, every one did
    piped = job["kind"] == "pipeline" and job["status"] != Status.SUCCEEDED.value
    stages = results.pipeline_stages(job, finished_stages(runner, job)) if piped else []
    done = Status(job["status"]) in TERMINAL
    found = results.artifacts(result)
    carried = job["kind"] in ("pipeline", "sweep")  # a sweep carries its winner through like a pipeline
    model = results.last_gguf(result) if carried and found and _has_gguf(result) else None
    shown = outcome.delivered(job["kind"], found, model)
    full_metrics = {k: v for k, v in results.metrics(result).items() if v is not None}
    metrics = outcome.key_metrics(full_metrics)
    evaluated = outcome.evaluation_detail(result)
    held_back = len(shown) < len(found) or len(metrics) < len(full_metrics) or evaluated
    summary = outcome.summary_line(result)
    status = JobStatus(
        job_id=job["id"], kind=job["kind"], status=job["status"], stage=job.get("stage"),
        queue_position=runner.queue_position(job["id"]) if job["status"] == Status.QUEUED.value else None,
        progress={k: _short(v) for k, v in (job.get("progress") or {}).items()
                  if k in Progress.model_fields and v is not None and not (done and k == "eta_s")},
        created_at=job["created_at"], started_at=job.get("started_at"), finished_at=job.get("finished_at"),
        inputs=_inputs(job["params"]),
        stages={s["stage"]: s["status"] for s in stages}, run_dir=results.outputs_dir(job, runner.home),
        artifacts=[Artifact(**a) for a in shown],
        metrics={k: _short(v) for k, v in metrics.items()},
        quality=outcome.compact_quality(results.quality(result)),
        summary=summary,
        more=f"forge://jobs/{job['id']} has all {len(found)} files, every metric"
        + (", the evaluation table and samples" if evaluated else "") if held_back else None,
        error=ErrorInfo(**{k: _cut(err[k]) for k in ErrorInfo.model_fields if k in err and k != "details"},
                        details=[_cut(d) for d in err.get("details") or []][:SHOWN_DETAILS]) if err else None,
        next_actions=results.next_actions(job, _continued_by(runner, job)),
        result=_result(job["kind"], result))
    found = outcome.warnings_of(result, _warned(runner, job), summary)
    if found:  # as many short lines as the reply has room for; the resource has them all
        room = STATUS_BUDGET + WARNINGS_BUDGET - len(json.dumps(status.model_dump(mode="json"), separators=(",", ":"),
                                              ensure_ascii=False).encode())
        status.warnings = outcome.short_warnings(found, room, f"forge://jobs/{job['id']}")
    return status


def _result(kind: str, result: dict | None) -> dict | None:
    if kind == "publish":
        return _publish_result(result)
    if kind == "sweep":
        return outcome.sweep_table(result)
    return figures(result) if kind == "evaluate" and result and "table" in result else None


def _warned(runner: Runner, job: dict) -> list[str]:
    """What the job's warning events said (a base dequantized from a GGUF, say)."""
    return [str(e["data"].get("message")) for e in runner.store.events(job["id"], limit=20, type_="warning")
            if e["data"].get("message")]


def detail_of(runner: Runner, job: dict) -> dict:
    """The job's resource: its status with every artifact, every metric (the curves are in the run's
    metrics.json), each quant's full measurements and the evaluation table with its sample answers."""
    result = job.get("result")
    detail = status_of(runner, job).model_dump(mode="json")
    err = job.get("error")
    detail.update(artifacts=results.artifacts(result), inputs={k: v for k, v in job["params"].items()
                                                                if not k.startswith("_") and k != "output_dir"},
                  error={k: err[k] for k in ErrorInfo.model_fields if k in err} if err else None,
                  result=result if job["kind"] in ("publish", "sweep") else detail["result"],
                  metrics={k: v for k, v in results.metrics(result).items() if v is not None},
                  quality=results.quality(result), evaluation=outcome.evaluation_detail(result),
                  warnings=outcome.warnings_of(result, _warned(runner, job), detail["summary"]),
                  progress=job.get("progress") or {}, more=None, placement=job.get("placement"),
                  stages={s["stage"]: s["status"] for s in results.pipeline_stages(job, finished_stages(runner, job))})
    return detail


def progress_text(job: dict) -> str:
    """Where a job is, in words: its status and stage, step/total and loss (a wait's progress notifications
    and a task's statusMessage say the same)."""
    progress = job.get("progress") or {}
    message = " ".join(filter(None, [job["status"], job.get("stage")]))
    if progress.get("total_steps"):
        message += f" step {progress.get('step')}/{progress['total_steps']}"
        if progress.get("loss") is not None:
            message += f" loss {progress['loss']:.4f}"
    return message


def summary_of(job: dict) -> JobSummary:
    return JobSummary(job_id=job["id"], kind=job["kind"], status=job["status"], stage=job.get("stage"),
                      percent=(job.get("progress") or {}).get("percent"), created_at=job["created_at"],
                      finished_at=job.get("finished_at"), error_code=(job.get("error") or {}).get("code"))


def handle_of(runner: Runner, job: dict, note: str | None = None) -> JobHandle:
    return JobHandle(job_id=job["id"], kind=job["kind"], status=job["status"],
                     queue_position=runner.queue_position(job["id"]),
                     poll_after_s=5.0 if job["kind"] in LONG_KINDS else 2.0, note=note)
