"""Store rows turned into the replies agents read: a job's status and a freshly started job's handle."""

from __future__ import annotations

from mcp_servers.forge.schemas import Artifact, ErrorInfo, JobHandle, JobStatus, JobSummary, Progress, StageState
from mcp_servers.lib import results
from mcp_servers.lib.runner import Runner
from mcp_servers.lib.store import Status

# Jobs whose status an agent should poll less often: they run for minutes to hours.
LONG_KINDS = ("train", "pipeline")


def finished_stages(runner: Runner, job: dict) -> dict[str, str]:
    """A pipeline's child stages that ended, with their status, from its stage_done events."""
    events = runner.store.events(job["id"], limit=len(results.STAGES), type_="stage_done")
    return {e["data"]["pipeline_stage"]: e["data"].get("status") or Status.SUCCEEDED.value for e in events}


def _short(value):
    """A float to 6 significant digits: the reply is read, the full value lives in the run's records."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _inputs(params: dict) -> dict:
    # notes for people and seals ("_…") and the run dir (its own field) are left out of the reply
    return {k: v for k, v in params.items() if not k.startswith("_") and k != "output_dir"}


def status_of(runner: Runner, job: dict) -> JobStatus:
    err = job.get("error")
    stages = results.pipeline_stages(job, finished_stages(runner, job)) if job["kind"] == "pipeline" else []
    return JobStatus(
        job_id=job["id"], kind=job["kind"], status=job["status"], stage=job.get("stage"),
        queue_position=runner.queue_position(job["id"]) if job["status"] == Status.QUEUED.value else None,
        progress=Progress(**{k: _short(v) for k, v in (job.get("progress") or {}).items()}),
        created_at=job["created_at"], started_at=job.get("started_at"), finished_at=job.get("finished_at"),
        inputs=_inputs(job["params"]),
        stages=[StageState(**s) for s in stages], run_dir=job.get("run_dir"),
        artifacts=[Artifact(**a) for a in results.artifacts(job.get("result"))],
        metrics={k: _short(v) for k, v in results.metrics(job.get("result")).items() if v is not None},
        quality=results.quality(job.get("result")),
        error=ErrorInfo(**{k: err[k] for k in ErrorInfo.model_fields if k in err}) if err else None,
        next_actions=results.next_actions(job),
        result=job.get("result") if job["kind"] == "publish" else None)


def summary_of(job: dict) -> JobSummary:
    return JobSummary(job_id=job["id"], kind=job["kind"], status=job["status"], stage=job.get("stage"),
                      percent=(job.get("progress") or {}).get("percent"), created_at=job["created_at"],
                      finished_at=job.get("finished_at"), error_code=(job.get("error") or {}).get("code"))


def handle_of(runner: Runner, job: dict, note: str | None = None) -> JobHandle:
    return JobHandle(job_id=job["id"], kind=job["kind"], status=job["status"],
                     queue_position=runner.queue_position(job["id"]),
                     poll_after_s=5.0 if job["kind"] in LONG_KINDS else 2.0, note=note)
