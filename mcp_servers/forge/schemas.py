"""Pydantic models the tools return as structured content, sized for an agent's context."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forge.train import TrainConfig

# The training knobs an agent may set: TrainConfig's own fields (names, descriptions, bounds).
AGENT_TRAIN_FIELDS = (
    "num_train_epochs", "max_steps", "learning_rate", "lora_r", "lora_alpha", "lora_dropout", "max_length",
    "per_device_train_batch_size", "gradient_accumulation_steps", "eval_fraction", "save_steps", "seed",
    "num_processes",
)
Hyperparameters = TrainConfig.overrides_model(
    "Hyperparameters", AGENT_TRAIN_FIELDS, "Training knobs an agent may set; anything else is rejected.")


class ErrorInfo(BaseModel):
    code: str
    message: str
    hint: str = ""
    retryable: bool = False
    details: list[str] = Field(default_factory=list)


class Artifact(BaseModel):
    kind: str
    path: str
    bytes: int
    sha256: str


class Progress(BaseModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    percent: float | None = None
    eta_s: float | None = None
    tokens_per_s: float | None = None
    loss: float | None = None


class JobHandle(BaseModel):
    job_id: str
    kind: str
    status: str
    queue_position: int | None = Field(None, description="1 = next to start; null when not queued.")
    poll_after_s: float = Field(description="Suggested wait before the next status call.")
    how_to_follow: str


class StageState(BaseModel):
    stage: str
    status: str


class JobStatus(BaseModel):
    job_id: str
    kind: str
    status: str = Field(description="queued, running, cancelling, succeeded, failed or cancelled.")
    stage: str | None = None
    queue_position: int | None = None
    progress: Progress = Field(default_factory=Progress)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageState] = Field(default_factory=list, description="A pipeline's child stages, in order.")
    run_dir: str | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    result: dict[str, Any] | None = Field(None, description="A publish job's result (its plan on a dry run).")
    next_actions: list[str] = Field(default_factory=list)


class JobList(BaseModel):
    jobs: list[JobStatus]
    next_cursor: str | None = Field(None, description="Pass as cursor to get older jobs.")


class JobEvent(BaseModel):
    seq: int
    ts: float
    type: str
    data: dict[str, Any]


class JobEvents(BaseModel):
    job_id: str
    events: list[JobEvent]
    next_after: int | None = Field(None, description="Pass as after for the next page; null at the end.")


class Report(BaseModel):
    """A stage report: its fields vary with the stage."""

    model_config = ConfigDict(extra="allow")


class DemoAssets(BaseModel):
    model_dir: str
    dataset: str
    reused: bool


class ModelfileResult(BaseModel):
    path: str
    content: str
    template_family: str
    stop_tokens: list[str]
    ollama_create: str


class QueryResult(BaseModel):
    reply: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    backend: str


class SealResult(BaseModel):
    seal_id: str
    previous: str | None = Field(None, description="The seal before this one in the chain.")
    seal_path: str
    retrospective_path: str
    summary: str


class Mismatch(BaseModel):
    file: str
    expected: str
    found: str


class SealVerification(BaseModel):
    seal_id: str
    ok: bool
    mismatches: list[Mismatch]
    missing: list[str] = Field(description="Artifacts no longer on disk (not checked).")
    chain: list[str] = Field(description="This seal, then each previous one.")
    chain_length: int
