"""Evaluation: what the fine-tune gained, and what each quantization cost, measured on the same tokens.

On the run's eval split (or a file given), the base model, the fine-tuned model (base + adapter) and every
GGUF the run made (through llama.cpp) score the same token ids; the loss is the mean negative
log-likelihood of the answer tokens (the tokens training put in the loss, end-of-turn token included), and
perplexity is its exponential. Then a few eval prompts are answered greedily by the base model and by the
most quantized GGUF, side by side with the answer in the data, each marked with whether it stopped on its
own: the "never stops in Ollama" failure shows here before anyone runs Ollama.

Run: ``forge eval --run-dir RUN``; the result is kept in ``RUN/stages/evaluate.json`` and sealed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from forge import tool_eval
from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import check_input_dir, checked, read_text
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import PROGRESS_FILE, TRAIN_CONFIG_FILE, Outcome, load_stages, record_stage


class EvaluateConfig(StageConfig):
    run_dir: Path = Field(description="A run dir after training; its GGUFs are measured once it is quantized.")
    dataset: Path | None = Field(None, description=(
        "JSONL records to measure on; default the run's eval split (without one, its training records)."))
    max_records: int = Field(32, ge=1, le=1000, description="Records measured, at most.")
    samples: int = Field(3, ge=0, le=20, description="Eval prompts answered by the base and the quantized model.")
    max_new_tokens: int = Field(64, ge=1, le=1024, description="Tokens per sample answer, at most.")
    tool_turns: int = Field(16, ge=0, le=200, description=(
        "For records with tools: assistant turns asked of each model to measure tool-call accuracy, at most."))


@dataclass
class Scored:
    """Token ids and the positions in the loss, per record."""

    ids: list[list[int]]
    masks: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(sum(m[1:]) for m in self.masks)


def _nll(logits, ids: list[int], mask: list[int]) -> float:
    """Summed negative log-likelihood of the masked tokens, given each position's logits (numpy, n × vocab)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_norm = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[:, 0]
    picked = [t for t in range(1, len(ids)) if mask[t]]
    return float(sum(log_norm[t - 1] - logits[t - 1, ids[t]] for t in picked))


def _row(model: str, nll: float, tokens: int, **extra) -> dict:
    loss = nll / max(tokens, 1)
    return {"model": model, "loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 700)), 4),
            "tokens": tokens, **extra}


# ---- what to measure on ----

def _train_config(run_dir: Path) -> dict:
    path = run_dir / TRAIN_CONFIG_FILE
    if not path.is_file():
        raise ForgeError(Codes.RUN_NOT_FOUND, f"{run_dir} holds no {TRAIN_CONFIG_FILE}, so it is not a trained run",
                         "pass a run dir forge train (or forge pipeline) wrote")
    return json.loads(read_text(path, "train config"))


def _conversations(config: EvaluateConfig, train_cfg: dict, trained: dict) -> tuple[list, dict, list[str]]:
    """The records to measure on, where they came from, and warnings."""
    from forge import data

    warnings = []
    if config.dataset is not None:
        ds = data.load_dataset(config.dataset, system_prompt=train_cfg.get("system_prompt"))
        convs, source = ds.conversations, {"kind": "file", "path": str(ds.path), "sha256": ds.sha256}
    else:
        ds = data.load_dataset(train_cfg["dataset"], train_cfg.get("dataset_format", "auto"),
                               train_cfg.get("system_prompt"))
        train, evals = data.split(ds.conversations, train_cfg.get("eval_fraction", 0.1), train_cfg.get("seed", 42))
        convs = evals or train
        source = {"kind": "eval split" if evals else "training records", "path": str(ds.path), "sha256": ds.sha256}
        if not evals:
            warnings.append("the run held out no eval split (eval_fraction=0): measured on training records, "
                            "which shows fit, not generalization; pass dataset= to measure on held-out records")
        recorded = (trained.get("dataset") or {}).get("sha256")
        if recorded and recorded != ds.sha256:
            warnings.append(f"{ds.path} changed since training (sha256 {recorded[:12]}… then, {ds.sha256[:12]}… "
                            "now): the split is not the one held out")
    source["records"] = min(len(convs), config.max_records)
    return convs[:config.max_records], source, warnings


