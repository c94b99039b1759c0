"""Stage tools that answer within the call: the environment, demo assets, dataset checks, the
Modelfile, a quick query, and seals."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context
from pydantic import Field

from forge.data import FormatName
from forge.errors import ForgeError
from forge.modelfile import OLLAMA_NAME_PATTERN
from forge.paths import check_path, model_ref
from forge.runs import find_run_dir, load_stages
from mcp_servers.forge.args import Message, Sampling, Text, path_arg
from mcp_servers.forge.context import READ_ONLY, WRITES, runner_of
from mcp_servers.forge.schemas import (
    DemoAssets,
    ModelfileResult,
    QueryResult,
    Report,
    SealResult,
    SealVerification,
)
from mcp_servers.lib import results
from mcp_servers.lib.errors import JobCodes
from mcp_servers.lib.store import Status


async def forge_environment() -> Report:
    """Python, torch, CUDA devices (memory, bf16), free disk, stack versions, converter status, warnings."""
    from forge.env import environment

    return Report(**await anyio.to_thread.run_sync(environment))


async def forge_demo_assets(
    dir: Annotated[str | None, Field(None, max_length=4096, description=(
        "Where to write the assets, under an allowed root; default $FORGE_HOME/demo."))] = None,
) -> DemoAssets:
    """Write (or reuse) a tiny Qwen2-shaped model and a 60-record alpaca dataset, built locally with
    nothing downloaded, so the whole flow can be tried offline. Returns their paths."""
    from forge.demo import DemoAssetsConfig, write_demo_assets

    target = check_path(dir, "dir") if dir else None
    out = await anyio.to_thread.run_sync(lambda: write_demo_assets(DemoAssetsConfig(dir=target)))
    return DemoAssets(model_dir=out["model_dir"], dataset=out["dataset"], reused=out["reused"])


async def forge_validate_dataset(
    path: Annotated[str, path_arg("A JSONL dataset under an allowed root, e.g. /data/datasets/support.jsonl.")],
    format: Annotated[FormatName, Field(description="Record format; auto detects it.")] = "auto",
    base_model: Annotated[str | None, Field(None, max_length=4096, description=(
        "A model dir or hub id whose tokenizer and chat template compute token statistics."))] = None,
    max_length: Annotated[int, Field(gt=0, le=1_048_576, description=(
        "Tokens per record (the max_length training will use); longer records are truncated."))] = 1024,
) -> Report:
    """Check every line of a JSONL dataset (all problems at once, with line numbers and fixes); with
    base_model, also token statistics and the share of tokens in the loss."""
    from forge.data import DataConfig, validate

    config = DataConfig(path=check_path(path, "dataset"), format=format, max_length=max_length,
                        base_model=model_ref(base_model, "base_model") if base_model else None)
    return Report(**await anyio.to_thread.run_sync(validate, config))


async def forge_modelfile(
    gguf: Annotated[str, path_arg("A .gguf path under an allowed root, or a quantize/pipeline job id.")],
    ctx: Context,
    system_prompt: Annotated[Text, Field(description="The Modelfile's SYSTEM message.")] = None,
    parameters: Annotated[Sampling | None, Field(description="Sampling parameters written as PARAMETER lines.")]
    = None,
    model_name: Annotated[str | None, Field(None, max_length=200, pattern=OLLAMA_NAME_PATTERN, description=(
        "Name for `ollama create`, e.g. support-bot or me/support-bot:q4; default from the GGUF's name."))] = None,
) -> ModelfileResult:
    """Write an Ollama Modelfile for a GGUF (path or quantize/pipeline job id): TEMPLATE for its chat
    family, a stop for every end-of-turn token, sampling parameters (temperature, top_p, top_k,
    repeat_penalty, num_ctx, num_predict), SYSTEM. Returns the content and the `ollama create` command."""
    from forge.modelfile import ModelfileConfig, write_modelfile

    path = results.resolve_input(runner_of(ctx).store, gguf, "gguf", "gguf")
    sampling = parameters.model_dump(exclude_none=True) if parameters else {}
    config = ModelfileConfig.build(gguf=path, system_prompt=system_prompt, model_name=model_name, force=True,
                                   **sampling)
    out = await anyio.to_thread.run_sync(write_modelfile, config)
    return ModelfileResult(**{k: out[k] for k in ModelfileResult.model_fields})


def _query_target(ctx: Context, model: str) -> tuple[Path | None, str | None]:
    """A GGUF to load and/or an Ollama model name for forge_query_model's ``model``."""
    store = runner_of(ctx).store
    if results.is_job_id(model):
        gguf = results.resolve_input(store, model, "gguf", "model")
        run_dir = find_run_dir(gguf.parent)  # a Modelfile written for this run names the Ollama model
        return gguf, load_stages(run_dir).get("modelfile", {}).get("model_name") if run_dir else None
    if "/" not in model and not model.endswith(".gguf") and re.fullmatch(OLLAMA_NAME_PATTERN, model) \
            and not Path(model).exists():
        return None, model  # an Ollama model name (the pattern keeps it short enough to look up)
    return check_path(model, "model"), None


