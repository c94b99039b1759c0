"""Error codes the job system adds to forge's own (forge.errors.Codes)."""

from forge.errors import Codes, ForgeError


class JobCodes:
    JOB_NOT_FOUND = "job_not_found"
    JOB_NOT_FINISHED = "job_not_finished"
    WORKER_LOST = Codes.WORKER_LOST
    WORKER_CRASHED = "worker_crashed"
    WORKER_KILLED = "worker_killed"
    INVALID_TRANSITION = "invalid_transition"
    WRONG_JOB_KIND = "wrong_job_kind"
    ALREADY_RESUMED = "already_resumed"


__all__ = ["ForgeError", "JobCodes"]
