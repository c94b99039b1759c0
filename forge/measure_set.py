"""What a run is measured on, shared by evaluate and quantize so their numbers line up.

The records are the run's eval split (without one, its training records), or a file given; the tokens scored
are the answer tokens training put in the loss (end-of-turn token included), cut at the run's max_length.
``basis`` names them, so every number measured on them can say what it was measured on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.paths import read_text
from forge.runs import TRAIN_CONFIG_FILE, train_config_in_effect

DEFAULT_RECORDS = 32


@dataclass
class Scored:
    """Token ids and the positions in the loss, per record, and what they are."""

    ids: list[list[int]]
    masks: list[list[int]]
    basis: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(sum(m[1:]) for m in self.masks)

    @property
    def positions(self) -> int:
        """Positions a next-token distribution is compared at: every token after each record's first."""
        return sum(max(len(ids) - 1, 0) for ids in self.ids)


def train_config(run_dir: Path) -> dict:
    """The config the run's adapter was last trained with (a resume's own, when it was resumed)."""
    path = train_config_in_effect(Path(run_dir))
    if not path.is_file():
        raise ForgeError(Codes.RUN_NOT_FOUND, f"{run_dir} holds no {TRAIN_CONFIG_FILE}, so it is not a trained run",
                         "pass a run dir forge train (or forge pipeline) wrote")
    return json.loads(read_text(path, "train config"))


def _run_dataset(train_cfg: dict):
    from forge import data

    return data.load_dataset(train_cfg["dataset"], train_cfg.get("dataset_format", "auto"),
                             train_cfg.get("system_prompt"))


def conversations(train_cfg: dict, dataset: Path | None = None, max_records: int = DEFAULT_RECORDS,
                  trained_sha256: str | None = None) -> tuple[list, dict, list[str]]:
    """The records to measure on, where they came from (and how they relate to the training records), and
    warnings."""
    from forge import data

    warnings = []
    held_out = dataset if dataset is not None else train_cfg.get("eval_dataset")
    if held_out is not None:
        given = data.load_dataset(held_out, system_prompt=train_cfg.get("system_prompt"))
        kind = "file" if dataset is not None else "eval dataset"
        convs, source = given.conversations, {"kind": kind, "path": str(given.path), "sha256": given.sha256}
        train = _trained_records(train_cfg, whole=dataset is None)
    else:
        ds = _run_dataset(train_cfg)
        train, evals = data.split(ds.conversations, train_cfg.get("eval_fraction", 0.1), train_cfg.get("seed", 42))
        convs = evals or train
        source = {"kind": "eval split" if evals else "training records", "path": str(ds.path), "sha256": ds.sha256}
        if not evals:
            warnings.append("the run held out no eval split (eval_fraction=0): measured on training records, "
                            "which shows fit, not generalization; pass dataset= to measure on held-out records")
        if trained_sha256 and trained_sha256 != ds.sha256:
            warnings.append(f"{ds.path} changed since training (sha256 {trained_sha256[:12]}… then, "
                            f"{ds.sha256[:12]}… now): the split is not the one held out")
    source["records"] = min(len(convs), max_records)
    if source["kind"] != "training records" and train is not None:
        source["held_out"] = held_out_kind(convs[:max_records], train)
    return convs[:max_records], source, warnings


def _trained_records(train_cfg: dict, whole: bool) -> list | None:
    """The records the run trained on (all of its dataset when an eval file was given to training), or None when
    its dataset can no longer be read: a file measured on does not need it."""
    from forge import data

    try:
        ds = _run_dataset(train_cfg)
    except (ForgeError, OSError):
        return None
    if whole:
        return ds.conversations
    return data.split(ds.conversations, train_cfg.get("eval_fraction", 0.1), train_cfg.get("seed", 42))[0]


def held_out_kind(evals: list, train: list) -> dict:
    """What the eval records test, said plainly: groups no training record has, or paraphrases (an eval answer
    that a training answer holds, word for word once normalised), or records unlike any trained answer."""
    from forge.answer_score import words

    def answer(conv) -> str:
        return next((m.get("content") or "" for m in reversed(conv) if m["role"] == "assistant"), "")

    trained = {f" {' '.join(words(answer(c)))} " for c in train}  # each normalised once; a set for the scan
    refs = [" ".join(words(answer(c))) for c in evals]
    shared = sum(1 for ref in refs if ref and any(f" {ref} " in t for t in trained))
    groups = {getattr(c, "group", None) for c in train} - {None}
    if any(getattr(c, "group", None) for c in evals):
        unseen = sum(1 for c in evals if getattr(c, "group", None) not in groups)
        text = f"{unseen} of {len(evals)} eval records belong to groups no training record has"
    elif shared:
        text = (f"{shared} of {len(evals)} eval records are paraphrases of training records (a training answer "
                "holds theirs): they test recall in new words, not what was never taught; mark groups "
                "(\"group\" in each record) to hold whole facts out")
    else:
        text = f"none of the {len(evals)} eval records shares its answer with a training record"
    return {"paraphrases": shared, "of": len(evals), "text": text}


def training_split(train_cfg: dict) -> list:
    """The records the run trained on (its eval split left out): calibration data for an importance matrix."""
    from forge import data

    train, _ = data.split(_run_dataset(train_cfg).conversations, train_cfg.get("eval_fraction", 0.1),
                          train_cfg.get("seed", 42))
    return train


def score_set(tokenizer, convs: list, max_length: int, source: dict | None = None) -> Scored:
    from forge.tokens import tokenize_all

    tokens = tokenize_all(tokenizer, convs)
    scored = Scored([i[:max_length] for i in tokens.input_ids], [m[:max_length] for m in tokens.assistant_masks])
    source = source or {}
    scored.basis = {"tokens": scored.tokens, "positions": scored.positions, "records": len(convs),
                    "kind": source.get("kind"), "path": source.get("path"), "sha256": source.get("sha256")}
    name = f" ({Path(source['path']).name})" if source.get("path") else ""
    kind = source.get("kind") or "measure set"
    records = f"{len(convs)} {kind}" + ("" if kind.endswith("records") else " records")
    scored.basis["text"] = (f"KLD and same top token over {scored.positions} positions of {records}{name}; "
                            f"perplexity over their {scored.tokens} answer tokens")
    return scored


def run_measure_set(run_dir: Path, tokenizer, dataset: Path | None = None,
                    max_records: int = DEFAULT_RECORDS) -> tuple[Scored, list[str]]:
    """A run's measure set, read from its train config (what evaluate scores by default)."""
    from forge.runs import load_stages

    train_cfg = train_config(run_dir)
    trained = load_stages(run_dir).get("train") or {}
    recorded = (trained.get("dataset") or {}).get("sha256")
    convs, source, warnings = conversations(train_cfg, dataset, max_records, recorded)
    return score_set(tokenizer, convs, train_cfg.get("max_length", 1024), source), warnings
