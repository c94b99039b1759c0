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

import math
from pathlib import Path

from pydantic import Field

from forge import answer_score, forgetting, measure_set, quant_quality, tool_eval
from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.forgetting import Budget
from forge.paths import check_input_dir, checked
from forge.progress import ProgressCallback, ProgressWriter
from forge.runs import PROGRESS_FILE, Outcome, load_stages, record_stage


class EvaluateConfig(StageConfig):
    run_dir: Path = Field(description="A run dir after training; its GGUFs are measured once it is quantized.")
    dataset: Path | None = Field(None, description=(
        "JSONL records to measure on; default the run's eval split (without one, its training records)."))
    max_records: int = Field(32, ge=1, le=1000, description="Records measured, at most.")
    samples: int = Field(8, ge=0, le=20, description=(
        "Eval prompts answered by the base, the fine-tuned and the quantized model, each scored against the "
        "record's answer."))
    max_new_tokens: int = Field(64, ge=1, le=1024, description="Tokens per sample answer, at most.")
    tool_turns: int = Field(16, ge=0, le=200, description=(
        "For records with tools: assistant turns asked of each model to measure tool-call accuracy, at most."))
    forgetting: bool = Field(True, description="Measure every model on Forge's general set against the base.")
    min_kept_pct: float = Field(Budget.min_kept_pct, ge=0, le=100, description=(
        "Forgetting budget: share of the general questions the base answered still answered, in %."))
    max_prose_ppl_pct: float = Field(Budget.max_prose_ppl_pct, ge=0, le=10_000, description=(
        "Forgetting budget: most the general prose perplexity may rise above the base's, in %."))

    @property
    def budget(self) -> Budget:
        return Budget(min_kept_pct=self.min_kept_pct, max_prose_ppl_pct=self.max_prose_ppl_pct)


def _nll(logits, ids: list[int], mask: list[int]) -> float:
    """Summed negative log-likelihood of the masked tokens, given each position's logits (numpy, n × vocab)."""
    log_probs = quant_quality.log_softmax(logits)
    return float(-sum(log_probs[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]))


def _row(model: str, nll: float, tokens: int, **extra) -> dict:
    loss = nll / max(tokens, 1)
    return {"model": model, "loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 700)), 4),
            "tokens": tokens, **extra}


# ---- the models ----

def _prompt(conv: list[dict]) -> list[dict]:
    """A conversation up to its last answer: what the model is asked."""
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    return conv[:last]


def _hf_part(base_ref: str, adapter_dir: Path, scored: measure_set.Scored, prompts: list, tokenizer, max_new: int,
             tool_cases: list, general: bool) -> dict:
    """Base and fine-tuned (base + adapter, the adapter switched off for the base) scores, both models' greedy
    answers to the sample prompts and to the tool-call turns, and both measured on the general set."""
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

    stops = sorted({i for i in [tokenizer.eos_token_id, *_list(model.generation_config.eos_token_id)]
                    if i is not None})

    def measured(m) -> dict:
        return {"nll": nll_sum(m), "tools": tool_eval.hf_answers(m, tokenizer, tool_cases, max_new, stops),
                "answers": forgetting.hf_generate(m, tokenizer, prompts, stops, max_new) if prompts else [],
                "general": forgetting.hf_measure(m, tokenizer, stops) if general else None}

    tuned = measured(model)
    with model.disable_adapter():
        base = measured(model)
    del model
    return {"base": base, "fine-tuned": tuned}


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def _table(nll: dict, ggufs: list[tuple[str, str, dict]], tokens: int, removed: list[dict]) -> list[dict]:
    """One row per model; the fine-tuned row says what it gained over the base, each GGUF what it lost
    (perplexity against the fine-tuned model, KL divergence and same top token against the f16 GGUF)."""
    base = _row("base", nll["base"], tokens)
    tuned = _row("fine-tuned", nll["fine-tuned"], tokens)
    tuned["vs_base_pct"] = round(100 * (tuned["perplexity"] / base["perplexity"] - 1), 2)
    rows = [base, tuned]
    for quant, path, quality in ggufs:
        row = _row(f"{quant} GGUF", quality["nll"], tokens, path=path)
        rows.append(_gguf_row(row, quality, tuned))
    for found in removed:  # measured by the quantize stage on these same tokens, then deleted
        row = {"model": found["model"], "loss": round(math.log(found["ppl"]), 5), "perplexity": found["ppl"],
               "tokens": tokens, "file": "removed after the quantize stage measured it",
               "measured_by": "quantize stage"}
        rows.append(_gguf_row(row, found, tuned))
    return rows