async def forge_query_model(
    model: Annotated[str, path_arg("A .gguf path, a quantize/pipeline job id, or (with OLLAMA_HOST set) a model "
                                   "Ollama has.")],
    ctx: Context,
    messages: Annotated[list[Message] | None, Field(None, min_length=1, max_length=200, description=(
        "The conversation, e.g. [{\"role\": \"user\", \"content\": \"Hi\"}]."))] = None,
    prompt: Annotated[Text, Field(description="A single user message (used when messages is absent).")] = None,
    max_tokens: Annotated[int, Field(gt=0, le=8192, description="Tokens to generate at most (1-8192).")] = 64,
    temperature: Annotated[float, Field(ge=0, le=10, description="Sampling temperature; 0 = greedy.")] = 0.0,
) -> QueryResult:
    """Ask a model something through its chat template — the quick "does it talk like it should"
    check after quantizing. model: a GGUF path or quantize/pipeline job id (llama-cpp-python), or,
    when OLLAMA_HOST is set, a model Ollama has (a job's Modelfile name is tried there first)."""
    from forge.query import query

    gguf, ollama_name = _query_target(ctx, model)
    msgs = [m.model_dump() for m in messages] if messages else [{"role": "user", "content": prompt or "Hello"}]
    out = await anyio.to_thread.run_sync(lambda: query(gguf, msgs, max_tokens, temperature, ollama_name))
    return QueryResult(**out)


async def forge_seal_snapshot(
    ctx: Context,
    job_ids: Annotated[list[Annotated[str, Field(max_length=64)]] | None, Field(None, min_length=1, max_length=100,
                                                                                description=(
        "Jobs whose runs to seal; default the newest succeeded pipeline job."))] = None,
    note: Annotated[Text, Field(description="A note kept in the record.")] = None,
) -> SealResult:
    """Seal one or more jobs' runs: a canonical-JSON record (configs, base model, dataset and artifact
    sha256s, metrics and loss curve, versions, hardware, job outcomes, warnings) whose hash is its id,
    chained to the previous seal, plus a Markdown retrospective and a loss-curve PNG. Default: the
    latest succeeded pipeline job."""
    from forge.seal import SealConfig, seal

    store = runner_of(ctx).store
    if job_ids:
        jobs = [store.get(j) for j in job_ids]
    else:
        jobs = store.list(status=Status.SUCCEEDED.value, kind="pipeline", limit=1)
        if not jobs:
            raise ForgeError(JobCodes.JOB_NOT_FOUND, "no succeeded pipeline job to seal", "pass job_ids")
    run_dirs = list(dict.fromkeys(d for d in map(results.run_dir_of, jobs) if d is not None))
    records = [results.seal_record(j, [e["data"].get("message") for e in
                                       store.events(j["id"], limit=10_000, type_="warning")]) for j in jobs]
    out = await anyio.to_thread.run_sync(seal, SealConfig(run_dirs=run_dirs, note=note, jobs=records))
    first_rows = "\n".join(out["results_table"].splitlines()[2:6])
    return SealResult(seal_id=out["seal_id"], seal_path=out["seal_path"], previous=out["previous"],
                      retrospective_path=out["retrospective_path"], summary=first_rows)


async def forge_seal_verify(
    seal_id: Annotated[str | None, Field(None, max_length=71, pattern=r"^(sha256:)?[0-9a-f]{4,64}$", description=(
        "A seal id (sha256:…) or at least 4 hex digits of it; default the newest seal."))] = None,
) -> SealVerification:
    """Re-hash a seal's record (default: the newest) and every artifact it lists that still exists,
    and walk the chain of previous seals; each mismatch names the file, the expected and the found hash."""
    from forge.seal import verify

    return SealVerification(**await anyio.to_thread.run_sync(verify, seal_id))


TOOLS = [
    (forge_environment, "Environment report", READ_ONLY),
    (forge_demo_assets, "Write demo model and data", WRITES),
    (forge_validate_dataset, "Validate a dataset", READ_ONLY),
    (forge_modelfile, "Write an Ollama Modelfile", WRITES),
    (forge_query_model, "Ask a model", READ_ONLY),
    (forge_seal_snapshot, "Seal runs", WRITES),
    (forge_seal_verify, "Verify a seal", READ_ONLY),
]
