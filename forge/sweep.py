"""A hyperparameter sweep: train a few configurations chosen from the size of the data and of the model, score
each on the held-out records (answers matched against their references, eval loss) and on forgetting (Forge's
general set against the base), keep the best within the forgetting budget, and optionally carry it through
merge → quantize → evaluate → Modelfile → seal.

Trials run one at a time here; on a Ray cluster (``FORGE_EXECUTOR=ray``) through Ray Tune, in parallel where
the cluster has room (``forge.sweep_tune``). Each trial is a run dir of its own under ``SWEEP/trials/``; the
winner's run dir records the whole table (``stages/sweep.json``), and so does its seal.

Run: ``forge sweep --base-model M --dataset D [--eval-dataset E] [--trials 4] [--carry-through]``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.forgetting import Budget
from forge.progress import ProgressCallback
from forge.runs import Outcome, record_stage, runs_dir
from forge.workspace import atomic_write_json

MAX_TRIALS = 12
SWEPT = ("learning_rate", "num_train_epochs", "lora_r")
# How each trial moves away from the size-based defaults: (learning-rate factor, epochs factor, rank factor)
MOVES = ((1.0, 1.0, 1.0), (0.5, 1.0, 1.0), (1.0, 0.5, 1.0), (1.0, 1.0, 0.5), (0.5, 1.5, 1.0), (2.0, 1.0, 1.0),
         (1.0, 1.5, 1.0), (0.25, 2.0, 1.0), (0.5, 0.5, 1.0), (1.0, 1.0, 2.0), (2.0, 0.5, 1.0), (0.5, 1.0, 0.5))


class SweepConfig(StageConfig):
    base_model: str = Field(description="Local model dir, GGUF or hub id to fine-tune.")
    dataset: Path = Field(description="JSONL training records.")
    eval_dataset: Path | None = Field(None, description=(
        "JSONL held-out records each trial is scored on (answers matched to their references); default the "
        "dataset's eval split."))
    trials: int = Field(4, ge=1, le=MAX_TRIALS, description="Configurations tried, at most.")
    minutes: float | None = Field(None, gt=0, le=10_080, description=(
        "No trial starts after this many minutes (on Ray, Ray Tune's time budget: trials still running stop too)."))
    min_kept_pct: float = Field(Budget.min_kept_pct, ge=0, le=100, description=(
        "Forgetting budget: general questions the base answered that a trial must still answer, in %."))
    max_prose_ppl_pct: float = Field(Budget.max_prose_ppl_pct, ge=0, le=10_000, description=(
        "Forgetting budget: most a trial's prose perplexity may rise above the base's, in %."))
    carry_through: bool = Field(False, description=(
        "Merge, quantize, evaluate, write the Modelfile and seal the winner."))
    quantizations: list[str] = Field(["Q4_K_M"], description="Quant types for the winner (with carry_through).")
    train: dict[str, Any] = Field(default_factory=dict, description=(
        "Train fields every trial shares (TrainConfig names); one given here is not swept."))
    output_dir: Path | None = Field(None, description="Sweep dir; default $FORGE_HOME/runs/<run_name>.")
    run_name: str | None = Field(None, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 description="Name of the sweep dir under $FORGE_HOME/runs.")

    @property
    def budget(self) -> Budget:
        return Budget(min_kept_pct=self.min_kept_pct, max_prose_ppl_pct=self.max_prose_ppl_pct)

    def sweep_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return runs_dir() / (self.run_name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")


@dataclass
class Trial:
    number: int
    name: str
    values: dict  # the swept hyperparameters
    run_dir: Path

    def row(self) -> dict:
        return {"trial": self.name, **self.values}


class TrialHooks(Protocol):
    """Where a sweep reports each trial: a job per trial (the server), lines on a terminal (the CLI)."""

    def started(self, trial: Trial) -> None: ...

    def progress(self, trial: Trial, event: dict) -> None: ...

    def finished(self, trial: Trial, row: dict, result: dict | None) -> None: ...


def _train_config(config: SweepConfig, values: dict | None = None, run_dir: Path | None = None):
    from forge.train import TrainConfig

    fields = {**config.train, **(values or {}), "base_model": config.base_model, "dataset": config.dataset,
              "output_dir": run_dir or config.sweep_dir() / "trials" / "t0"}
    if config.eval_dataset is not None:
        fields["eval_dataset"] = config.eval_dataset
    return TrainConfig.build(**fields)


def plan(config: SweepConfig) -> list[Trial]:
    """The trials: the size-based defaults first, then moves away from them (a swept value the agent fixed in
    ``train`` stays fixed; configurations that come out the same are tried once)."""
    from forge.train import defaults, training_records

    base = _train_config(config)
    parameters, where = defaults.model_parameters(config.base_model)
    centre = {k: v["value"] for k, v in defaults.choose(training_records(base), parameters, base.method,
                                                        where).items()}
    trials, seen = [], set()
    for lr_f, ep_f, r_f in MOVES:
        values = {"learning_rate": float(f"{centre['learning_rate'] * lr_f:.3g}"),
                  "num_train_epochs": max(1.0, round(centre["num_train_epochs"] * ep_f)),
                  "lora_r": max(4, int(centre["lora_r"] * r_f))}
        values = {k: v for k, v in values.items() if k not in config.train}
        key = tuple(sorted(values.items()))
        if key in seen:
            continue
        seen.add(key)
        number = len(trials) + 1
        name = f"t{number}"
        trials.append(Trial(number, name, values, config.sweep_dir() / "trials" / name))
        if len(trials) == config.trials:
            break
    return trials


def run_trial(config: SweepConfig, trial: Trial, on_progress: ProgressCallback | None = None) -> tuple[dict, dict]:
    """Train one configuration and evaluate it (held-out answers, eval loss, forgetting): its table row and the
    evaluation."""
    from forge.evaluate import EvaluateConfig, evaluate
    from forge.train import train

    trained = train(_train_config(config, trial.values, trial.run_dir), on_progress)
    if trained["status"] != Outcome.SUCCEEDED:
        return {**trial.row(), "status": trained["status"]}, trained
    def evaluating(event: dict) -> None:  # the trial's steps are its training's; evaluating shows as its stage
        if on_progress and event.get("event") == "stage":
            on_progress({"event": "stage", "stage": f"evaluating: {event['stage']}", "evaluating": True})

    evaluating({"event": "stage", "stage": "starting"})
    evaluated = evaluate(EvaluateConfig(run_dir=trial.run_dir, samples=20, tool_turns=0,
                                        min_kept_pct=config.min_kept_pct,
                                        max_prose_ppl_pct=config.max_prose_ppl_pct), evaluating)
    return score_row(trial, trained, evaluated), evaluated


def _final_loss(metrics: dict) -> float | None:
    """The training loss where training ended: the mean of the last three logged steps."""
    last = [p["loss"] for p in (metrics.get("loss_curve") or [])[-3:] if p.get("loss") is not None]
    return round(sum(last) / len(last), 5) if last else metrics.get("train_loss")


def score_row(trial: Trial, trained: dict, evaluated: dict) -> dict:
    learned = (evaluated.get("learned") or {}).get("fine-tuned") or {}
    forgot = (evaluated.get("forgetting") or {}).get("fine-tuned") or {}
    metrics = trained.get("metrics") or {}
    return {**trial.row(), "status": Outcome.SUCCEEDED, "run_dir": str(trial.run_dir),
            "final_loss": _final_loss(metrics), "eval_loss": metrics.get("eval_loss"),
            "learned": learned.get("matched"), "of": learned.get("of"),
            "kept_pct": forgot.get("kept_pct"), "prose_ppl_change_pct": forgot.get("prose_ppl_change_pct"),
            "stopped": forgot.get("stopped"), "within_budget": bool(forgot.get("within_budget"))}


def _rank(row: dict) -> tuple:
    """Better first: within the budget, more held-out answers right, then the lower final training loss (the most
    learning the forgetting budget allows: a firmer fit is what survives quantization; on SmolLM2's facts a trial
    at half the rate answered 6/6 in float and 4/6 in Q4_K_M), then less forgetting."""
    loss = row.get("final_loss")
    return (not row.get("within_budget"), -(row.get("learned") or 0), loss if loss is not None else float("inf"),
            row.get("prose_ppl_change_pct") or 0.0)


def pick(rows: list[dict]) -> tuple[dict | None, str]:
    """The winner and why, in words; None when no trial finished within the forgetting budget."""
    done = [r for r in rows if r.get("status") == Outcome.SUCCEEDED]
    if not done:
        return None, "no trial finished"
    best = min(done, key=_rank)
    if not best["within_budget"]:
        return None, (f"every finished trial lost ground on the general set beyond the budget; the one that forgot "
                      f"least is {min(done, key=lambda r: r.get('prose_ppl_change_pct') or 0)['trial']}: lower "
                      "learning_rate or num_train_epochs in train, or mix general records into the dataset")
    loss = f", final training loss {best['final_loss']:.3g}" if best.get("final_loss") is not None else ""
    return best, (f"{best['trial']}: {best['learned']}/{best['of']} held-out answers right, within the forgetting "
                  f"budget (general questions kept {best['kept_pct']:g}%, prose perplexity "
                  f"{best['prose_ppl_change_pct']:+g}%){loss}")


def run_sweep(config: SweepConfig, hooks: TrialHooks, on_progress: ProgressCallback | None = None) -> dict:
    """Every trial (here one at a time, or through Ray Tune on a Ray cluster), the winner, and with
    carry_through the winner's merge → … → seal."""
    import os

    config = config.model_copy(update={"output_dir": config.sweep_dir()})  # named once: every trial under it
    trials = plan(config)
    sweep_dir = config.sweep_dir()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / "sweep_config.json", config.model_dump(mode="json"))
    if os.environ.get("FORGE_EXECUTOR") == "ray":
        from forge.sweep_tune import tune_trials

        rows = tune_trials(config, trials, hooks, run_trial)
    else:
        rows = _local_trials(config, trials, hooks, on_progress)
    if any(r["status"] == Outcome.CANCELLED for r in rows):
        result = {"status": Outcome.CANCELLED, "run_dir": str(sweep_dir), "trials": rows}
        atomic_write_json(sweep_dir / "sweep.json", result)
        return result
    winner, why = pick(rows)
    result = {"status": Outcome.SUCCEEDED, "run_dir": str(sweep_dir), "trials": rows,
              "winner": winner["trial"] if winner else None, "winner_run_dir": winner["run_dir"] if winner else None,
              "why": why, "budget": {"min_kept_pct": config.min_kept_pct,
                                     "max_prose_ppl_pct": config.max_prose_ppl_pct},
              "config": config.model_dump(mode="json"), "warnings": _warnings(winner, why)}
    if winner:
        record_stage(Path(winner["run_dir"]), "sweep", result)
        if config.carry_through:
            from forge.pipeline import after_training

            result["stages"] = after_training(Path(winner["run_dir"]), config.base_model, config.quantizations,
                                              on_progress, note=f"winner of sweep {sweep_dir.name}: {why}")
            result["warnings"] += _quantized_lost(result["stages"].get("evaluate") or {}, winner)
    atomic_write_json(sweep_dir / "sweep.json", result)
    return result


