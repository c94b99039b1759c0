"""The train stage: ``train`` runs its phases top to bottom, each behind one call into its module: run dir
(``run_dir``) → launching several ranks (``launch``, ``ray_train``) → data (``inputs``) → model (``model``) →
memory plan (``memory``) → trainer arguments and trainer (``methods``, with ``callbacks`` and ``trackers``) →
run → adapter and metrics (``metrics``)."""

from __future__ import annotations

import os
import time

from forge.errors import Codes, ForgeError
from forge.progress import ProgressCallback, quiet_libraries
from forge.runs import Outcome, record_stage
from forge.train.callbacks import STOP_FILE, StopFlag
from forge.train.config import TrainConfig, with_defaults
from forge.train.inputs import prepare_data
from forge.train.launch import in_launched_rank, launch_distributed, rank_index
from forge.train.memory import plan_memory
from forge.train.methods import build_trainer, trainer_arguments
from forge.train.metrics import final_evals, train_metrics
from forge.train.model import grow_vocabulary, load_model, resolve_base_model, use_liger
from forge.train.ray_ranks import in_ray_train_rank, rank_start
from forge.train.ray_train import launch_ray_train, ray_train_workers
from forge.train.run_dir import (
    TrainRun,
    checkpoint_step,
    latest_checkpoint,
    prepare_run,
    refuse_finished_schedule,
    scheduled_steps,
)
from forge.train.trackers import open_trackers
from forge.workspace import atomic_dir, atomic_write_json, dir_artifacts


def train(config: TrainConfig, on_progress: ProgressCallback | None = None) -> dict:
    """Train an adapter; return the result (paths, metrics, artifacts). Raises ForgeError."""
    import torch

    from forge.hardware import device_kind

    on_ray = _refuse_local_restarts(config)
    config, chosen = with_defaults(config)  # hyperparameters left unset: from the data's and the model's size
    # Run dir (and, for several processes, the launcher that runs this function once per rank)
    run = prepare_run(config, on_progress, launcher=not in_launched_rank() and not in_ray_train_rank())
    if chosen and run.rank0:
        run.writer({"event": "defaults", "chosen": chosen})
    if run.rank0 and not in_ray_train_rank():  # a Ray Train rank restarting must not drop a stop under way
        (run.dir / STOP_FILE).unlink(missing_ok=True)  # a stop request belongs to the run it stopped
    if not in_launched_rank() and not in_ray_train_rank():
        if on_ray and ray_train_workers(config.num_processes, config.max_failures):
            return launch_ray_train(config, run.dir, run.writer, on_progress, _rank_main)  # ranks: Ray Train workers
        if config.num_processes > 1:
            return launch_distributed(config, run.dir, run.writer, on_progress)

    # Data, model, memory plan, trainer
    model_ref, gguf = resolve_base_model(config, run.writer)
    data = prepare_data(config, model_ref, run.writer)
    run.writer.stage("loading_model")
    torch.manual_seed(config.seed)
    model = load_model(config, model_ref)
    model.config.use_cache = False  # with a cache, transformers skips the packed-sequence mask
    if data.template["added_tokens"]:
        grow_vocabulary(model, data.tokenizer)
    on_cuda = device_kind() == "cuda"
    liger = use_liger(config, on_cuda)
    plan = plan_memory(config, model, on_cuda, liger, run.writer)
    args = trainer_arguments(config, plan, run.checkpoints, data.eval_set, on_cuda, model.dtype, liger)
    stop = StopFlag(run.dir)
    with open_trackers(config, run.dir):
        trainer = build_trainer(config, model, data, args, run.writer, stop)
        if run.resume_from:
            refuse_finished_schedule(checkpoint_step(run.resume_from), scheduled_steps(trainer),
                                     f"the checkpoint {run.resume_from.name}")

        # Run
        started = time.time()
        result, world = _run_trainer(trainer, run, stop)
        duration = time.time() - started
    if stop.requested:
        checkpoint = str(latest_checkpoint(run.checkpoints))
        run.writer.stage("cancelled", checkpoint=checkpoint)
        return {"status": Outcome.CANCELLED, "run_dir": str(run.dir), "checkpoint": checkpoint,
                "step": trainer.state.global_step}

    # Adapter (with the tokenizer and chat template used in training), metrics, stage record
    run.writer.stage("saving")
    evals = final_evals(trainer, data.eval_set)
    if not run.rank0:
        return {"status": Outcome.SUCCEEDED, "run_dir": str(run.dir), "rank": rank_index()}
    with atomic_dir(run.adapter, force=True) as tmp:
        # with new tokens, the resized embeddings go with the adapter: merging needs the same rows
        trainer.model.save_pretrained(tmp, save_embedding_layers=True if data.template["added_tokens"] else "auto")
        data.tokenizer.save_pretrained(tmp)
    metrics = train_metrics(trainer, result, evals, duration, world, plan, liger, run.resume_from)
    atomic_write_json(run.dir / "metrics.json", metrics)
    run.writer({"event": "done", "step": trainer.state.global_step, "total_steps": trainer.state.max_steps,
                "percent": 100.0, "train_loss": metrics["train_loss"], "eval_loss": metrics["eval_loss"]})
    ds = data.dataset
    out = {
        "status": Outcome.SUCCEEDED, "run_dir": str(run.dir), "adapter_dir": str(run.adapter),
        "base_model": config.base_model, "base_model_dir": model_ref, "base_gguf": gguf,
        "method": config.method, "metrics": metrics, **({"defaults": chosen} if chosen else {}),
        "dataset": {"path": str(ds.path), "sha256": ds.sha256, "format": ds.format,
                    "train_records": data.train_records, "eval_records": data.eval_records, "tokens": data.stats},
        "chat_template": data.template,
        "trackers": {t: str(run.dir / "trackers" / ("mlruns" if t == "mlflow" else t)) for t in config.report_to},
        "artifacts": dir_artifacts(run.adapter, "adapter"),
    }
    record_stage(run.dir, "train", out)
    return out


