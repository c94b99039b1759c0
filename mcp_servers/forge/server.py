"""The Forge MCP server: the pipeline as tools. Heavy stages return a job handle at once and run in
worker processes; agents follow them with forge_job_status / forge_job_wait / forge_job_events.

Run: ``forge-mcp`` (stdio) or ``forge-mcp --transport http --host 127.0.0.1 --port 8765``.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

import forge
from forge.errors import ForgeError
from mcp_servers.forge.models import (
    Artifact, DemoAssets, ErrorInfo, JobEvent, JobEvents, JobHandle, JobList, JobStatus, ModelfileResult,
    Progress, QueryResult, Report, SealResult, SealVerification, StageState,
)
from mcp_servers.lib.paths import check_model_ref, check_path
from mcp_servers.lib.runner import Runner
from mcp_servers.lib.store import TERMINAL, Status

INSTRUCTIONS = """Forge fine-tunes open LLMs: validate a dataset, train a LoRA/QLoRA adapter, merge it,
convert to GGUF and quantize, write an Ollama Modelfile, seal the run. Heavy tools (forge_train,
forge_merge, forge_quantize, forge_pipeline) return a job handle at once: follow it with
forge_job_wait (blocks up to timeout_s) or forge_job_status, then use next_actions. Ids of finished
jobs can be passed where a path is expected. Try it offline with forge_demo_assets."""

READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)
STARTS_JOB = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False, openWorldHint=False)
WRITES = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True, openWorldHint=False)
CANCELS = ToolAnnotations(readOnlyHint=False, destructiveHint=True, idempotentHint=True, openWorldHint=False)


class Hyperparameters(BaseModel):
    """Training knobs an agent may set; anything else is rejected."""

    model_config = ConfigDict(extra="forbid")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, description="Stop after this many optimizer steps.")
    learning_rate: float | None = Field(None, gt=0)
    lora_r: int | None = Field(None, gt=0)
    lora_alpha: int | None = Field(None, gt=0)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    max_seq_length: int | None = Field(None, gt=0)
    per_device_batch_size: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int | None = Field(None, gt=0)
    eval_fraction: float | None = Field(None, ge=0, lt=1)
    save_steps: int | None = Field(None, gt=0)
    seed: int | None = None
    num_processes: int | None = Field(None, ge=1, description="Training processes (one per GPU) via torchrun.")

    def train_fields(self) -> dict:
        rename = {"epochs": "num_train_epochs", "max_seq_length": "max_length",
                  "per_device_batch_size": "per_device_train_batch_size"}
        return {rename.get(k, k): v for k, v in self.model_dump().items() if v is not None}


def _tool_errors(fn):
    """ForgeErrors become tool errors an agent can branch on: code, message, hint."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except ForgeError as err:
            raise ToolError(json.dumps(err.to_dict())) from None

    return wrapper


def _next_actions(job: dict) -> list[str]:
    jid, kind, status = job["id"], job["kind"], job["status"]
    if status == Status.SUCCEEDED.value:
        return {
            "train": [f'forge_merge(adapter="{jid}")'],
            "merge": [f'forge_quantize(model="{jid}")'],
            "quantize": [f'forge_modelfile(gguf="{jid}")', f'forge_query_model(model="{jid}", prompt="Hello")'],
            "pipeline": [f'forge_query_model(model="{jid}", prompt="Hello")', f'forge_seal_snapshot(job_ids=["{jid}"])'],
        }.get(kind, [])
    if status in (Status.QUEUED.value, Status.RUNNING.value, Status.CANCELLING.value):
        return [f'forge_job_wait(job_id="{jid}", timeout_s=60)']
    if kind == "train":
        return [f'forge_train(..., resume_from_job="{jid}")', f'forge_job_events(job_id="{jid}")']
    return [f'forge_job_events(job_id="{jid}")']


def _artifacts(result: dict | None) -> list[Artifact]:
    if not result:
        return []
    items = list(result.get("artifacts", []))
    for stage in (result.get("stages") or {}).values():
        items += stage.get("artifacts", [])
    return [Artifact(**{k: a[k] for k in ("kind", "path", "bytes", "sha256")}) for a in items]


