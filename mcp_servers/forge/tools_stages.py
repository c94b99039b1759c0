"""Stage tools that answer within the call: the environment, demo assets, dataset checks, the
Modelfile, a quick query, and seals."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Literal

import anyio
from mcp.server.mcpserver import Context
from pydantic import Field

from forge.data import FormatName
from forge.modelfile import OLLAMA_NAME_PATTERN
from forge.paths import check_path, model_ref
from forge.runs import find_run_dir, load_stages
from mcp_servers.forge.args import Message, Sampling, Text, path_arg, template_arg
from mcp_servers.forge.context import APPENDS, READ_ONLY, READ_ONLY_OPEN, WRITES, runner_of
from mcp_servers.forge.schemas import (
    DemoAssets,
    ModelfileResult,
    QueryResult,
    Report,
    SealResult,
    SealVerification,
)
from mcp_servers.lib import results

OLLAMA_ALPHABET = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"  # the schema's; ModelfileConfig checks the whole form


async def forge_environment(ctx: Context) -> Report:
    """This machine: Python, torch, GPUs, disk, FORGE_HOME, allowed_roots (every path lies under one),
    versions, executor (local or Ray). Call it first."""
    from forge.env import environment

    report = await anyio.to_thread.run_sync(environment)
    report["executor"] = await anyio.to_thread.run_sync(runner_of(ctx).executor_report)
    return Report(**report)


async def forge_demo_assets(
    dir: Annotated[str | None, Field(None, max_length=4096, description=(
        "Where, under an allowed root; default $FORGE_HOME/demo."))] = None,
    model: Annotated[Literal["tiny", "tiny-base", "smollm2"], Field(description=(
        "tiny (random), tiny-base (no template) or smollm2 (real; learns 5 facts)."))]
    = "tiny",
) -> DemoAssets:
    """Write (or reuse) a demo model and dataset, nothing downloaded. Returns their paths for forge_train."""
    from forge.demo import DemoAssetsConfig, write_demo_assets

    target = check_path(dir, "dir") if dir else None
    out = await anyio.to_thread.run_sync(lambda: write_demo_assets(DemoAssetsConfig(dir=target, model=model)))
    return DemoAssets(base_model=out["base_model"], model_dir=out["model_dir"], dataset=out["dataset"],
                      reused=out["reused"])


async def forge_validate_dataset(
    path: Annotated[str, path_arg("A JSONL dataset under an allowed root.")],
    ctx: Context,
    format: Annotated[FormatName, Field(description=(
        "Record format; auto (default) detects it."))] = "auto",
    base_model: Annotated[str | None, Field(None, max_length=4096, description=(
        "A model dir or hub id: its tokenizer gives token stats."))] = None,
    max_length: Annotated[int, Field(gt=0, le=1_048_576, description=(
        "Tokens per record, as training will cut them."))] = 1024,
    chat_template: Annotated[str | None, Field(max_length=4096, description="As forge_train's.")] = None,
) -> Report:
    """Check every line of a JSONL dataset (problems with line numbers and fixes); with base_model, token
    stats."""
    from forge.data import VALIDATE_STEPS, DataConfig, validate

    config = DataConfig(path=check_path(path, "dataset"), format=format, max_length=max_length,
                        base_model=model_ref(base_model, "base_model") if base_model else None,
                        chat_template=template_arg(chat_template))
    return Report(**await _with_progress(ctx, lambda on_step: validate(config, on_step), VALIDATE_STEPS))


PROGRESS_TICK_S = 2.0


async def _with_progress(ctx: Context, work, total: int):
    """Run ``work(on_step)`` off the event loop, sending a progress notification every couple of seconds: the
    step it is at, and within a long step (a GGUF's tokenizer converted) a share that keeps creeping up."""
    at = {"step": 0, "what": "starting", "since": time.monotonic()}

    def on_step(step: int, what: str) -> None:
        at.update(step=step, what=what, since=time.monotonic())

    sent = {"value": -1.0}

    async def report() -> None:
        snap = dict(at)  # one snapshot: the worker thread may move on meanwhile
        step, what, since = snap["step"], snap["what"], snap["since"]
        elapsed = time.monotonic() - since
        value = round(step + (0.0 if step >= total else elapsed / (elapsed + 20.0)), 6)  # creeps, never reaches 1
        if value > sent["value"]:  # progress only moves forward
            sent["value"] = value
            await ctx.report_progress(value, float(total), f"{what} ({elapsed:.0f} s)")

    async def tick() -> None:
        while True:
            await report()
            await anyio.sleep(PROGRESS_TICK_S)

    failure = None
    async with anyio.create_task_group() as group:
        group.start_soon(tick)
        try:
            out = await anyio.to_thread.run_sync(work, on_step)
        except Exception as exc:  # raised as it is below, not wrapped in the task group's ExceptionGroup
            failure = exc
        finally:
            group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    await report()  # the end, said once the work is done
    return out


async def forge_modelfile(
    gguf: Annotated[str, path_arg("A .gguf path, or a quantize or pipeline job id.")],
    ctx: Context,
    system_prompt: Annotated[Text, Field(description="SYSTEM message; default: the template's own.")] = None,
    parameters: Annotated[Sampling | None, Field(description="PARAMETER lines.")]
    = None,
    model_name: Annotated[str | None, Field(None, max_length=200, pattern=OLLAMA_ALPHABET, description=(
        "For `ollama create`, e.g. me/bot:q4; default from the GGUF."))] = None,
) -> ModelfileResult:
    """Write an Ollama Modelfile beside a GGUF (TEMPLATE, SYSTEM, stops, sampling); an existing one is never
    changed."""
    from forge.modelfile import ModelfileConfig, write_modelfile

    path = results.resolve_input(runner_of(ctx).store, gguf, "gguf", "gguf")
    sampling = parameters.model_dump(exclude_none=True) if parameters else {}
    config = ModelfileConfig.build(gguf=path, system_prompt=system_prompt, model_name=model_name,
                                   keep_existing=True, **sampling)
    out = await anyio.to_thread.run_sync(write_modelfile, config)
    return ModelfileResult(**{k: out[k] for k in ModelfileResult.model_fields if k != "next_actions"},
                           next_actions=[f'forge_query_model(model="{gguf}", prompt="Hello")', "forge_seal_snapshot()"])


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
    model: Annotated[str, path_arg("A .gguf path, a quantize or pipeline job id, or an Ollama model.")],
    ctx: Context,
    messages: Annotated[list[Message] | None, Field(None, min_length=1, max_length=200, description=(
        "e.g. [{\"role\": \"user\", \"content\": \"Hi\"}]."))] = None,
    prompt: Annotated[Text, Field(description="One user message, when messages is absent.")] = None,
    max_tokens: Annotated[int, Field(gt=0, le=8192, description="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, Field(ge=0, le=10, description="0 = greedy.")] = 0.0,
    tools: Annotated[list[dict] | None, Field(None, min_length=1, max_length=64, description=(
        "OpenAI-style function tools; the reply adds tool_calls."))] = None,
) -> QueryResult:
    """Ask a GGUF (llama.cpp) or Ollama model via its chat template: does it answer and stop? With tools:
    which tool, what arguments? Says which model answered."""
    from forge.query import query

    gguf, ollama_name = _query_target(ctx, model)
    msgs = [m.model_dump() for m in messages] if messages else [{"role": "user", "content": prompt or "Hello"}]
    out = await anyio.to_thread.run_sync(lambda: query(gguf, msgs, max_tokens, temperature, ollama_name, tools))
    return QueryResult(**out, model=ollama_name if out["backend"] == "ollama" else str(gguf))


async def forge_seal_snapshot(
    ctx: Context,
    job_ids: Annotated[list[Annotated[str, Field(max_length=64)]] | None, Field(None, min_length=1, max_length=100,
                                                                                description=(
        "Jobs whose runs to seal; default the newest finished chain."))]
    = None,
    note: Annotated[Text, Field(description="Kept in the record.")] = None,
) -> SealResult:
    """Seal runs: a hash-identified record (configs, data and artifact sha256s, metrics, evaluation) and a
    retrospective. A new seal each call."""
    from forge.seal import SealConfig, seal

    store = runner_of(ctx).store
    jobs = [store.get(j) for j in job_ids] if job_ids else results.latest_chain(store)
    run_dirs = list(dict.fromkeys(d for d in map(results.run_dir_of, jobs) if d is not None))
    records = [results.seal_record(j, [e["data"].get("message") for e in
                                       store.events(j["id"], limit=10_000, type_="warning")]) for j in jobs]
    out = await anyio.to_thread.run_sync(seal, SealConfig(run_dirs=run_dirs, note=note, jobs=records))
    first_rows = "\n".join(out["results_table"].splitlines()[2:6])
    return SealResult(seal_id=out["seal_id"], seal_path=out["seal_path"], previous=out["previous"],
                      retrospective_path=out["retrospective_path"], summary=first_rows,
                      next_actions=[f'forge_seal_verify(seal_id="{out["seal_id"]}")'])


async def forge_seal_verify(
    seal_id: Annotated[str | None, Field(None, max_length=71, pattern=r"^(sha256:)?[0-9a-f]{4,64}$", description=(
        "A seal id or 4+ of its hex digits; default the newest."))] = None,
) -> SealVerification:
    """Re-hash a seal, the artifacts it lists and its chain; each mismatch names the file and both hashes."""
    from forge.seal import verify

    return SealVerification(**await anyio.to_thread.run_sync(verify, seal_id))


TOOLS = [
    (forge_environment, "Environment report", READ_ONLY),
    (forge_demo_assets, "Write demo model and data", WRITES),
    (forge_validate_dataset, "Validate a dataset", READ_ONLY_OPEN),
    (forge_modelfile, "Write an Ollama Modelfile", WRITES),
    (forge_query_model, "Ask a model", READ_ONLY_OPEN),
    (forge_seal_snapshot, "Seal runs", APPENDS),
    (forge_seal_verify, "Verify a seal", READ_ONLY),
]
