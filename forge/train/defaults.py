"""Hyperparameters an agent did not give, chosen from the size of the data and of the model, each with why.

A few dozen records teach little in one pass at a large model's learning rate: small datasets get more
epochs, small models a higher learning rate. The rules were checked on SmolLM2-135M-Instruct learning six
made-up facts from 24 records: they learn the held-out phrasings and stay within
the forgetting budget on Forge's general set (tests/test_learn_and_keep.py). Preference methods (dpo, orpo)
keep the usual LoRA values. A resumed run keeps the values its first start chose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHOSEN = ("num_train_epochs", "learning_rate", "lora_r")
# (records at most, epochs): passes over the data by the number of training records
EPOCHS = ((32, 12.0), (100, 8.0), (500, 4.0), (2_000, 3.0), (10_000, 2.0))
# (parameters at most, learning rate): smaller models take larger steps
RATES = ((500e6, 3e-4), (15e9, 2e-4))
LARGE_RATE, UNKNOWN_RATE = 1e-4, 2e-4
PREFERENCE = {"num_train_epochs": 1.0, "learning_rate": 5e-5, "lora_r": 16}
_SIZE_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([MB])(?![a-z])", re.IGNORECASE)


def model_parameters(base_model: str) -> tuple[int | None, str]:
    """The base model's parameter count and where it was read: its config.json, its GGUF's tensors, or the
    size in a hub id's name ("SmolLM2-135M", "Qwen2.5-7B"); None when none of these tells."""
    path = Path(str(base_model))
    try:
        if path.is_dir() and (path / "config.json").is_file():
            from forge.planner import ModelShape

            shape = ModelShape.from_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
            return shape.layer_params() + shape.embedding_params() // 2, "config.json"
        if path.is_file() and path.suffix == ".gguf":
            from gguf import GGUFReader

            return int(sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)), "the GGUF's tensors"
    except (OSError, ValueError, KeyError, TypeError):
        return None, "unreadable"
    found = _SIZE_IN_NAME.search(path.name)
    if found:
        scale = 1e6 if found.group(2).upper() == "M" else 1e9
        return int(float(found.group(1)) * scale), "the model's name"
    return None, "unknown"


def choose(records: int, parameters: int | None, method: str = "lora", where: str = "") -> dict[str, dict]:
    """Each chosen value with the reason, e.g. {"learning_rate": {"value": 1e-3, "why": "..."}}."""
    if method in ("dpo", "orpo"):
        why = f"{method}: the usual LoRA preference values"
        return {k: {"value": v, "why": why} for k, v in PREFERENCE.items()}
    epochs = next((e for limit, e in EPOCHS if records <= limit), 1.0)
    out = {"num_train_epochs": {"value": epochs, "why": f"{records} training records: {epochs:g} passes"}}
    if parameters is None:
        out["learning_rate"] = {"value": UNKNOWN_RATE, "why": "model size unknown: the common LoRA rate"}
    else:
        rate = next((r for limit, r in RATES if parameters <= limit), LARGE_RATE)
        size = f"{parameters / 1e9:.2g}B" if parameters >= 1e9 else f"{parameters / 1e6:.3g}M"
        out["learning_rate"] = {"value": rate, "why": f"{size} parameters, read from {where}: {rate:g}"}
    out["lora_r"] = {"value": 16 if records <= 10_000 else 32,
                     "why": f"{records} training records: rank {16 if records <= 10_000 else 32}"}
    return out


def inherited(config):
    """A resumed run keeps what its first start chose: the hyperparameters left unset are taken from the run's
    train_config.json (resolved there), never chosen again from sizes that may have changed since."""
    from forge.runs import TRAIN_CONFIG_FILE

    if not config.resume:
        return config
    path = Path(config.run_dir()) / TRAIN_CONFIG_FILE
    try:
        first = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        first = {}
    updates = {k: first[k] for k in (*CHOSEN, "lora_alpha") if getattr(config, k) is None and first.get(k)}
    return config.model_copy(update=updates) if updates else config


def apply(config, records: int):
    """The config with every hyperparameter left unset filled in, and what was chosen (empty when the agent set
    them all). ``records`` counts the training records (after the eval split)."""
    missing = [k for k in CHOSEN if getattr(config, k) is None]
    chosen = {}
    if missing:
        parameters, where = model_parameters(config.base_model)
        chosen = {k: v for k, v in choose(records, parameters, config.method, where).items() if k in missing}
    updates = {k: v["value"] for k, v in chosen.items()}
    if config.lora_alpha is None:
        updates["lora_alpha"] = 2 * updates.get("lora_r", config.lora_r)
    return config.model_copy(update=updates), chosen
