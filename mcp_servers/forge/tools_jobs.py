"""Stage tools that start a job and return its handle at once: train, merge, quantize, the whole
pipeline, and publishing. Follow them with the tools in tools_follow."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from pydantic import Field

from forge.train import Method
from mcp_servers.forge.context import STARTS_JOB, runner_of
from mcp_servers.forge.replies import handle_of
from mcp_servers.forge.schemas import Hyperparameters, JobHandle
from mcp_servers.lib import results
from mcp_servers.lib.paths import check_model_ref, check_path

BaseModelArg = Annotated[str, Field(description="Local model dir (under an allowed root) or a hub id (owner/name).")]
DatasetArg = Annotated[str, Field(description="JSONL dataset under an allowed root.")]
MethodArg = Annotated[Method, Field(description="lora, or qlora (4-bit NF4 base, bitsandbytes).")]
HyperparametersArg = Annotated[Hyperparameters | None, Field(description="Training knobs (TrainConfig names); "
                                                                         "unset ones keep their defaults.")]
RequestIdArg = Annotated[str | None, Field(description="Retry key: the same id returns the job it first started.")]
QuantizationsArg = Annotated[list[str] | None, Field(description="llama.cpp quant types, e.g. Q4_K_M, Q8_0; "
                                                                 "default [Q4_K_M].")]


def _train_fields(hyperparameters: Any) -> dict:
    return hyperparameters.model_dump(exclude_none=True) if hyperparameters else {}


async def forge_train(
    base_model: BaseModelArg, dataset: DatasetArg, ctx: Context, method: MethodArg = "lora",
    run_name: Annotated[str | None, Field(description="Name of the run dir under $FORGE_HOME/runs; default the "
                                                      "job id.")] = None,
    hyperparameters: HyperparametersArg = None,
    resume_from_job: Annotated[str | None, Field(description="A failed or cancelled train job to continue from its "
                                                             "last checkpoint.")] = None,
    client_request_id: RequestIdArg = None,
) -> JobHandle:
    """Start training a LoRA/QLoRA adapter (TRL SFTTrainer + PEFT); returns a job handle at once.
    resume_from_job continues a failed or cancelled train job from its last checkpoint."""
    runner = runner_of(ctx)
    params: dict[str, Any] = {"base_model": check_model_ref(base_model, "base_model"),
                              "dataset": str(check_path(dataset, "dataset")), "method": method,
                              **_train_fields(hyperparameters)}
    if resume_from_job:
        previous = runner.store.require(resume_from_job, "train", finished=False)
        params.update(output_dir=previous["params"]["output_dir"], resume=True)
    if run_name:
        params["run_name"] = run_name
    job, _ = runner.submit("train", params, client_request_id)
    return handle_of(runner, job)


async def forge_merge(
    adapter: Annotated[str, Field(description="An adapter dir, or a train job id.")], ctx: Context,
    base_model: Annotated[str | None, Field(description="Base model; default the one the adapter records.")] = None,
    dtype: Annotated[Literal["auto", "float16", "bfloat16", "float32"],
                     Field(description="Saved dtype; auto = the base model's own.")] = "auto",
    merged_name: Annotated[str | None, Field(description="Name of the merged model dir inside the run dir; "
                                                         "default merged.")] = None,
    client_request_id: RequestIdArg = None,
) -> JobHandle:
    """Start merging an adapter (path or train job id) into its base: merged safetensors in the base
    dtype with tokenizer and chat template, checked by a logits parity test. Returns a job handle."""
    runner = runner_of(ctx)
    adapter_dir = results.resolve_input(runner.store, adapter, "adapter", "adapter")
    params: dict[str, Any] = {"adapter_dir": str(adapter_dir), "dtype": dtype}
    if base_model:
        params["base_model"] = check_model_ref(base_model, "base_model")
    if merged_name:
        params["output_dir"] = str(adapter_dir.parent / merged_name)
    job, _ = runner.submit("merge", params, client_request_id)
    return handle_of(runner, job)


async def forge_quantize(
    model: Annotated[str, Field(description="A merged model dir, or a merge job id.")], ctx: Context,
    quantizations: QuantizationsArg = None,
    gguf_name: Annotated[str | None, Field(description="File name stem of the GGUFs; default the run dir's name.")]
    = None,
    client_request_id: RequestIdArg = None,
) -> JobHandle:
    """Start converting a merged model (path or merge job id) to GGUF and quantizing it (default
    Q4_K_M); every file is verified by loading it in llama.cpp. Returns a job handle."""
    runner = runner_of(ctx)
    model_dir = results.resolve_input(runner.store, model, "merged", "model")
    params: dict[str, Any] = {"model_dir": str(model_dir), "quantizations": quantizations or ["Q4_K_M"]}
    if gguf_name:
        params["gguf_name"] = gguf_name
    job, _ = runner.submit("quantize", params, client_request_id)
    return handle_of(runner, job)


async def forge_pipeline(
    base_model: BaseModelArg, dataset: DatasetArg, ctx: Context, method: MethodArg = "lora",
    quantizations: QuantizationsArg = None,
    system_prompt: Annotated[str | None, Field(description="System message for training records and the "
                                                           "Modelfile.")] = None,
    hyperparameters: HyperparametersArg = None,
    run_name: Annotated[str | None, Field(description="Name of the run dir under $FORGE_HOME/runs; default the "
                                                      "job id.")] = None,
    client_request_id: RequestIdArg = None,
) -> JobHandle:
    """Start the whole chain in one job: train → merge → quantize → modelfile → seal. Its status
    shows the stage running (e.g. "train:training"); artifacts of every stage come with it."""
    runner = runner_of(ctx)
    params = {"base_model": check_model_ref(base_model, "base_model"),
              "dataset": str(check_path(dataset, "dataset")), "method": method,
              "quantizations": quantizations or ["Q4_K_M"], "system_prompt": system_prompt,
              "train": _train_fields(hyperparameters)}
    if run_name:
        params["run_name"] = run_name
    job, _ = runner.submit("pipeline", params, client_request_id)
    return handle_of(runner, job)


async def forge_publish(
    source: Annotated[str, Field(description="A path, or a train (adapter), merge (merged) or quantize (gguf) "
                                             "job id.")],
    repo_id: Annotated[str, Field(description="Hub repo, owner/name.")], ctx: Context,
    private: Annotated[bool, Field(description="Create the repo private.")] = True,
    kind: Annotated[Literal["adapter", "merged", "gguf"], Field(description="What source holds.")] = "adapter",
    dry_run: Annotated[bool, Field(description="Return the exact plan in the job's result; nothing is uploaded.")]
    = False,
    client_request_id: RequestIdArg = None,
) -> JobHandle:
    """Start publishing to the Hugging Face Hub (repo created if missing, one commit, a model card written
    from the run's seal). source: a path, or a train (adapter), merge (merged) or quantize (gguf) job
    id. dry_run returns the exact plan (files, bytes, card) in the job's result. Needs HF_TOKEN."""
    runner = runner_of(ctx)
    path = results.resolve_input(runner.store, source, "gguf_dir" if kind == "gguf" else kind, "source")
    job, _ = runner.submit("publish", {"source": str(path), "repo_id": repo_id, "private": private, "kind": kind,
                                       "dry_run": dry_run}, client_request_id)
    return handle_of(runner, job)


TOOLS = [
    (forge_train, "Train an adapter", STARTS_JOB),
    (forge_merge, "Merge an adapter", STARTS_JOB),
    (forge_quantize, "Convert to GGUF and quantize", STARTS_JOB),
    (forge_pipeline, "Run the whole pipeline", STARTS_JOB),
    (forge_publish, "Publish to the Hugging Face Hub", STARTS_JOB),
]
