"""What a finished run measured: final evals, losses, throughput, memory and preference rewards."""

from __future__ import annotations

from pathlib import Path

from forge.train.callbacks import preference_figures
from forge.train.memory import MemoryPlan


def final_evals(trainer, eval_set) -> list[dict]:
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if eval_set is not None and not (evals and evals[-1]["step"] == trainer.state.global_step):
        trainer.evaluate()  # the last epoch-end eval did not land on the final step
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    return evals


def train_metrics(trainer, result, evals: list[dict], duration: float, world: int, plan: MemoryPlan, liger: bool,
             resume_from: Path | None) -> dict:
    from forge.hardware import peak_memory_bytes

    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    peak = peak_memory_bytes()
    tokens = trainer.real_tokens
    return {
        "final_epoch": round(trainer.state.epoch or 0.0, 4),
        "global_step": trainer.state.global_step,
        "duration_s": round(duration, 2),
        "train_loss": result.training_loss,
        "last_logged_loss": train_losses[-1] if train_losses else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "samples_per_s": result.metrics.get("train_samples_per_second"),
        "steps_per_s": result.metrics.get("train_steps_per_second"),
        "tokens_per_s": round(tokens["tokens"] / max(duration, 1e-9), 2),
        "real_tokens": tokens["tokens"],
        "slot_share": round(tokens["tokens"] / max(tokens.get("slots", 0), 1), 4),
        "peak_memory_bytes": peak["bytes"], "peak_memory_kind": peak["kind"],
        "resumed_from": str(resume_from) if resume_from else None,
        "world_size": world,
        "memory_plan": plan.memory_plan, "liger_kernel": liger,
        "preference": _preference_metrics(history, evals),
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_curve": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in evals],
    }


def _preference_metrics(history: list[dict], evals: list[dict]) -> dict | None:
    """Reward figures at the first and last logged step, and on the eval split at the end (dpo, orpo)."""
    logged = [h for h in history if "rewards/accuracies" in h]
    if not logged:
        return None
    out = {"first": preference_figures(logged[0]), "last": preference_figures(logged[-1])}
    if evals and "eval_rewards/accuracies" in evals[-1]:
        out["eval"] = preference_figures(evals[-1], "eval_")
    return out