def _metrics(result: dict | None) -> dict:
    if not result:
        return {}
    metrics = result.get("metrics") or (result.get("stages") or {}).get("train", {}).get("metrics") or {}
    return {k: v for k, v in metrics.items() if k not in ("loss_curve", "eval_curve")}


def create_server(home: Path | None = None) -> MCPServer:
    runner = Runner(home)
    runner.start()
    server = MCPServer(name="forge", title="Forge", version=forge.__version__, instructions=INSTRUCTIONS)
    server.runner = runner  # tests and the CLI reach the runner through the server

    def child_stages(job: dict) -> list[StageState]:
        if job["kind"] != "pipeline":
            return []
        from forge.pipeline import STAGES

        done = {e["data"]["pipeline_stage"]: e["data"].get("status") or "succeeded"
                for e in runner.store.events(job["id"], limit=len(STAGES), type_="stage_done")}
        current = (job.get("stage") or "").split(":")[0]
        states = []
        for stage in STAGES:
            if stage in done:
                state = done[stage]
            elif stage == current and job["status"] in ("running", "cancelling"):
                state = "running"
            elif job["status"] in ("failed", "cancelled") and stage == current:
                state = job["status"]
            else:
                state = "pending"
            states.append(StageState(stage=stage, status=state))
        return states

    def status_of(job: dict) -> JobStatus:
        err = job.get("error")
        return JobStatus(
            job_id=job["id"], kind=job["kind"], status=job["status"], stage=job.get("stage"),
            queue_position=runner.queue_position(job["id"]) if job["status"] == "queued" else None,
            progress=Progress(**(job.get("progress") or {})), created_at=job["created_at"],
            started_at=job.get("started_at"), finished_at=job.get("finished_at"), inputs=job["params"],
            stages=child_stages(job),
            run_dir=job.get("run_dir"), artifacts=_artifacts(job.get("result")), metrics=_metrics(job.get("result")),
            error=ErrorInfo(**{k: err.get(k) for k in ("code", "message", "hint", "retryable") if k in err})
            if err else None, next_actions=_next_actions(job),
            result=job.get("result") if job["kind"] == "publish" else None)

    def handle(job: dict) -> JobHandle:
        position = runner.queue_position(job["id"])
        return JobHandle(job_id=job["id"], kind=job["kind"], status=job["status"], queue_position=position,
                         poll_after_s=5.0 if job["kind"] in ("train", "pipeline") else 2.0,
                         how_to_follow=f'Call forge_job_wait(job_id="{job["id"]}") or forge_job_status; '
                                       "the job runs in the background and outlives this call.")

    def job_output(ref: str, kind: str | tuple[str, ...], pick) -> str:
        """A path, or the id of a finished job whose result gives the path."""
        if Path(ref).expanduser().exists() or ref.startswith(("/", ".", "~")):
            return str(check_path(ref))
        return pick(runner.require(ref, kind)["result"])

    # ---- synchronous tools ----

    @server.tool(annotations=READ_ONLY)
    @_tool_errors
    async def forge_environment() -> Report:
        """Python, torch, CUDA devices (memory, bf16), free disk, stack versions, converter status, warnings."""
        from forge.env import environment

        return Report(**await anyio.to_thread.run_sync(environment))

    @server.tool(annotations=WRITES)
    @_tool_errors
    async def forge_demo_assets(dir: str | None = None) -> DemoAssets:
        """Write (or reuse) a tiny Qwen2-shaped model and a 60-record alpaca dataset, built locally with
        nothing downloaded, so the whole flow can be tried offline. Returns their paths."""
        from forge.demo import DemoAssetsConfig, write_demo_assets

        target = check_path(dir, "dir") if dir else None
        out = await anyio.to_thread.run_sync(lambda: write_demo_assets(DemoAssetsConfig(dir=target)))
        return DemoAssets(model_dir=out["model_dir"], dataset=out["dataset"], reused=out["reused"])

    @server.tool(annotations=READ_ONLY)
    @_tool_errors
    async def forge_validate_dataset(path: str, format: Literal["auto", "alpaca", "messages", "prompt_completion"] = "auto",
                                     base_model: str | None = None, max_seq_length: int = 1024) -> Report:
        """Check every line of a JSONL dataset (all problems at once, with line numbers and fixes); with
        base_model, also token statistics and the share of tokens in the loss."""
        from forge.data import DataConfig, validate

        config = DataConfig(path=check_path(path, "dataset"), format=format, max_seq_length=max_seq_length,
                            base_model=check_model_ref(base_model) if base_model else None)
        return Report(**await anyio.to_thread.run_sync(validate, config))

    @server.tool(annotations=WRITES)
    @_tool_errors
    async def forge_modelfile(gguf: str, system_prompt: str | None = None, parameters: dict[str, float] | None = None,
                              model_name: str | None = None) -> ModelfileResult:
        """Write an Ollama Modelfile for a GGUF (path or quantize/pipeline job id): TEMPLATE for its chat
        family, a stop for every end-of-turn token, sampling parameters (temperature, top_p, top_k,
        repeat_penalty, num_ctx, num_predict), SYSTEM. Returns the content and the `ollama create` command."""
        from forge.modelfile import ModelfileConfig, write_modelfile

        path = job_output(gguf, ("quantize", "pipeline"), _last_gguf)
        config = ModelfileConfig.build(gguf=path, system_prompt=system_prompt, model_name=model_name, force=True,
                                       **(parameters or {}))
        out = await anyio.to_thread.run_sync(write_modelfile, config)
        return ModelfileResult(**{k: out[k] for k in ModelfileResult.model_fields})

    @server.tool(annotations=READ_ONLY)
    @_tool_errors
    async def forge_query_model(model: str, messages: list[dict[str, str]] | None = None, prompt: str | None = None,
                                max_tokens: int = 64, temperature: float = 0.0) -> QueryResult:
        """Ask a model something through its chat template — the quick "does it talk like it should"
        check after quantizing. model: a GGUF path or quantize/pipeline job id (llama-cpp-python), or,
        when OLLAMA_HOST is set, a model Ollama has (a job's Modelfile name is tried there first)."""
        from forge.query import query

        gguf, ollama_name = None, None
        if Path(model).expanduser().exists() or model.startswith(("/", ".", "~")):
            gguf = check_path(model, "model")
        else:
            try:
                job = runner.require(model, ("quantize", "pipeline"))
            except ForgeError as err:
                if err.code != "job_not_found":
                    raise
                ollama_name = model
            else:
                gguf = Path(_last_gguf(job["result"]))
                modelfile_record = gguf.parent.parent / "stages" / "modelfile.json"
                if modelfile_record.is_file():
                    ollama_name = json.loads(modelfile_record.read_text(encoding="utf-8")).get("model_name")
        msgs = messages or [{"role": "user", "content": prompt or "Hello"}]
        out = await anyio.to_thread.run_sync(lambda: query(gguf, msgs, max_tokens, temperature, ollama_name))
        return QueryResult(**out)

    def job_record(job: dict) -> dict:
        """What a seal keeps of a job: identity, inputs, outcome, and the warnings it met."""
        warnings = [e["data"].get("message") for e in runner.store.events(job["id"], limit=10_000, type_="warning")]
        return {"id": job["id"], "kind": job["kind"], "status": job["status"], "params": job["params"],
                "created_at": job["created_at"], "finished_at": job.get("finished_at"), "error": job.get("error"),
                "warnings": warnings}

    @server.tool(annotations=WRITES)
    @_tool_errors
    async def forge_seal_snapshot(job_ids: list[str] | None = None, note: str | None = None) -> SealResult:
        """Seal one or more jobs' runs: a canonical-JSON record (configs, base model, dataset and artifact
        sha256s, metrics and loss curve, versions, hardware, job outcomes, warnings) whose hash is its id,
        chained to the previous seal, plus a Markdown retrospective and a loss-curve PNG. Default: the
        latest succeeded pipeline job."""
        from forge.seal import SealConfig, seal

        if job_ids:
            jobs = [runner.store.get(j) for j in job_ids]
        else:
            jobs = runner.store.list(status="succeeded", kind="pipeline", limit=1)
            if not jobs:
                raise ForgeError("job_not_found", "no succeeded pipeline job to seal", "pass job_ids")
        run_dirs = []
        for job in jobs:  # merge and quantize jobs write into their train run's dir
            result = job.get("result") or {}
            candidate = result.get("run_dir") or next(
                (str(Path(p).parent) for p in (result.get("merged_dir"), result.get("gguf_dir")) if p),
                job["params"].get("output_dir") or job.get("run_dir"))
            if candidate and candidate not in run_dirs and (Path(candidate) / "stages").is_dir():
                run_dirs.append(candidate)
        config = SealConfig(run_dirs=[Path(d) for d in run_dirs], note=note, jobs=[job_record(j) for j in jobs])
        out = await anyio.to_thread.run_sync(seal, config)
        first_rows = "\n".join(out["results_table"].splitlines()[2:6])
        return SealResult(seal_id=out["seal_id"], seal_path=out["seal_path"], previous=out["previous"],
                          retrospective_path=out["retrospective_path"], summary=first_rows)

    @server.tool(annotations=READ_ONLY)
    @_tool_errors
    async def forge_seal_verify(seal_id: str | None = None) -> SealVerification:
        """Re-hash a seal's record (default: the newest) and every artifact it lists that still exists,
        and walk the chain of previous seals; each mismatch names the file, the expected and the found hash."""
        from forge.seal import verify

        return SealVerification(**await anyio.to_thread.run_sync(verify, seal_id))

    @server.tool(annotations=STARTS_JOB)
    @_tool_errors
    async def forge_publish(source: str, repo_id: str, private: bool = True,
                            kind: Literal["adapter", "merged", "gguf"] = "adapter", dry_run: bool = False,
                            client_request_id: str | None = None) -> JobHandle:
        """Start publishing to the Hugging Face Hub (repo created if missing, one commit, a model card written
        from the run's seal). source: a path, or a train (adapter), merge (merged) or quantize (gguf) job
        id. dry_run returns the exact plan (files, bytes, card) in the job's result. Needs HF_TOKEN."""
        pickers = {"adapter": ("train", lambda r: r["adapter_dir"]), "merged": ("merge", lambda r: r["merged_dir"]),
                   "gguf": ("quantize", lambda r: r["gguf_dir"])}
        job_kind, pick = pickers[kind]
        path = job_output(source, job_kind, pick)
        job, _ = runner.submit("publish", {"source": path, "repo_id": repo_id, "private": private, "kind": kind,
                                           "dry_run": dry_run}, client_request_id)
        return handle(job)

    # ---- jobs ----

    @server.tool(annotations=STARTS_JOB)
    @_tool_errors
    async def forge_train(base_model: str, dataset: str, method: Literal["lora", "qlora"] = "lora",
                          output_name: str | None = None, hyperparameters: Hyperparameters | None = None,
                          resume_from_job: str | None = None, client_request_id: str | None = None) -> JobHandle:
        """Start training a LoRA/QLoRA adapter (TRL SFTTrainer + PEFT); returns a job handle at once.
        resume_from_job continues a failed or cancelled train job from its last checkpoint."""
        params: dict[str, Any] = {"base_model": check_model_ref(base_model, "base_model"),
                                  "dataset": str(check_path(dataset, "dataset")), "method": method,
                                  **(hyperparameters.train_fields() if hyperparameters else {})}
        if resume_from_job:
            previous = runner.require(resume_from_job, "train", finished=False)
            params.update(output_dir=previous["params"]["output_dir"], resume=True)
        if output_name:
            params["output_name"] = output_name
        job, _ = runner.submit("train", params, client_request_id)
        return handle(job)

    @server.tool(annotations=STARTS_JOB)
    @_tool_errors
    async def forge_merge(adapter: str, base_model: str | None = None,
                          dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto",
                          output_name: str | None = None, client_request_id: str | None = None) -> JobHandle:
        """Start merging an adapter (path or train job id) into its base: merged safetensors in the base
        dtype with tokenizer and chat template, checked by a logits parity test. Returns a job handle."""
        adapter_dir = job_output(adapter, "train", lambda r: r["adapter_dir"])
        params: dict[str, Any] = {"adapter_dir": adapter_dir, "dtype": dtype}
        if base_model:
            params["base_model"] = check_model_ref(base_model, "base_model")
        if output_name:
            params["output_dir"] = str(Path(adapter_dir).parent / output_name)
        job, _ = runner.submit("merge", params, client_request_id)
        return handle(job)

    @server.tool(annotations=STARTS_JOB)
    @_tool_errors
    async def forge_quantize(model: str, quantizations: list[str] | None = None, output_name: str | None = None,
                             client_request_id: str | None = None) -> JobHandle:
        """Start converting a merged model (path or merge job id) to GGUF and quantizing it (default
        Q4_K_M); every file is verified by loading it in llama.cpp. Returns a job handle."""
        model_dir = job_output(model, "merge", lambda r: r["merged_dir"])
        params: dict[str, Any] = {"model_dir": model_dir, "quantizations": quantizations or ["Q4_K_M"]}
        if output_name:
            params["name"] = output_name
        job, _ = runner.submit("quantize", params, client_request_id)
        return handle(job)

    @server.tool(annotations=STARTS_JOB)
    @_tool_errors
    async def forge_pipeline(base_model: str, dataset: str, method: Literal["lora", "qlora"] = "lora",
                             quantizations: list[str] | None = None, system_prompt: str | None = None,
                             hyperparameters: Hyperparameters | None = None, output_name: str | None = None,
                             client_request_id: str | None = None) -> JobHandle:
        """Start the whole chain in one job: train → merge → quantize → modelfile → seal. Its status
        shows the stage running (e.g. "train:training"); artifacts of every stage come with it."""
        params = {"base_model": check_model_ref(base_model, "base_model"),
                  "dataset": str(check_path(dataset, "dataset")), "method": method,
                  "quantizations": quantizations or ["Q4_K_M"], "system_prompt": system_prompt,
                  "train": hyperparameters.train_fields() if hyperparameters else {}}
        if output_name:
            params["output_name"] = output_name
        job, _ = runner.submit("pipeline", params, client_request_id)
        return handle(job)

    @server.tool(annotations=READ_ONLY)
    @_tool_errors
    async def forge_job_status(job_id: str) -> JobStatus:
        """A job's status, stage, progress (step/total, epoch, percent, ETA, tokens/s, loss), artifacts with
        sha256, metrics, error (code, message, hint, retryable) and suggested next tool calls."""
        return status_of(runner.store.get(job_id))

    @server.tool(annotations=READ_ONLY)
    @_tool_errors
    async def forge_job_list(status: Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
                             | None = None,
                             kind: Literal["train", "merge", "quantize", "pipeline", "publish"] | None = None,
                             limit: int = 20,
                             cursor: str | None = None) -> JobList:
        """Jobs, newest first, optionally filtered by status and kind; page with cursor."""
        limit = max(1, min(limit, 100))
        jobs = runner.store.list(status=status, kind=kind, limit=limit + 1,
                                 before=float(cursor) if cursor else None)
        page = jobs[:limit]
        return JobList(jobs=[status_of(j) for j in page],
                       next_cursor=repr(page[-1]["created_at"]) if len(jobs) > limit else None)

    @server.tool(annotations=READ_ONLY)
    @_tool_errors
    async def forge_job_events(job_id: str, after: int = 0, limit: int = 50) -> JobEvents:
        """A job's events (status changes, stages, evals, warnings), paged: pass next_after as after."""
        runner.store.get(job_id)
        limit = max(1, min(limit, 200))
        events = runner.store.events(job_id, after=after, limit=limit)
        return JobEvents(job_id=job_id, events=[JobEvent(**e) for e in events],
                         next_after=events[-1]["seq"] if len(events) == limit else None)

    @server.tool(annotations=CANCELS)
    @_tool_errors
    async def forge_job_cancel(job_id: str, force: bool = False) -> JobStatus:
        """Cancel a job. A training job saves a checkpoint first (resume it later with resume_from_job);
        force=true kills the worker's process group at once."""
        return status_of(await anyio.to_thread.run_sync(lambda: runner.cancel(job_id, force)))

    @server.tool(annotations=READ_ONLY)
    @_tool_errors
    async def forge_job_wait(job_id: str, timeout_s: float = 60, ctx: Context | None = None) -> JobStatus:
        """Wait until the job ends or timeout_s passes (at most 600), sending MCP progress notifications
        while it runs when the call carries a progress token; returns the status either way."""
        deadline = time.monotonic() + max(0.0, min(timeout_s, 600.0))
        last = None
        while True:
            job = runner.store.get(job_id)
            progress = job.get("progress") or {}
            marker = (job["status"], job.get("stage"), progress.get("step"))
            if ctx is not None and marker != last:
                last = marker
                message = " ".join(filter(None, [job["status"], job.get("stage")]))
                if progress.get("total_steps"):
                    message += f" step {progress.get('step')}/{progress['total_steps']}"
                    if progress.get("loss") is not None:
                        message += f" loss {progress['loss']:.4f}"
                await ctx.report_progress(progress.get("percent") or 0.0, 100.0, message)
            if Status(job["status"]) in TERMINAL or time.monotonic() >= deadline:
                return status_of(job)
            await anyio.sleep(0.5)

    # ---- resources ----

    @server.resource("forge://jobs/{job_id}", mime_type="application/json")
    def job_resource(job_id: str) -> str:
        """A job's status as JSON."""
        try:
            return status_of(runner.store.get(job_id)).model_dump_json(indent=2)
        except ForgeError as err:
            raise ResourceNotFoundError(err.message) from None

    @server.resource("forge://jobs/{job_id}/log", mime_type="text/plain")
    def job_log(job_id: str) -> str:
        """The last 200 lines of a job's log (tracebacks live here, not in statuses)."""
        try:
            job = runner.store.get(job_id)
        except ForgeError as err:
            raise ResourceNotFoundError(err.message) from None
        path = Path(job["run_dir"] or "") / "job.log"
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
        return "\n".join(lines[-200:])

    def seal_file(seal_id: str, name: str) -> str:
        from forge.seal import find_seal

        try:
            return (find_seal(seal_id) / name).read_text(encoding="utf-8")
        except ForgeError as err:
            raise ResourceNotFoundError(err.message) from None

    @server.resource("forge://seals/{seal_id}", mime_type="application/json")
    def seal_resource(seal_id: str) -> str:
        """A seal's record (canonical JSON) by id (sha256:… or a prefix of its hex)."""
        return seal_file(seal_id, "seal.json")

    @server.resource("forge://seals/{seal_id}/retrospective", mime_type="text/markdown")
    def seal_retrospective(seal_id: str) -> str:
        """A seal's retrospective (Markdown, rendered from the record alone)."""
        return seal_file(seal_id, "retrospective.md")

    return server