def _warnings(winner: dict | None, why: str) -> list[str]:
    if winner is None:
        return [f"sweep: {why}"]
    if not winner.get("learned"):
        return [f"sweep: no trial answered a held-out record right ({winner['trial']} won on final training loss): "
                "train longer or at a higher learning_rate (give them in train), or check the eval records' answers"]
    return []


def _quantized_lost(evaluated: dict, winner: dict) -> list[str]:
    """The winner's GGUFs that answer fewer held-out records right than its float weights did."""
    learned = evaluated.get("learned") or {}
    tuned = (learned.get("fine-tuned") or {}).get("matched")
    return [f"sweep: the winner's {who} answers {t['matched']}/{t['of']} held-out records right where its float "
            f"weights answer {tuned}/{t['of']}: quantization cost what it learned; quantize it again at a larger "
            "type (Q5_K_M, Q8_0) or try the runner-up" for who, t in learned.items()
            if who.endswith("GGUF") and tuned is not None and t["matched"] < tuned]


def _local_trials(config: SweepConfig, trials: list[Trial], hooks: TrialHooks,
                  on_progress: ProgressCallback | None) -> list[dict]:
    rows, started, stopped = [], time.monotonic(), False
    for trial in trials:
        why = ("the sweep was cancelled" if stopped else f"the {config.minutes:g}-minute budget ran out"
               if config.minutes and time.monotonic() - started > 60 * config.minutes else None)
        if why:
            rows.append({**trial.row(), "status": "skipped", "why": why})
            hooks.finished(trial, rows[-1], None)
            continue
        hooks.started(trial)
        if on_progress:
            on_progress({"event": "stage", "stage": f"trial {trial.name}", "step": trial.number - 1,
                         "total_steps": len(trials)})
        try:
            row, result = run_trial(config, trial, lambda event, t=trial: hooks.progress(t, event))
        except Exception as exc:  # noqa: BLE001 - one trial's failure (a bad config, memory) is its row; a cancel is not
            from forge.failures import error_from

            logging.getLogger("forge.sweep").exception("trial %s failed", trial.name)  # the traceback: the log's
            row, result = {**trial.row(), "status": Outcome.FAILED, "error": error_from(exc).to_dict()}, None
        rows.append(row)
        hooks.finished(trial, row, result)
        stopped = row["status"] == Outcome.CANCELLED  # a cancel stopped this trial's training: no trial after it
    return rows


