"""The whole chain in one call: train → merge → quantize → modelfile → seal, in one run dir."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from forge.config import StageConfig
from forge.progress import ProgressCallback

STAGES = ("train", "merge", "quantize", "modelfile", "seal")


class PipelineConfig(StageConfig):
    base_model: str = Field(description="Local model dir or hub id to fine-tune.")
    dataset: Path = Field(description="JSONL dataset.")
    method: Literal["lora", "qlora"] = Field("lora", description="lora or qlora.")
    output_dir: Path | None = Field(None, description="Run dir; default $FORGE_HOME/runs/<output_name>.")
    output_name: str | None = Field(None, description="Run name under $FORGE_HOME/runs.")
    quantizations: list[str] = Field(["Q4_K_M"], description="llama.cpp quant types to make.")
    system_prompt: str | None = Field(None, description="System prompt for training records and the Modelfile.")
    pre_tokenizer: str | None = Field(None, description="llama.cpp pre-tokenizer fallback for unknown tokenizers.")
    train: dict[str, Any] = Field(default_factory=dict, description="Extra train fields (TrainConfig names).")
    note: str | None = Field(None, description="A note kept in the seal.")


StageHook = Callable[[str, dict], None]


def run_pipeline(config: PipelineConfig, on_progress: ProgressCallback | None = None,
                 on_stage_done: StageHook | None = None) -> dict:
    from forge.merge import MergeConfig, merge
    from forge.modelfile import ModelfileConfig, write_modelfile
    from forge.quantize import QuantizeConfig, quantize
    from forge.seal import SealConfig, seal
    from forge.train import TrainConfig, train

    results: dict[str, dict] = {}

    def done(stage: str, result: dict) -> dict:
        results[stage] = result
        if on_stage_done:
            on_stage_done(stage, result)
        return result

    def progress(stage: str):
        if on_progress is None:
            return None
        on_progress({"event": "stage", "stage": "starting", "pipeline_stage": stage})
        return lambda event: on_progress({"pipeline_stage": stage, **event})

    train_cfg = TrainConfig.build(
        **{**config.train, "base_model": config.base_model, "dataset": config.dataset, "method": config.method,
           "output_dir": config.output_dir, "output_name": config.output_name,
           "system_prompt": config.system_prompt})
    trained = done("train", train(train_cfg, progress("train")))
    if trained["status"] != "succeeded":
        return {"status": trained["status"], "stages": results, "run_dir": trained["run_dir"]}
    run_dir = Path(trained["run_dir"])
    merged = done("merge", merge(MergeConfig(adapter_dir=Path(trained["adapter_dir"]),
                                             base_model=config.base_model), progress("merge")))
    quantized = done("quantize", quantize(QuantizeConfig(model_dir=Path(merged["merged_dir"]),
                                                         quantizations=config.quantizations,
                                                         pre_tokenizer=config.pre_tokenizer), progress("quantize")))
    progress("modelfile")
    done("modelfile", write_modelfile(ModelfileConfig(gguf=Path(quantized["outputs"][-1]["path"]),
                                                      system_prompt=config.system_prompt)))
    progress("seal")
    done("seal", seal(SealConfig(run_dirs=[run_dir], note=config.note)))
    return {"status": "succeeded", "run_dir": str(run_dir), "stages": results}