def _gguf_row(row: dict, quality: dict, tuned: dict) -> dict:
    row["vs_fine_tuned_pct"] = round(100 * (row["perplexity"] / tuned["perplexity"] - 1), 2)
    for key in ("kld_mean", "kld_p99", "same_top_pct", "answers_kld_mean", "answers_same_top_pct", "delta_ppl",
                "bytes", "bpw", "imatrix", "measured_by"):
        if quality.get(key) is not None:
            row[key] = quality[key]
    return row


def _unchanged(out: dict) -> bool:
    """A GGUF the quantize stage measured, still there and still the file it measured."""
    from forge.workspace import sha256_file

    path = Path(out["path"])
    return bool(out.get("quality")) and path.is_file() and sha256_file(path) == out.get("sha256")


def _same_basis(quantized: dict, basis: dict) -> bool:
    """The quantize stage measured these very tokens, against the f16 GGUF that is still there unchanged."""
    theirs, recorded = quantized.get("measured_on") or {}, quantized.get("outputs") or []
    same = bool(theirs) and all(theirs.get(k) == basis.get(k) for k in ("sha256", "kind", "records", "tokens",
                                                                          "positions"))
    return same and bool(recorded) and _unchanged(recorded[0])


def _measured_by_quantize(quantized: dict, outputs: list[dict], same_basis: bool) -> list[dict | None]:
    """The quantize stage's measurement of each GGUF, where it measured exactly these tokens against the same
    f16 and the file is still the one it measured (same sha256); None where it must be measured again."""
    if not outputs or not same_basis or outputs[0]["path"] != quantized["outputs"][0]["path"]:
        return [None] * len(outputs)  # another measure set, or another reference
    return [outputs[0]["quality"], *(out["quality"] if _unchanged(out) else None for out in outputs[1:])]


def _removed_rows(quantized: dict, same_basis: bool) -> list[dict]:
    """Files the quantize stage measured and deleted (auto's other candidates, the type without the
    importance matrix), when it measured them on exactly the tokens evaluate scores."""
    if not same_basis:
        return []
    rows = [{"model": f"{c['quant']} GGUF", **c} for c in (quantized.get("auto") or {}).get("candidates", [])
            if not c.get("kept")]
    comparison = (quantized.get("imatrix") or {}).get("comparison")
    if comparison and comparison.get("kept") == "with":
        rows.append({"model": f"{comparison['quant']} GGUF (no imatrix)", **comparison["without"], "imatrix": False})
    elif comparison and comparison.get("kept") == "without":  # the plain file measured better and was kept
        rows.append({"model": f"{comparison['quant']} GGUF (imatrix)", **comparison["with"], "imatrix": True})
    return rows


