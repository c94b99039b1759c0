"""What each job kind runs: the forge stage function and how its params become a config."""

from __future__ import annotations

HEAVY_KINDS = ("train", "merge", "quantize", "lora_gguf", "evaluate", "pipeline", "sweep")


def run_job(kind: str, params: dict, on_progress, hooks=None) -> dict:
    """Run one job's stage; ``hooks`` take a sweep's trials (forge.sweep.TrialHooks)."""
    # Keys starting with "_" are notes for people and seals (e.g. where a dataset was copied from).
    params = {k: v for k, v in params.items() if not k.startswith("_")}
    if kind == "train":
        from forge.train import TrainConfig, train

        return train(TrainConfig.build(**params), on_progress)
    if kind == "merge":
        from forge.merge import MergeConfig, merge

        return merge(MergeConfig.build(**params), on_progress)
    if kind == "quantize":
        from forge.quantize import QuantizeConfig, quantize

        return quantize(QuantizeConfig.build(**params), on_progress)
    if kind == "lora_gguf":
        from forge.lora_gguf import LoraGgufConfig, lora_gguf

        return lora_gguf(LoraGgufConfig.build(**params), on_progress)
    if kind == "evaluate":
        from forge.evaluate import EvaluateConfig, evaluate

        return evaluate(EvaluateConfig.build(**params), on_progress)
    if kind == "pipeline":
        from forge.pipeline import PipelineConfig, run_pipeline

        def stage_done(stage: str, result: dict) -> None:
            on_progress({"event": "stage_done", "pipeline_stage": stage, "status": result.get("status")})

        return run_pipeline(PipelineConfig.build(**params), on_progress, stage_done)
    if kind == "sweep":
        from forge.sweep import SweepConfig, run_sweep

        return run_sweep(SweepConfig.build(**params), hooks, on_progress)
    if kind == "publish":
        from forge.publish import PublishConfig, publish

        return publish(PublishConfig.build(**params), on_progress)
    raise ValueError(f"unknown job kind {kind!r}")

