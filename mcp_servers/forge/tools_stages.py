"""Stage tools that answer within the call: the environment, demo assets, dataset checks, the
Modelfile, a quick query, and seals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context
from pydantic import Field

from forge.data import FormatName
from forge.errors import ForgeError
from forge.runs import find_run_dir, load_stages
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
from mcp_servers.lib.paths import check_model_ref, check_path
from mcp_servers.lib.store import Status


async def forge_environment() -> Report:
    """Python, torch, CUDA devices (memory, bf16), free disk, stack versions, converter status, warnings."""
    from forge.env import environment

    return Report(**await anyio.to_thread.run_sync(environment))


async def forge_demo_assets(
    dir: Annotated[str | None, Field(description="Where to write the assets; default $FORGE_HOME/demo.")] = None,
) -> DemoAssets:
    """Write (or reuse) a tiny Qwen2-shaped model and a 60-record alpaca dataset, built locally with
    nothing downloaded, so the whole flow can be tried offline. Returns their paths."""
    from forge.demo import DemoAssetsConfig, write_demo_assets

    target = check_path(dir, "dir") if dir else None
    out = await anyio.to_thread.run_sync(lambda: write_demo_assets(DemoAssetsConfig(dir=target)))
    return DemoAssets(model_dir=out["model_dir"], dataset=out["dataset"], reused=out["reused"])


async def forge_validate_dataset(
    path: Annotated[str, Field(description="JSONL dataset under an allowed root.")],
    format: Annotated[FormatName, Field(description="Record format; auto detects it.")] = "auto",
    base_model: Annotated[str | None, Field(description="Model dir or hub id whose tokenizer computes token stats.")]
    = None,
    max_length: Annotated[int, Field(gt=0, description="Tokens per record; longer ones are truncated.")] = 1024,
) -> Report:
    """Check every line of a JSONL dataset (all problems at once, with line numbers and fixes); with
    base_model, also token statistics and the share of tokens in the loss."""
    from forge.data import DataConfig, validate

    config = DataConfig(path=check_path(path, "dataset"), format=format, max_length=max_length,
                        base_model=check_model_ref(base_model) if base_model else None)
    return Report(**await anyio.to_thread.run_sync(validate, config))


async def forge_modelfile(
    gguf: Annotated[str, Field(description="A .gguf path, or a quantize/pipeline job id.")],
    ctx: Context,
    system_prompt: Annotated[str | None, Field(description="SYSTEM message.")] = None,
    parameters: Annotated[dict[str, float] | None, Field(description="Sampling parameters: temperature, top_p, "
                                                                     "top_k, repeat_penalty, num_ctx, num_predict.")]
    = None,
    model_name: Annotated[str | None, Field(description="Name for `ollama create`; default the GGUF's stem.")] = None,
) -> ModelfileResult:
    """Write an Ollama Modelfile for a GGUF (path or quantize/pipeline job id): TEMPLATE for its chat
    family, a stop for every end-of-turn token, sampling parameters (temperature, top_p, top_k,
    repeat_penalty, num_ctx, num_predict), SYSTEM. Returns the content and the `ollama create` command."""
    from forge.modelfile import ModelfileConfig, write_modelfile

    path = results.resolve_input(runner_of(ctx).store, gguf, "gguf", "gguf")
    config = ModelfileConfig.build(gguf=path, system_prompt=system_prompt, model_name=model_name, force=True,
                                   **(parameters or {}))
    out = await anyio.to_thread.run_sync(write_modelfile, config)
    return ModelfileResult(**{k: out[k] for k in ModelfileResult.model_fields})


def _query_target(ctx: Context, model: str) -> tuple[Path | None, str | None]:
    """A GGUF to load and/or an Ollama model name for forge_query_model's ``model``."""
    store = runner_of(ctx).store
    if results.is_job_id(model):
        gguf = results.resolve_input(store, model, "gguf", "model")
        run_dir = find_run_dir(gguf.parent)  # a Modelfile written for this run names the Ollama model
        return gguf, load_stages(run_dir).get("modelfile", {}).get("model_name") if run_dir else None
    if "/" in model or model.endswith(".gguf") or Path(model).expanduser().exists():
        return check_path(model, "model"), None
    return None, model


async def forge_query_model(
    model: Annotated[str, Field(description="A .gguf path, a quantize/pipeline job id, or (with OLLAMA_HOST set) "
                                            "a model Ollama has.")],
    ctx: Context,
    messages: Annotated[list[dict[str, str]] | None, Field(description="Chat messages [{role, content}].")] = None,
    prompt: Annotated[str | None, Field(description="A single user message (used when messages is absent).")] = None,
    max_tokens: Annotated[int, Field(gt=0, description="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, Field(ge=0, description="Sampling temperature; 0 = greedy.")] = 0.0,
) -> QueryResult:
    """Ask a model something through its chat template — the quick "does it talk like it should"
    check after quantizing. model: a GGUF path or quantize/pipeline job id (llama-cpp-python), or,
    when OLLAMA_HOST is set, a model Ollama has (a job's Modelfile name is tried there first)."""
    from forge.query import query

    gguf, ollama_name = _query_target(ctx, model)
    msgs = messages or [{"role": "user", "content": prompt or "Hello"}]
    out = await anyio.to_thread.run_sync(lambda: query(gguf, msgs, max_tokens, temperature, ollama_name))
    return QueryResult(**out)


async def forge_seal_snapshot(
    ctx: Context,
    job_ids: Annotated[list[str] | None, Field(description="Jobs whose runs to seal; default the newest succeeded "
                                                           "pipeline job.")] = None,
    note: Annotated[str | None, Field(description="A note kept in the record.")] = None,
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
    seal_id: Annotated[str | None, Field(description="sha256:… id or a prefix of its hex; default the newest seal.")]
    = None,
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