def evaluate(config: EvaluateConfig, on_progress: ProgressCallback | None = None) -> dict:
    """Measure a run; return (and record in the run dir) the table, the sample answers and warnings."""
    from transformers import AutoTokenizer

    run_dir = check_input_dir(Path(config.run_dir), "run dir")
    train_cfg, stages = measure_set.train_config(run_dir), load_stages(run_dir)
    trained = stages.get("train")
    if not trained or trained.get("status", Outcome.SUCCEEDED) != Outcome.SUCCEEDED:
        raise ForgeError(Codes.RUN_NOT_FOUND, f"{run_dir} has no finished training to evaluate",
                         "finish (or resume) training first")
    writer = ProgressWriter(run_dir / PROGRESS_FILE, on_progress)
    adapter_dir = check_input_dir(trained["adapter_dir"], "adapter dir")
    quantized_stage = stages.get("quantize") or {}
    outputs = [o for o in quantized_stage.get("outputs", []) if Path(o["path"]).is_file()]
    ggufs = [(o["quant"], str(checked(o["path"], "GGUF"))) for o in outputs]
    writer.stage("preparing_data", step=0, total_steps=2 + len(ggufs))
    convs, source, warnings = measure_set.conversations(train_cfg, config.dataset, config.max_records,
                                                        (trained.get("dataset") or {}).get("sha256"))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # the tokenizer and chat template trained with
    scored = measure_set.score_set(tokenizer, convs, train_cfg.get("max_length", 1024), source)
    sampled = [c for c in convs if not getattr(c, "tools", None)][:config.samples]  # tool records: tool_calls
    prompts = [_prompt(c) for c in sampled]
    tool_cases, tool_warnings = tool_eval.tool_cases(convs, config.tool_turns, tokenizer.chat_template)
    warnings.extend(tool_warnings)
    total = 2 + len(ggufs) * (2 if tool_cases else 1)

    writer.stage("measuring_base_and_fine_tuned", step=1, total_steps=total)
    base_ref = trained.get("base_model_dir") or trained["base_model"]
    if Path(base_ref).exists():
        base_ref = str(check_input_dir(base_ref, "base model"))
    hf = _hf_part(base_ref, adapter_dir, scored, prompts, tokenizer, config.max_new_tokens, tool_cases,
                  config.forgetting)
    tool_scores = {who: tool_eval.score(tool_cases, hf[who]["tools"]) for who in ("base", "fine-tuned")}
    measured, same_basis = _gguf_quality(ggufs, outputs, quantized_stage, scored, warnings,
                                         lambda i: writer.stage("measuring_gguf", quant=ggufs[i][0], step=2 + i,
                                                                total_steps=total))
    answers = {"base": hf["base"]["answers"], "fine-tuned": hf["fine-tuned"]["answers"]}
    general = {"fine-tuned": hf["fine-tuned"]["general"]} if config.forgetting else {}
    for i, (quant, path) in enumerate(ggufs, start=2 + len(ggufs)):
        if not tool_cases and not config.forgetting and quant != ggufs[-1][0]:
            continue
        writer.stage("asking_gguf", quant=quant, step=min(i, total - 1), total_steps=total)
        if tool_cases:
            tool_scores[f"{quant} GGUF"] = tool_eval.score(tool_cases, tool_eval.gguf_answers(
                Path(path), tool_cases, config.max_new_tokens))
        if config.forgetting:
            general[f"{quant} GGUF"] = forgetting.gguf_measure(Path(path), tokenizer)
        if quant == ggufs[-1][0] and prompts:
            answers[f"{quant} GGUF"] = forgetting.gguf_generate(Path(path), prompts, config.max_new_tokens)
    if not ggufs:
        warnings.append("the run is not quantized yet: no GGUF rows; run forge quantize, then evaluate again")
    samples, learned = _scored_samples(prompts, sampled, answers)
    forgot = {who: forgetting.compare(hf["base"]["general"], m, config.budget) for who, m in general.items()}
    warnings.extend(filter(None, (forgetting.verdict(c, f"the {who} model") for who, c in forgot.items())))
    table = _table({k: hf[k]["nll"] for k in ("base", "fine-tuned")}, measured, scored.tokens,
                   _removed_rows(quantized_stage, same_basis))
    result = {"status": Outcome.SUCCEEDED, "run_dir": str(run_dir), "source": source, "tokens": scored.tokens,
              "measured_on": scored.basis, "reference": Path(ggufs[0][1]).name if ggufs else None,
              "quantization": _quantization(quantized_stage),
              "table": table, "samples": samples, "learned": learned, "warnings": warnings,
              "stopped_on_its_own": _stop_counts(samples), "config": config.model_dump(mode="json"),
              **({"forgetting": forgot, "budget": vars(config.budget)} if forgot else {}),
              **({"tool_calls": tool_scores} if tool_cases else {})}
    record_stage(run_dir, "evaluate", result)  # a record of its own: a second evaluation keeps this one
    writer({"event": "done", "step": total, "total_steps": total, "percent": 100.0, **figures(result)})
    return result