def _refuse_local_restarts(config: TrainConfig) -> bool:
    """Whether this is a Ray job; max_failures outside one is refused, not ignored."""
    on_ray = os.environ.get("FORGE_EXECUTOR") == "ray"
    if config.max_failures and not on_ray:
        raise ForgeError(Codes.INVALID_ARGUMENT, f"max_failures={config.max_failures} restarts training on a Ray "
                         "cluster, and this run is not a Ray job (FORGE_EXECUTOR=ray)",
                         "leave max_failures out: a stopped run continues from its last checkpoint with "
                         "resume=true (forge train --resume)")
    return on_ray


def _run_trainer(trainer, run: TrainRun, stop: StopFlag):
    """Train (from the checkpoint when resuming); return the Trainer's result and the world size."""
    import torch

    run.writer.stage("training", resume_from=str(run.resume_from) if run.resume_from else None)
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except torch.OutOfMemoryError as exc:
        raise ForgeError(Codes.OUT_OF_MEMORY, "training ran out of GPU memory",
                         "lower per_device_train_batch_size or max_length, turn on gradient_checkpointing, "
                         "or use method=qlora; resume=true continues from the last checkpoint",
                         retryable=True) from exc
    finally:
        stop.restore()
    world = 1
    if in_launched_rank():
        import torch.distributed as dist

        world = dist.get_world_size()
        counted = torch.tensor([trainer.real_tokens["tokens"], trainer.real_tokens.get("slots", 0)])
        dist.all_reduce(counted)  # every rank trained on its own shard: tokens/s is the sum
        trainer.real_tokens.update(tokens=int(counted[0]), slots=int(counted[1]))
    return result, world


def _rank_main(config: dict) -> None:
    """One Ray Train worker: the train stage, as a rank."""
    quiet_libraries()
    train(rank_start(TrainConfig.model_validate(config)))
