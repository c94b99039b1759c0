"""The sweep tool: a few trainings chosen from the size of the data and the model, each scored on held-out
records and on forgetting; the best within the forgetting budget kept (and, asked, carried through to a
sealed GGUF). Each trial is a job of its own (``{sweep id}-t1``, …) an agent follows with forge_status."""

from __future__ import annotations

from typing import Annotated

import anyio
from mcp.server.mcpserver import Context
from pydantic import Field

from forge.errors import Codes, ForgeError
from forge.paths import check_path, model_ref
from mcp_servers.forge.args import AS_TRAIN, RequestId, name_arg, path_arg
from mcp_servers.forge.context import STARTS_JOB, runner_of
from mcp_servers.forge.replies import handle_of
from mcp_servers.forge.schemas import JobHandle
from mcp_servers.forge.tools_jobs import _checked_dataset, _hyperparameters, _submit, _train_fields


def _checked(params: dict, dataset: str, eval_dataset: str | None) -> dict:
    """The sweep's params with the dataset (and held-out file) copied and validated, every trial's config
    checked, and the plan sized."""
    from forge import data
    from forge.sweep import SweepConfig, check_plan

    train = {**params["train"], "base_model": params["base_model"]}
    checked, _ = _checked_dataset(dataset, train)
    params = {**params, "dataset": checked["dataset"], "_dataset": checked["_dataset"]}
    if eval_dataset:
        snapshot, sha256 = data.snapshot(check_path(eval_dataset, "eval_dataset"))
        data.load_dataset(snapshot)  # every line checked now
        params.update(eval_dataset=str(snapshot), _eval_dataset={"source": eval_dataset, "sha256": sha256})
    config = SweepConfig.build(**{k: v for k, v in params.items() if not k.startswith("_")})
    trials = check_plan(config)
    if len(trials) < config.trials:
        params["_note"] = f"{len(trials)} distinct configurations left to try (asked {config.trials})"
    return params


async def forge_sweep(
    base_model: Annotated[str, path_arg(AS_TRAIN)], dataset: Annotated[str, path_arg(AS_TRAIN)], ctx: Context,
    eval_dataset: Annotated[str | None, Field(None, min_length=1, max_length=4096, description=(
        "Held-out JSONL each trial's answers are scored on; default the dataset's eval split."))] = None,
    trials: Annotated[int, Field(ge=1, le=12, description="Configurations to try.")] = 4,
    minutes: Annotated[float | None, Field(None, gt=0, le=10_080, description=(
        "No trial starts after this (on Ray, running ones stop too)."))] = None,
    carry_through: Annotated[bool, Field(description=(
        "Merge, quantize, evaluate, Modelfile and seal the winner."))] = False,
    hyperparameters: Annotated[dict | None, Field(None, description=(
        "forge_train's, shared by every trial; one given is not swept."))] = None,
    run_name: Annotated[str | None, name_arg(AS_TRAIN)] = None,
    client_request_id: RequestId = None,
) -> JobHandle:
    """Start a hyperparameter sweep: trials (learning rate, epochs, rank from data and model size) scored on
    held-out answers and forgetting; the best within the forgetting budget wins. Each trial is a job
    ({job_id}-t1, …); the status holds the table. Returns a job handle."""
    runner = runner_of(ctx)
    fixed = _train_fields(_hyperparameters(hyperparameters))
    if fixed.get("max_failures") or (fixed.get("num_processes") or 1) > 1:
        raise ForgeError(Codes.INVALID_ARGUMENT, "a sweep's trials each train in one process",
                         "leave num_processes and max_failures out of a sweep's hyperparameters")
    params = {"base_model": model_ref(base_model, "base_model"), "trials": trials, "minutes": minutes,
              "carry_through": carry_through, "train": fixed}
    if run_name:
        params["run_name"] = run_name
    params = await anyio.to_thread.run_sync(lambda: _checked(params, dataset, eval_dataset))
    job, _ = await _submit(runner, "sweep", params, client_request_id)
    return handle_of(runner, job, params.get("_note"))


TOOLS = [(forge_sweep, "Sweep hyperparameters", STARTS_JOB)]
HANDLE_TOOLS = frozenset(fn.__name__ for fn, _, _ in TOOLS)