def figures(result: dict) -> dict:
    """An evaluation's deciding numbers, small enough for a status reply or an event: each model's perplexity,
    answers right, general questions kept, and the record holding the whole (``stages/evaluate-<n>.json``)."""
    rows = [r for r in result.get("table") or [] if "file" not in r]
    out = {"record": result.get("record"),
           "perplexity": {r["model"]: float(f"{r['perplexity']:.4g}") for r in rows if r.get("perplexity") is not None}}
    learned = result.get("learned") or {}
    if learned:
        out["answers_right"] = {who: f"{t['matched']}/{t['of']}" for who, t in learned.items()}
    kept = {who: c["kept_pct"] for who, c in (result.get("forgetting") or {}).items() if c.get("kept_pct") is not None}
    if kept:
        out["general_kept_pct"] = kept
    return out


def _gguf_quality(ggufs: list, outputs: list, quantized_stage: dict, scored, warnings: list,
                  on_file) -> tuple[list, bool]:
    """Every GGUF against the run's first (its f16), on the same tokens: llama.cpp's KLD, same top token, PPL
    (taken from the quantize stage where it measured exactly these tokens)."""
    paths = [Path(path) for _, path in ggufs]
    recorded = quantized_stage.get("outputs") or []
    if ggufs and recorded and ggufs[0][1] != str(checked(recorded[0]["path"], "GGUF")):
        warnings.append(f"the run's {recorded[0]['quant']} GGUF is gone: each GGUF's KL divergence is measured "
                        f"against {paths[0].name} instead; quantize again to measure against the float model")
    same_basis = _same_basis(quantized_stage, scored.basis)  # hashes the f16 once
    qualities = _measured_by_quantize(quantized_stage, outputs, same_basis)
    todo = [i for i, quality in enumerate(qualities) if quality is None]
    if todo:
        found = quant_quality.measure(paths[0], [paths[i] for i in todo], scored, lambda n, _: on_file(todo[n]))
        for i, quality in zip(todo, found, strict=True):
            qualities[i] = quality
    return [(quant, path, {**quality, "imatrix": out.get("imatrix", False),
                           "measured_by": "evaluate" if i in todo else "quantize stage"})
            for i, ((quant, path), quality, out) in enumerate(zip(ggufs, qualities, outputs, strict=True))], same_basis


def _scored_samples(prompts: list, sampled: list, answers: dict[str, list]) -> tuple[list[dict], dict]:
    """Each eval prompt with the record's answer and every model's answer, scored against it (exact /
    normalised / contains), and how many each model matched."""
    samples = []
    for n, (prompt, conv) in enumerate(zip(prompts, sampled, strict=True)):
        expected = conv[len(prompt)]["content"]
        sample = {"prompt": prompt[-1]["content"], "expected": expected}
        for who, given in answers.items():
            key = "quantized" if who.endswith("GGUF") else who
            sample[key] = {**given[n], "match": answer_score.match(given[n]["text"], expected)}
            if key == "quantized":
                sample["quantized_model"] = who.removesuffix(" GGUF")
        samples.append(sample)
    learned = {who: answer_score.tally([s["quantized" if who.endswith("GGUF") else who]["match"] for s in samples])
               for who in answers} if samples else {}
    return samples, learned


def _quantization(quantized: dict) -> dict | None:
    """How the run's quants were made: the importance matrix (what it was computed on, what it bought) and
    auto's choice, in words."""
    matrix, auto = quantized.get("imatrix") or {}, quantized.get("auto") or {}
    if not matrix and not auto:
        return None
    out = {"imatrix": {k: matrix.get(k) for k in ("used", "setting", "source", "tokens", "records", "used_for",
                                                  "comparison") if matrix.get(k) is not None}}
    if auto:
        out["auto"] = {k: auto.get(k) for k in ("chosen", "why", "within_budget", "budget")}
    return out


def _stop_counts(samples: list[dict]) -> dict:
    """How many sample answers ended by the model's own end-of-turn, per model."""
    counts = {}
    for who in ("base", "fine-tuned", "quantized"):
        answered = [s[who] for s in samples if who in s]
        if answered:
            counts[who] = f"{sum(a['stopped'] for a in answered)}/{len(answered)}"
    return counts