def _score_set(tokenizer, convs: list, max_length: int) -> Scored:
    from forge.tokens import tokenize_all

    tokens = tokenize_all(tokenizer, convs)
    return Scored([i[:max_length] for i in tokens.input_ids], [m[:max_length] for m in tokens.assistant_masks])


# ---- the models ----

def _prompt(conv: list[dict]) -> list[dict]:
    """A conversation up to its last answer: what the model is asked."""
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    return conv[:last]


def _hf_part(base_ref: str, adapter_dir: Path, scored: Scored, prompts: list, tokenizer, max_new: int,
             tool_cases: list) -> dict:
    """Base and fine-tuned (base + adapter, the adapter switched off for the base) scores, the base
    model's greedy answers to the sample prompts, and both models' replies to the tool-call turns."""
    import torch
    from peft import PeftModel

    from forge.merge import load_base

    on_cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_cuda else torch.float32
    device = "cuda" if on_cuda else "cpu"
    model = PeftModel.from_pretrained(load_base(base_ref, adapter_dir, dtype=dtype), str(adapter_dir)).to(device)
    model.eval()

    def nll_sum(scoring) -> float:
        with torch.no_grad():
            return sum(_nll(scoring(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy(), ids, mask)
                       for ids, mask in zip(scored.ids, scored.masks, strict=True))

    tuned = nll_sum(model)
    stops = {i for i in [tokenizer.eos_token_id, *_list(model.generation_config.eos_token_id)] if i is not None}
    tools = {"fine-tuned": tool_eval.hf_answers(model, tokenizer, tool_cases, max_new, sorted(stops))}
    with model.disable_adapter():
        base = nll_sum(model)
        tools["base"] = tool_eval.hf_answers(model, tokenizer, tool_cases, max_new, sorted(stops))
        answers = []
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")["input_ids"].to(device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                     do_sample=False, eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            stopped = bool(new) and new[-1] in stops
            answers.append({"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "stopped": stopped,
                            "tokens": len(new)})
    del model
    return {"base": base, "fine-tuned": tuned, "answers": answers, "tools": tools}


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def _gguf_nll(path: Path, scored: Scored) -> float:
    from forge.quantize import load_llama

    llm = load_llama(path, n_ctx=max(len(i) for i in scored.ids) + 8, logits_all=True)
    total = 0.0
    for ids, mask in zip(scored.ids, scored.masks, strict=True):
        llm.reset()
        llm.eval(ids)
        total += _nll(llm.scores[: len(ids)], ids, mask)
    return total


def _gguf_answers(path: Path, prompts: list, max_new: int) -> list[dict]:
    from forge.query import query

    out = []
    for prompt in prompts:
        reply = query(path, prompt, max_tokens=max_new)
        out.append({"text": reply["reply"].strip(), "stopped": reply["finish_reason"] == "stop",
                    "tokens": reply["completion_tokens"]})
    return out


def _table(hf: dict, ggufs: list[tuple[str, str, float]], tokens: int) -> list[dict]:
    """One row per model; the fine-tuned row says what it gained over the base, each GGUF what it lost."""
    base = _row("base", hf["base"], tokens)
    tuned = _row("fine-tuned", hf["fine-tuned"], tokens)
    tuned["vs_base_pct"] = round(100 * (tuned["perplexity"] / base["perplexity"] - 1), 2)
    rows = [base, tuned]
    for quant, path, nll in ggufs:
        row = _row(f"{quant} GGUF", nll, tokens, path=path)
        row["vs_fine_tuned_pct"] = round(100 * (row["perplexity"] / tuned["perplexity"] - 1), 2)
        rows.append(row)
    return rows


def evaluate(config: EvaluateConfig, on_progress: ProgressCallback | None = None) -> dict:
    """Measure a run; return (and record in the run dir) the table, the sample answers and warnings."""
    from transformers import AutoTokenizer

    run_dir = check_input_dir(Path(config.run_dir), "run dir")
    train_cfg, stages = _train_config(run_dir), load_stages(run_dir)
    trained = stages.get("train")
    if not trained or trained.get("status", Outcome.SUCCEEDED) != Outcome.SUCCEEDED:
        raise ForgeError(Codes.RUN_NOT_FOUND, f"{run_dir} has no finished training to evaluate",
                         "finish (or resume) training first")
    writer = ProgressWriter(run_dir / PROGRESS_FILE, on_progress)
    adapter_dir = check_input_dir(trained["adapter_dir"], "adapter dir")
    ggufs = [(o["quant"], str(checked(o["path"], "GGUF"))) for o in (stages.get("quantize") or {}).get("outputs", [])
             if Path(o["path"]).is_file()]
    total = 2 + len(ggufs)
    writer.stage("preparing_data", step=0, total_steps=total)
    convs, source, warnings = _conversations(config, train_cfg, trained)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # the tokenizer and chat template trained with
    scored = _score_set(tokenizer, convs, train_cfg.get("max_length", 1024))
    sampled = [c for c in convs if not getattr(c, "tools", None)][:config.samples]  # tool records: tool_calls
    prompts = [_prompt(c) for c in sampled]
    tool_cases, tool_warnings = tool_eval.tool_cases(convs, config.tool_turns, tokenizer.chat_template)
    warnings.extend(tool_warnings)

    writer.stage("measuring_base_and_fine_tuned", step=1, total_steps=total)
    base_ref = trained.get("base_model_dir") or trained["base_model"]
    if Path(base_ref).exists():
        base_ref = str(check_input_dir(base_ref, "base model"))
    hf = _hf_part(base_ref, adapter_dir, scored, prompts, tokenizer, config.max_new_tokens, tool_cases)
    tool_scores = {who: tool_eval.score(tool_cases, answers) for who, answers in
                   (("base", hf["tools"]["base"]), ("fine-tuned", hf["tools"]["fine-tuned"]))}
    measured = []
    for i, (quant, path) in enumerate(ggufs, start=2):
        writer.stage("measuring_gguf", quant=quant, step=i, total_steps=total)
        measured.append((quant, path, _gguf_nll(Path(path), scored)))
        if tool_cases:
            answers = tool_eval.gguf_answers(Path(path), tool_cases, config.max_new_tokens)
            tool_scores[f"{quant} GGUF"] = tool_eval.score(tool_cases, answers)
    quantized = _gguf_answers(Path(ggufs[-1][1]), prompts, config.max_new_tokens) if ggufs and prompts else []
    if not ggufs:
        warnings.append("the run is not quantized yet: no GGUF rows; run forge quantize, then evaluate again")
    samples = [{"prompt": p[-1]["content"], "expected": c[len(p)]["content"], "base": b,
                **({"quantized": q, "quantized_model": ggufs[-1][0]} if q else {})}
               for p, c, b, q in zip(prompts, sampled, hf["answers"],
                                      quantized or [None] * len(prompts), strict=True)]
    table = _table(hf, measured, scored.tokens)
    result = {"status": Outcome.SUCCEEDED, "run_dir": str(run_dir), "source": source, "tokens": scored.tokens,
              "table": table, "samples": samples, "warnings": warnings,
              "stopped_on_its_own": _stop_counts(samples), "config": config.model_dump(mode="json"),
              **({"tool_calls": tool_scores} if tool_cases else {})}
    writer({"event": "done", "step": total, "total_steps": total, "percent": 100.0})
    record_stage(run_dir, "evaluate", result)
    return result


def _stop_counts(samples: list[dict]) -> dict:
    """How many sample answers ended by the model's own end-of-turn, per model."""
    counts = {}
    for who in ("base", "quantized"):
        answered = [s[who] for s in samples if who in s]
        if answered:
            counts[who] = f"{sum(a['stopped'] for a in answered)}/{len(answered)}"
    return counts
