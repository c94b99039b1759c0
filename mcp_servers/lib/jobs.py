"""What each job kind runs: the forge stage function and how its params become a config."""

from __future__ import annotations

from pathlib import Path

HEAVY_KINDS = ("train", "merge", "quantize", "pipeline")


def run_job(kind: str, params: dict, on_progress) -> dict:
    if kind == "train":
        from forge.train import TrainConfig, train

        return train(TrainConfig.build(**params), on_progress)
    if kind == "merge":
        from forge.merge import MergeConfig, merge

        return merge(MergeConfig.build(**params), on_progress)
    if kind == "quantize":
        from forge.quantize import QuantizeConfig, quantize

        return quantize(QuantizeConfig.build(**params), on_progress)
    if kind == "pipeline":
        from forge.pipeline import PipelineConfig, run_pipeline

        stages: dict[str, dict] = {}

        def stage_done(stage: str, result: dict) -> None:
            stages[stage] = {"status": result.get("status"), "artifacts": result.get("artifacts", [])}
            on_progress({"event": "stage_done", "pipeline_stage": stage, "status": result.get("status")})

        return run_pipeline(PipelineConfig.build(**params), on_progress, stage_done)
    raise ValueError(f"unknown job kind {kind!r}")


def run_dir_for(kind: str, params: dict) -> str | None:
    for key in ("output_dir",):
        if params.get(key):
            return str(Path(params[key]))
    return None
