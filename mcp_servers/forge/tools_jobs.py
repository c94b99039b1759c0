"""Stage tools that start a job and return its handle at once: train, merge, quantize, the whole
pipeline, and publishing. Follow them with the tools in tools_follow.

Everything a job will need is checked here, before it takes a place in the queue: paths against the
roots, names, every config field, the dataset (copied, so the job trains on exactly the bytes
checked), and the size of the plan."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import Resolve
from pydantic import Field, ValidationError

from forge.errors import Codes, ForgeError
from forge.paths import check_output, check_path, model_ref
from forge.train import METHOD_HELP, Method
from mcp_servers.forge.args import (
    AS_TRAIN,
    HUB_ID_PATTERN,
    ChatTemplate,
    DatasetPath,
    MaxKld,
    ModelRef,
    Quantizations,
    QuantName,
    RequestId,
    Text,
    name_arg,
    path_arg,
    template_arg,
)
from mcp_servers.forge.confirm import PublishConfirmation, ask_to_publish, confirmed
from mcp_servers.forge.context import PUBLISHES, STARTS_JOB, STARTS_LOCAL_JOB, runner_of
from mcp_servers.forge.replies import handle_of
from mcp_servers.forge.schemas import Hyperparameters, JobHandle
from mcp_servers.lib import results
from mcp_servers.lib.errors import JobCodes

MethodArg = Annotated[Method | None, Field(description=METHOD_HELP + " Default lora.")]
HyperparametersArg = Annotated[Hyperparameters | None, Field(description=(
    "e.g. {\"num_train_epochs\": 2}; others keep their defaults."))]
RunName = Annotated[str | None, name_arg(
    "Run dir name; default the job id.")]


async def _submit(runner, kind: str, params: dict, client_request_id: str | None) -> tuple[dict, bool]:
    """Queue the job off the event loop: on Ray, submitting asks the cluster (its nodes, the storage check)."""
    return await anyio.to_thread.run_sync(lambda: runner.submit(kind, params, client_request_id))


def _checked_dataset(dataset: str, train_fields: dict) -> tuple[dict, int]:
    """Copy the dataset into FORGE_HOME, validate every line, and size the plan; return the train
    fields the job runs with (the dataset now the copy) and the steps it plans."""
    from forge import data
    from forge.train import TrainConfig, check_plan

    snapshot, sha256 = data.snapshot(check_path(dataset, "dataset"))
    loaded = data.load_dataset(snapshot, train_fields.get("dataset_format", "auto"))
    records = len(loaded.conversations)
    config = TrainConfig.build(**{**train_fields, "dataset": snapshot})
    if config.preference:
        loaded.preference_pairs()  # a dpo/orpo job on SFT records is refused now, not when it runs
    planned = check_plan(config, loaded.conversations)  # the records themselves: their groups decide the split
    return {**train_fields, "dataset": str(snapshot), "_dataset": {"source": dataset, "sha256": sha256,
                                                                    "records": records}}, planned


def _hyperparameters(given: dict | None) -> Any:
    """The pipeline's hyperparameters, held to forge_train's model (unknown knobs named in the error)."""
    if given is None:
        return None
    try:
        return Hyperparameters.model_validate(given)
    except ValidationError as err:
        problems = [f"hyperparameters.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ForgeError(Codes.INVALID_ARGUMENT, "invalid arguments: " + "; ".join(problems),
                         "use forge_train's hyperparameter names and bounds", details=problems) from None


def _train_fields(hyperparameters: Any) -> dict:
    return hyperparameters.model_dump(exclude_none=True) if hyperparameters else {}


def _resumed(store, job_id: str, given: dict) -> tuple[dict, str]:
    """The checked params of a job continuing ``job_id`` and the note saying from where and what changed."""
    from mcp_servers.forge import resume

    job = resume.resumable(store, job_id)
    reached, checkpoint = resume.step_reached(job)
    fields, changed = resume.resume_fields(job, given, checkpoint)
    resumes = {k: fields.pop(k) for k in ("_resumes",) if k in fields}
    params, planned = _checked_dataset(fields["dataset"], fields)
    params.update(resumes)
    if given.get("dataset") is None:
        params["_dataset"] = job["params"].get("_dataset", params["_dataset"])  # where the copy came from
    planned = resume.check_schedule(job, changed, planned, reached)
    return params, resume.resume_note(job, checkpoint, planned, changed)


async def forge_train(
    ctx: Context, base_model: ModelRef = None, dataset: DatasetPath = None, method: MethodArg = None,
    chat_template: ChatTemplate = None,
    run_name: RunName = None,
    hyperparameters: HyperparametersArg = None,
    resume_from_job: Annotated[str | None, Field(None, max_length=64, description=(
        "A stopped train job to continue from its last checkpoint; it gives every argument left out."))] = None,
    client_request_id: RequestId = None,
) -> JobHandle:
    """Start training a LoRA adapter (TRL + PEFT) on assistant turns or chosen/rejected pairs. Returns a job
    handle."""
    runner = runner_of(ctx)
    given = {"base_model": model_ref(base_model, "base_model") if base_model else None, "method": method,
             "chat_template": template_arg(chat_template), "dataset": dataset, **_train_fields(hyperparameters)}
    note = None
    retried = runner.store.by_request("train", client_request_id)
    if retried is not None:  # the same call again (a retry after a lost reply): the job it made, not a refusal
        return handle_of(runner, retried)
    if resume_from_job:
        if run_name:
            raise ForgeError(Codes.INVALID_ARGUMENT, "run_name cannot change on a resume: the checkpoint is in "
                             "the resumed job's run dir", "leave run_name out")
        try:
            params, note = await anyio.to_thread.run_sync(lambda: _resumed(runner.store, resume_from_job, given))
        except ForgeError as err:  # this very call, retried while its first try was still being checked
            retried = runner.store.by_request("train", client_request_id) if err.code == JobCodes.ALREADY_RESUMED \
                else None
            if retried is None:
                raise
            return handle_of(runner, retried)
    else:
        if not base_model or not dataset:
            raise ForgeError(Codes.INVALID_ARGUMENT, "forge_train needs base_model and dataset (or resume_from_job)",
                             "pass both, e.g. forge_demo_assets()'s base_model and dataset")
        fields = {**{k: v for k, v in given.items() if k != "dataset"}, "method": method or "lora"}
        if run_name:
            fields["run_name"] = run_name
        params, _ = await anyio.to_thread.run_sync(lambda: _checked_dataset(dataset, fields))
    job, _ = await _submit(runner, "train", params, client_request_id)
    return handle_of(runner, job, note)


async def forge_merge(
    adapter: Annotated[str, path_arg("An adapter dir, or a train job id.")],
    ctx: Context,
    base_model: Annotated[str | None, Field(None, max_length=4096, description=(
        "Default: the one the adapter names."))] = None,
    dtype: Annotated[Literal["auto", "float16", "bfloat16", "float32"],
                     Field(description="Saved dtype; auto = the base model's own.")] = "auto",
    merged_name: Annotated[str | None, name_arg("Dir name beside the adapter; default merged.")] = None,
    client_request_id: RequestId = None,
) -> JobHandle:
    """Start merging an adapter into its base (chat template kept, logits checked). Returns a job handle."""
    from forge.merge import MergeConfig

    runner = runner_of(ctx)
    adapter_dir = results.resolve_input(runner.store, adapter, "adapter", "adapter")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ForgeError(Codes.ADAPTER_NOT_FOUND, f"{adapter_dir} holds no adapter_config.json",
                         "pass the adapter dir a train job wrote (<run dir>/adapter), or the train job's id")
    params: dict[str, Any] = {"adapter_dir": str(adapter_dir), "dtype": dtype}
    if base_model:
        params["base_model"] = model_ref(base_model, "base_model")
    if merged_name:
        params["output_dir"] = str(check_output(adapter_dir.parent / merged_name, "merged model dir"))
    MergeConfig.build(**params)  # every field checked now, not when the job runs
    job, _ = await _submit(runner, "merge", params, client_request_id)
    return handle_of(runner, job)


def _is_adapter(runner, model: str) -> bool:
    """An adapter (train job id, or a dir with adapter_config.json) rather than a merged model."""
    if results.is_job_id(model):
        return runner.store.get(model)["kind"] == "train"
    return (check_path(model, "model") / "adapter_config.json").is_file()


async def forge_quantize(
    model: Annotated[str, path_arg(
        "A merged model dir or merge job id (adapter dir or train job id: a LoRA GGUF).")],
    ctx: Context,
    quantizations: Quantizations = None,
    gguf_name: Annotated[str | None, name_arg("GGUF file name stem; default the run's name.")] = None,
    max_kld: MaxKld = None,
    imatrix: Annotated[str | None, Field(None, max_length=4096, description=(
        "auto (default: from the training data), off, or a file."))] = None,
    client_request_id: RequestId = None,
) -> JobHandle:
    """Start GGUF conversion and quantization in llama.cpp, each file measured against the f16. Returns a
    job handle."""
    from forge.quant_plan import imatrix_file
    from forge.quantize import QuantizeConfig

    runner = runner_of(ctx)
    if _is_adapter(runner, model):
        from forge.lora_gguf import LoraGgufConfig

        params = {"adapter_dir": str(results.resolve_input(runner.store, model, "adapter", "adapter"))}
        LoraGgufConfig.build(**params)
        job, _ = await _submit(runner, "lora_gguf", params, client_request_id)
        return handle_of(runner, job)
    model_dir = results.resolve_input(runner.store, model, "merged", "model")
    if not (model_dir / "config.json").is_file():
        raise ForgeError(Codes.MODEL_NOT_FOUND, f"{model_dir} holds no config.json, so it is not a model dir",
                         "pass the merged model dir a merge job wrote (<run dir>/merged), or the merge job's id")
    params: dict[str, Any] = {"model_dir": str(model_dir), "quantizations": quantizations or ["Q4_K_M"]}
    if gguf_name:
        params["gguf_name"] = gguf_name
    if imatrix and imatrix_file(imatrix).strip().lower() not in ("auto", "off"):
        imatrix = str(check_path(imatrix, "imatrix"))
    params.update({k: v for k, v in {"max_kld": max_kld, "imatrix": imatrix}.items() if v is not None})
    params["quantizations"] = QuantizeConfig.build(**params).quantizations  # known types, upper case
    job, _ = await _submit(runner, "quantize", params, client_request_id)
    return handle_of(runner, job)


async def forge_pipeline(
    base_model: Annotated[str, path_arg(AS_TRAIN)], dataset: Annotated[str, path_arg(AS_TRAIN)], ctx: Context,
    method: Annotated[Method, Field(description=AS_TRAIN)] = "lora",
    chat_template: Annotated[str | None, Field(max_length=4096, description=AS_TRAIN)] = None,
    quantizations: Annotated[list[QuantName] | None, Field(None, min_length=1, max_length=8,
                                                           description="As forge_quantize's.")] = None,
    system_prompt: Annotated[Text, Field(description="For records without one, and the Modelfile.")] = None,
    hyperparameters: Annotated[dict[str, Any] | None, Field(description=(
        "forge_train's hyperparameters."))] = None,
    run_name: Annotated[str | None, name_arg(AS_TRAIN)] = None,
    client_request_id: RequestId = None,
) -> JobHandle:
    """Start train, merge, quantize, evaluate, Modelfile and seal as one job. Returns a job handle."""
    from forge.pipeline import PipelineConfig

    runner = runner_of(ctx)
    hyperparameters = _hyperparameters(hyperparameters)
    train = {"base_model": model_ref(base_model, "base_model"), "method": method,
             "system_prompt": system_prompt, "chat_template": template_arg(chat_template),
             **_train_fields(hyperparameters)}
    checked, _ = await anyio.to_thread.run_sync(lambda: _checked_dataset(dataset, train))
    params = {"base_model": train["base_model"], "dataset": checked["dataset"], "method": method,
              "quantizations": quantizations or ["Q4_K_M"], "system_prompt": system_prompt,
              "train": {**_train_fields(hyperparameters), "chat_template": train["chat_template"]},
              "_dataset": checked["_dataset"]}
    if run_name:
        params["run_name"] = run_name
    PipelineConfig.build(**{k: v for k, v in params.items() if not k.startswith("_")})
    job, _ = await _submit(runner, "pipeline", params, client_request_id)
    return handle_of(runner, job)


async def forge_evaluate(
    run: Annotated[str, path_arg("A run dir, or a train, quantize or pipeline job id.")], ctx: Context,
    dataset: Annotated[str | None, path_arg("JSONL to measure on; default the run's eval split.")] = None,
    client_request_id: RequestId = None,
) -> JobHandle:
    """Start measuring a run: perplexity of base, fine-tuned and each GGUF; answers scored (stopped or not);
    forgetting. Returns a job handle."""
    from forge.evaluate import EvaluateConfig

    runner = runner_of(ctx)
    if results.is_job_id(run):
        run_dir = results.run_dir_of(runner.store.require(run, ("train", "quantize", "pipeline")))
        if run_dir is None:
            raise ForgeError(Codes.RUN_NOT_FOUND, f"job {run} left no run dir", "pass a finished job's id")
    else:
        run_dir = results.resolve_input(runner.store, run, "run", "run")
    params: dict[str, Any] = {"run_dir": str(run_dir)}
    if dataset:
        params["dataset"] = str(check_path(dataset, "dataset"))
    EvaluateConfig.build(**params)
    job, _ = await _submit(runner, "evaluate", params, client_request_id)
    return handle_of(runner, job)


async def forge_publish(
    source: Annotated[str, path_arg("A path, or a train, merge or quantize job id.")],
    repo_id: Annotated[str, Field(max_length=193, pattern=HUB_ID_PATTERN, description=(
        "owner/name, e.g. me/bot-gguf."))],
    ctx: Context,
    private: Annotated[bool, Field(description="Create the repo private.")] = True,
    kind: Annotated[Literal["adapter", "merged", "gguf"], Field(description="What source holds.")] = "adapter",
    dry_run: Annotated[bool, Field(description="Plan only; upload nothing.")]
    = False,
    client_request_id: RequestId = None,
    confirmation: Annotated[ElicitationResult[PublishConfirmation], Resolve(ask_to_publish)] = None,
) -> JobHandle:
    """Start uploading to the Hugging Face Hub in one commit, with a card from the run's seal (needs
    HF_TOKEN); a client that can ask the person confirms first. Returns a job handle."""
    from forge.publish import PublishConfig

    confirmed(confirmation, repo_id)
    runner = runner_of(ctx)
    path = results.resolve_input(runner.store, source, "gguf_dir" if kind == "gguf" else kind, "source")
    params = {"source": str(path), "repo_id": repo_id, "private": private, "kind": kind, "dry_run": dry_run}
    PublishConfig.build(**params)
    job, _ = await _submit(runner, "publish", params, client_request_id)
    return handle_of(runner, job)


TOOLS = [
    (forge_train, "Train an adapter", STARTS_JOB),
    (forge_merge, "Merge an adapter", STARTS_JOB),
    (forge_quantize, "Convert to GGUF and quantize", STARTS_LOCAL_JOB),
    (forge_pipeline, "Run the whole pipeline", STARTS_JOB),
    (forge_evaluate, "Evaluate a run", STARTS_LOCAL_JOB),
    (forge_publish, "Publish to the Hugging Face Hub", PUBLISHES),
]
HANDLE_TOOLS = frozenset(fn.__name__ for fn, _, _ in TOOLS)
