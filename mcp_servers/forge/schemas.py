"""What the tools return as structured content: sized for an agent's context (summaries in lists,
detail on request), every field described once."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forge.train import TrainConfig

# The training knobs an agent may set: TrainConfig's own fields (names, descriptions, bounds).
AGENT_TRAIN_FIELDS = (
    "num_train_epochs", "max_steps", "learning_rate", "lora_r", "lora_alpha", "lora_dropout", "max_length",
    "per_device_train_batch_size", "gradient_accumulation_steps", "eval_fraction", "save_steps", "seed",
    "num_processes", "max_failures", "beta", "load_in_4bit",
)
Hyperparameters = TrainConfig.overrides_model("Hyperparameters", AGENT_TRAIN_FIELDS, None)

EPOCH_S = "Unix time, seconds."


class ErrorInfo(BaseModel):
    """Why a job failed: branch on code; hint says what to do."""

    code: str
    message: str
    hint: str = ""
    retryable: bool = False
    details: list[str] = Field(default_factory=list)


class Artifact(BaseModel):
    kind: str = Field(description="adapter, merged, gguf, modelfile, seal or retrospective.")
    path: str
    bytes: int
    sha256: str


class Progress(BaseModel):
    """Of the stage running (a pipeline's percent spans all its stages and only moves forward)."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    percent: float | None = None
    eta_s: float | None = None
    tokens_per_s: float | None = None
    loss: float | None = None
    reward_accuracy: float | None = Field(None, description="dpo/orpo: share of pairs the adapter ranks right.")
    reward_margin: float | None = Field(None, description="dpo/orpo: mean reward(chosen) - reward(rejected).")


class JobHandle(BaseModel):
    job_id: str = Field(description="Pass to forge_job_wait / forge_job_status, or where a later tool takes a path.")
    kind: str
    status: str
    queue_position: int | None = Field(None, description="1 = next to start; null when not queued.")
    poll_after_s: float = Field(description="Suggested wait before the next status call.")
    note: str | None = Field(None, description="A resume: from which checkpoint, and what the call changed.")


class JobStatus(BaseModel):
    """A job in full."""

    job_id: str
    kind: str = Field(description="train, merge, quantize, lora_gguf, evaluate, pipeline, publish, sweep or trial.")
    status: str = Field(description="queued, running, cancelling, succeeded, failed or cancelled.")
    stage: str | None = Field(None, description="What the job is doing, e.g. training or train:training.")
    queue_position: int | None = None
    progress: dict[str, float | int] = Field(default_factory=dict, description=(
        "Of the stage running, as Progress (fields not yet known are left out)."))
    created_at: float = Field(description=EPOCH_S)
    started_at: float | None = Field(None, description=EPOCH_S)
    finished_at: float | None = Field(None, description=EPOCH_S)
    inputs: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, str] = Field(default_factory=dict, description="A pipeline's stages, in order, and their status.")
    run_dir: str | None = Field(None, description=(
        "Where the job's outputs go, from submission on: a train's run dir, or the run a merge, quantize or "
        "evaluate works in."))
    artifacts: list[Artifact] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    quality: dict[str, Any] | None = Field(None, description="Each GGUF against the f16: KLD, same top %, bpw.")
    summary: str | None = Field(None, description="What training and evaluation measured, in one line.")
    more: str | None = Field(None, description="The resource with every artifact, metric and the evaluation.")
    error: ErrorInfo | None = None
    warnings: list[str] = Field(default_factory=list, description="Checks and warnings that matter, a line each.")
    result: dict[str, Any] | None = Field(None, description=(
        "A publish job's result (a dry run's plan); a sweep's table, winner and why; an evaluation's figures."))
    next_actions: list[str] = Field(default_factory=list, description="Tool calls that usually come next.")


class JobSummary(BaseModel):
    """A job in one line; forge_job_status has the rest."""

    job_id: str
    kind: str
    status: str
    stage: str | None = None
    percent: float | None = None
    created_at: float = Field(description=EPOCH_S)
    finished_at: float | None = Field(None, description=EPOCH_S)
    error_code: str | None = None


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="Newest first.")
    next_cursor: str | None = Field(None, description="Pass as cursor for older jobs; null on the last page.")


class JobEvent(BaseModel):
    seq: int
    ts: float = Field(description=EPOCH_S)
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
    base_model: str
    model_dir: str | None = None
    dataset: str
    reused: bool = Field(description="True when assets already there were kept.")


class ModelfileResult(BaseModel):
    path: str = Field(description="The Modelfile written (a new name when one with other content was there).")
    content: str
    template_family: str
    stop_tokens: list[str]
    ollama_create: str = Field(description="The shell command that creates the model in Ollama, quoted.")
    next_actions: list[str] = Field(default_factory=list, description="Tool calls that usually come next.")


class QueryResult(BaseModel):
    model: str | None = Field(None, description=(
        "What answered: the GGUF (the one a job id picked), or the Ollama model."))
    reply: str
    finish_reason: str | None = Field(description="stop: the model ended its turn; length: max_tokens ran out.")
    prompt_tokens: int
    completion_tokens: int
    backend: str = Field(description="llama-cpp-python or ollama.")
    tool_calls: list[dict] | None = None  # with tools: each {name, arguments}
    unparsed_calls: int | None = None  # with tools: call blocks that did not parse


class SealResult(BaseModel):
    seal_id: str = Field(description="sha256 of the record; pass to forge_seal_verify.")
    previous: str | None = Field(None, description="The seal before this one in the chain.")
    seal_path: str
    retrospective_path: str
    summary: str
    next_actions: list[str] = Field(default_factory=list, description="Tool calls that usually come next.")


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
