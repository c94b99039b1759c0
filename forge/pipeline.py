"""The whole chain in one call: train → merge → quantize → evaluate → modelfile → seal, in one run dir."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from forge.config import StageConfig
from forge.progress import ProgressCallback
from forge.runs import STAGES, Outcome
from forge.train import METHOD_HELP, Method

# Share of a pipeline's wall time each stage takes, roughly: training dominates. A pipeline's
# percent is the finished stages' shares plus the running stage's share times its own percent.
STAGE_WEIGHTS = {"train": 65, "merge": 10, "quantize": 15, "evaluate": 5, "modelfile": 2, "seal": 3}


def stage_span(stage: str) -> tuple[float, float]:
    """The (start, end) percent of a pipeline that ``stage`` covers."""
    start = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])
    return float(start), float(start + STAGE_WEIGHTS[stage])


class PipelineConfig(StageConfig):
    base_model: str = Field(description="Local model dir or hub id to fine-tune.")
    dataset: Path = Field(description="JSONL dataset.")
    method: Method = Field("lora", description=METHOD_HELP)
    output_dir: Path | None = Field(None, description="Run dir; default $FORGE_HOME/runs/<run_name>.")
    run_name: str | None = Field(None, description="Name of the run dir under $FORGE_HOME/runs.")
    quantizations: list[str] = Field(["Q4_K_M"], description=(
        "llama.cpp quant types to make; [\"auto\"]: the smallest within the quantize budget (max_kld)."))
    quantize: dict[str, Any] = Field(default_factory=dict, description=(
        "Extra quantize fields (QuantizeConfig names), e.g. {\"max_kld\": 0.03} or {\"imatrix\": \"off\"}."))
    system_prompt: str | None = Field(None, description="System prompt for training records and the Modelfile.")
    pre_tokenizer: str | None = Field(None, description="llama.cpp pre-tokenizer fallback for unknown tokenizers.")
    train: dict[str, Any] = Field(default_factory=dict, description="Extra train fields (TrainConfig names).")
    note: str | None = Field(None, description="A note kept in the seal.")
    evaluate: bool = Field(True, description=(
        "After quantize, measure base / fine-tuned / each GGUF on the eval split and compare sample answers."))

    @model_validator(mode="after")
    def _quantize_fields(self) -> PipelineConfig:
        """The quantize fields are checked now, not after training."""
        from forge.quantize import QuantizeConfig

        QuantizeConfig.build(**{**self.quantize, "model_dir": Path("."), "quantizations": self.quantizations})
        return self


StageHook = Callable[[str, dict], None]


def run_pipeline(config: PipelineConfig, on_progress: ProgressCallback | None = None,
                 on_stage_done: StageHook | None = None) -> dict:
    from forge.train import TrainConfig, train

    done = _Recorder(on_stage_done)
    train_cfg = TrainConfig.build(
        **{**config.train, "base_model": config.base_model, "dataset": config.dataset, "method": config.method,
           "output_dir": config.output_dir, "run_name": config.run_name,
           "system_prompt": config.system_prompt})
    trained = done("train", train(train_cfg, _staged(on_progress, "train")))
    if trained["status"] != Outcome.SUCCEEDED:
        return {"status": trained["status"], "stages": done.results, "run_dir": trained["run_dir"]}
    run_dir = Path(trained["run_dir"])
    after_training(run_dir, config.base_model, config.quantizations, on_progress, config.note, done,
                   quantize=config.quantize, pre_tokenizer=config.pre_tokenizer, evaluate_run=config.evaluate,
                   system_prompt=config.system_prompt)
    return {"status": Outcome.SUCCEEDED, "run_dir": str(run_dir), "stages": done.results}


class _Recorder:
    """Each stage's result, kept, and handed to the caller's hook as the stage ends."""

    def __init__(self, hook: StageHook | None):
        self.results: dict[str, dict] = {}
        self.hook = hook

    def __call__(self, stage: str, result: dict) -> dict:
        self.results[stage] = result
        if self.hook:
            self.hook(stage, result)
        return result


def _staged(on_progress: ProgressCallback | None, stage: str) -> ProgressCallback | None:
    """A stage's progress callback inside a pipeline: the stage's events, named with the stage."""
    if on_progress is None:
        return None
    on_progress({"event": "stage", "stage": "starting", "pipeline_stage": stage})
    return lambda event: on_progress({"pipeline_stage": stage, **event})


def after_training(run_dir: Path, base_model: str, quantizations: list[str], on_progress: ProgressCallback | None,
                   note: str | None = None, on_stage_done: StageHook | None = None, *, quantize: dict | None = None,
                   pre_tokenizer: str | None = None, evaluate_run: bool = True,
                   system_prompt: str | None = None) -> dict[str, dict]:
    """A trained run carried through merge → quantize → evaluate → modelfile → seal; each stage's result."""
    from forge.evaluate import EvaluateConfig, evaluate
    from forge.merge import MergeConfig, merge
    from forge.modelfile import ModelfileConfig, write_modelfile
    from forge.quantize import QuantizeConfig
    from forge.quantize import quantize as run_quantize
    from forge.runs import load_stages
    from forge.seal import SealConfig, seal

    done = _Recorder(on_stage_done)

    def progress(stage: str) -> ProgressCallback | None:
        return _staged(on_progress, stage)

    adapter_dir = Path(load_stages(run_dir)["train"]["adapter_dir"])
    merged = done("merge", merge(MergeConfig(adapter_dir=adapter_dir, base_model=base_model), progress("merge")))
    quantized = done("quantize", run_quantize(QuantizeConfig.build(
        **{**(quantize or {}), "model_dir": Path(merged["merged_dir"]), "quantizations": quantizations,
           "pre_tokenizer": pre_tokenizer}), progress("quantize")))
    if evaluate_run:
        done("evaluate", evaluate(EvaluateConfig(run_dir=run_dir), progress("evaluate")))
    progress("modelfile")
    done("modelfile", write_modelfile(ModelfileConfig(gguf=Path(quantized["outputs"][-1]["path"]),
                                                      system_prompt=system_prompt)))
    progress("seal")
    done("seal", seal(SealConfig(run_dirs=[run_dir], note=note)))
    return done.results