def _last_gguf(result: dict) -> str:
    quant = result.get("outputs") or (result.get("stages") or {}).get("quantize", {}).get("outputs")
    if not quant:
        raise ForgeError("job_not_finished", "that job produced no GGUF", "pass a quantize or pipeline job id")
    return quant[-1]["path"]


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _bearer_app(app, token: str):
    """Refuse HTTP requests without ``Authorization: Bearer <FORGE_MCP_TOKEN>``."""
    import hmac

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            got = headers.get(b"authorization", b"").decode()
            if not hmac.compare_digest(got, f"Bearer {token}"):
                body = b'{"error": "missing or wrong bearer token (FORGE_MCP_TOKEN)"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(prog="forge-mcp", description="Forge MCP server")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    from forge.cli import quiet_libraries

    quiet_libraries()
    server = create_server()
    if args.transport == "stdio":
        server.run("stdio")
        return 0
    token = os.environ.get("FORGE_MCP_TOKEN")
    if args.host not in LOOPBACK and not token:
        print("error [token_required]: serving HTTP on a non-loopback address needs FORGE_MCP_TOKEN\n"
              "hint: export FORGE_MCP_TOKEN=<a long random string>, or use --host 127.0.0.1", file=sys.stderr)
        return 2
    import uvicorn

    app = server.streamable_http_app()
    if token:
        app = _bearer_app(app, token)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