def check_plan(config: SweepConfig) -> list[Trial]:
    """Refuse a sweep that cannot run before it queues: its trials' train configs are checked now."""
    if all(k in config.train for k in SWEPT):
        raise ForgeError(Codes.INVALID_ARGUMENT, f"the sweep has nothing to vary: train fixes {', '.join(SWEPT)}",
                         "leave learning_rate, num_train_epochs or lora_r out of train so they can be swept, or "
                         "train once with forge_train")
    from forge.data import load_dataset
    from forge.train import check_plan as check_steps

    trials = plan(config)
    records = None
    for trial in trials:  # each trial's fields, and its steps against FORGE_MAX_TRAIN_STEPS
        train_config = _train_config(config, trial.values, trial.run_dir)
        records = records or load_dataset(train_config.dataset, train_config.dataset_format).conversations
        check_steps(train_config, records)
    return trials


class PrintedHooks:
    """The CLI's hooks: a line when each trial starts and ends."""

    def __init__(self, echo):
        self.echo = echo

    def started(self, trial: Trial) -> None:
        self.echo(f"trial {trial.name}: " + ", ".join(f"{k}={v:g}" for k, v in trial.values.items()))

    def progress(self, trial: Trial, event: dict) -> None:
        if event.get("event") == "stage":
            self.echo(f"  {trial.name}: {event['stage']}")

    def finished(self, trial: Trial, row: dict, result: dict | None) -> None:
        shown = {k: row.get(k) for k in ("status", "learned", "of", "kept_pct", "prose_ppl_change_pct",
                                         "within_budget") if row.get(k) is not None}
        self.echo(f"trial {trial.name} done: {shown}")
