"""What a fine-tune kept of what its base could do, measured on the general set Forge ships
(``forge.general_set``): each model answers the everyday questions greedily (scored against the accepted
answers: exact / normalised / contains), and scores the plain prose (perplexity over every token, no chat
template). A model is compared with the base on the same questions and the same token ids:

- kept: the share of the questions the base answered that are still answered;
- stopped: the share of answers that ended with the model's own end-of-turn token;
- prose perplexity, and its change against the base.

A model past the budget (``Budget``) is flagged, in words an agent can act on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from forge import answer_score, general_set

MAX_NEW_TOKENS = 24  # the reference answers are a word or two; a model that does not stop shows it within this


@dataclass(frozen=True)
class Budget:
    """How much ground a fine-tune may lose on the general set, against its base."""

    min_kept_pct: float = 75.0  # of the questions the base answered, at least this share still answered
    max_prose_ppl_pct: float = 50.0  # prose perplexity at most this much above the base's
    max_stop_drop: int = 2  # at most this many fewer answers ending on their own


def prompts(system_prompt: str | None = None) -> list[list[dict]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [[*system, {"role": "user", "content": q}] for q, _ in general_set.QUESTIONS]


def prose_ids(tokenizer) -> list[list[int]]:
    """The prose as the model's tokenizer splits it, without special tokens (the same ids for every model)."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in general_set.PROSE]


def hf_generate(model, tokenizer, convs: list[list[dict]], stops: list[int], max_new: int) -> list[dict]:
    """Greedy answers of a transformers model, batched with left padding."""
    import torch

    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        new = row if end is None else row[:end + 1]
        answers.append({"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "stopped": end is not None,
                        "tokens": len(new)})
    return answers


def hf_prose_nll(model, ids: list[list[int]]) -> tuple[float, int]:
    """Summed negative log-likelihood of every prose token after each paragraph's first, and their count."""
    import torch

    device = next(model.parameters()).device
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(torch.tensor([row], device=device)).logits[0, :-1].float()
            targets = torch.tensor(row[1:], device=device)
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            n += len(row) - 1
    return nll, n


def hf_measure(model, tokenizer, stops: list[int], system_prompt: str | None = None) -> dict:
    answers = hf_generate(model, tokenizer, prompts(system_prompt), stops, MAX_NEW_TOKENS)
    nll, n = hf_prose_nll(model, prose_ids(tokenizer))
    return {"answers": answers, "prose_nll": nll, "prose_tokens": n}


def gguf_generate(path: Path, convs: list[list[dict]], max_new: int) -> list[dict]:
    """Greedy answers of a GGUF through llama.cpp and its chat template, the file loaded once for them all."""
    from forge.query import loaded, query

    answers, chat = [], loaded(Path(path))
    try:
        for conv in convs:
            reply = query(Path(path), conv, max_tokens=max_new, llm=chat)
            answers.append({"text": reply["reply"].strip(), "stopped": reply["finish_reason"] == "stop",
                            "tokens": reply["completion_tokens"]})
    finally:
        chat.close()
    return answers


def gguf_measure(path: Path, tokenizer, system_prompt: str | None = None) -> dict:
    """The same measure on a GGUF through llama.cpp: its chat template for the questions, and the transformers
    tokenizer's ids for the prose (so every row scores the very same tokens)."""
    from forge.quant_quality import _load, log_softmax

    answers = gguf_generate(Path(path), prompts(system_prompt), MAX_NEW_TOKENS)
    ids = prose_ids(tokenizer)
    llm = _load(Path(path), max(len(r) for r in ids) + 8)
    nll, n = 0.0, 0
    try:
        for row in ids:
            llm.reset()
            llm.eval(row)
            log_probs = log_softmax(llm.scores[: len(row) - 1])
            nll -= float(sum(log_probs[t - 1, row[t]] for t in range(1, len(row))))
            n += len(row) - 1
    finally:
        llm.close()
    return {"answers": answers, "prose_nll": nll, "prose_tokens": n}


def _scores(measured: dict) -> list[str | None]:
    return [answer_score.match(a["text"], refs) for a, (_, refs) in zip(measured["answers"], general_set.QUESTIONS,
                                                                          strict=True)]


def compare(base: dict, model: dict, budget: Budget = Budget()) -> dict:
    """A model against the base on the general set: what it kept, and whether that is within the budget."""
    base_found, found = _scores(base), _scores(model)
    answered = [i for i, f in enumerate(base_found) if f]
    kept = [i for i in answered if found[i]]  # still answered (how exactly it was worded does not count)
    kept_pct = round(100.0 * len(kept) / len(answered), 1) if answered else 100.0
    ppl = math.exp(model["prose_nll"] / max(model["prose_tokens"], 1))
    base_ppl = math.exp(base["prose_nll"] / max(base["prose_tokens"], 1))
    ppl_pct = round(100.0 * (ppl / base_ppl - 1), 1)
    stopped = sum(a["stopped"] for a in model["answers"])
    base_stopped = sum(a["stopped"] for a in base["answers"])
    problems = []
    if kept_pct < budget.min_kept_pct:
        lost = [general_set.QUESTIONS[i][0] for i in answered if i not in kept]
        problems.append(f"answers {len(kept)} of the {len(answered)} general questions the base answered "
                        f"({kept_pct:g}% < {budget.min_kept_pct:g}%), e.g. lost {lost[0]!r}")
    if ppl_pct > budget.max_prose_ppl_pct:
        problems.append(f"prose perplexity {ppl:.2f} is {ppl_pct:g}% above the base's {base_ppl:.2f} "
                        f"(budget {budget.max_prose_ppl_pct:g}%)")
    if base_stopped - stopped > budget.max_stop_drop:
        problems.append(f"{stopped} of {len(model['answers'])} general answers end on their own, the base "
                        f"{base_stopped}")
    n = len(general_set.QUESTIONS)
    return {"general_answered": sum(1 for f in found if f), "base_answered": len(answered), "of": n,
            "kept_pct": kept_pct, "stopped": f"{stopped}/{n}", "base_stopped": f"{base_stopped}/{n}",
            "prose_ppl": round(ppl, 3), "base_prose_ppl": round(base_ppl, 3), "prose_ppl_change_pct": ppl_pct,
            "within_budget": not problems, "problems": problems}


def verdict(compared: dict, who: str = "the fine-tuned model") -> str | None:
    """One line an agent acts on, or None within budget."""
    if compared["within_budget"]:
        return None
    return (f"forgetting: {who} {'; '.join(compared['problems'])}. Lower learning_rate or num_train_epochs "
            "(or lora_r), or mix general records into the dataset, and train again; forge_sweep searches "
            "within the budget")
