"""A finished job's outcome sized for a status reply: the files it delivers, the metrics an agent decides on,
each quant's main figures and one line in words for what training and evaluation measured. The job's resource (forge://jobs/{id})
holds the rest: every file, every metric, the evaluation table and its sample answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

# Every run's files have sha256s in the resource and the seal; a status names what the job delivers.
DELIVERED_KINDS = ("gguf", "imatrix", "modelfile", "seal")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
KEY_METRICS = ("global_step", "train_loss", "eval_loss", "tokens_per_s", "duration_s", "peak_memory_bytes",
               "resumed_from")
STATUS_QUALITY_KEYS = ("kld_mean", "kld_p99", "same_top_pct", "bpw")
HEX_NAME = re.compile(r"\b([0-9a-f]{12})[0-9a-f]{52}\b")  # a dataset copy's sha256 file name


def delivered(kind: str, items: list[dict], model: str | None = None) -> list[dict]:
    """The files a job delivers: its weights (adapter or merged), GGUFs (and the importance matrix a quantize
    job made), Modelfile and seal; for a pipeline, ``model`` (the GGUF it made last: the most quantized, or
    auto's choice), the Modelfile and the seal. Configs, tokenizer files, a pipeline's f16 and matrix and the
    retrospective are in the resource."""
    if kind in ("pipeline", "sweep"):
        return [a for a in items if (a["kind"] == "gguf" and a["path"] == model) or a["kind"] in ("modelfile", "seal")]
    return [a for a in items if a["kind"] in DELIVERED_KINDS
            or (a["kind"] in ("adapter", "merged") and a["path"].endswith(WEIGHT_SUFFIXES))]


def key_metrics(metrics: dict) -> dict:
    """The metrics a status shows; a train Ray Train restarted shows how many times (the resource lists them)."""
    shown = {k: metrics[k] for k in KEY_METRICS if metrics.get(k) is not None}
    if metrics.get("restarts"):
        shown["restarts"] = len(metrics["restarts"])
    return shown


def short_names(text: str | None) -> str | None:
    """A dataset copy named by its 64-hex sha256, cut to 12 digits: the full name is in the resource."""
    return HEX_NAME.sub(r"\1…", text) if text else text


def compact_quality(quality: dict | None) -> dict | None:
    """What each quant lost, for a status: KLD mean and p99, same top token, bits per weight per row."""
    if not quality:
        return None
    # the first row is the reference (the f16: KLD 0 against itself), a twin made with(out) the matrix is the
    # imatrix line's
    rows = [{"model": r["model"], **{k: r[k] for k in STATUS_QUALITY_KEYS if r.get(k) is not None}}
            for r in quality["rows"][1:] if "(" not in r["model"]]
    return {**{k: short_names(v) for k, v in quality.items() if k != "rows"}, "rows": rows}


def _num(value: float) -> str:
    return f"{value:.4g}"


def training_line(metrics: dict) -> str | None:
    if not metrics.get("global_step"):
        return None
    line = f"trained {metrics['global_step']} steps"
    if metrics.get("resumed_from"):
        line += f" (resumed from {Path(metrics['resumed_from']).name})"
    losses = [f"{name} {_num(metrics[key])}" for key, name in (("train_loss", "train loss"),
                                                               ("eval_loss", "eval loss"))
              if metrics.get(key) is not None]
    line += (": " + ", ".join(losses)) if losses else ""
    preference = metrics.get("preference") or {}
    figures = preference.get("eval") or preference.get("last")
    if figures and figures.get("reward_accuracy") is not None:
        where = "eval pairs" if preference.get("eval") else "last step"
        line += f"; reward accuracy {_num(figures['reward_accuracy'])}"
        if figures.get("reward_margin") is not None:
            line += f" and margin {_num(figures['reward_margin'])}"
        line += f" on the {where}"
        first = (preference.get("first") or {}).get("reward_accuracy")
        line += f" (first step: {_num(first)})" if first is not None else ""
    return line


def defaults_line(chosen: dict | None) -> str | None:
    """The hyperparameters Forge chose because none were given, each with why."""
    if not chosen:
        return None
    return "chosen for you: " + ", ".join(f"{k}={v['value']:g} ({v['why'].split(':')[0]})" for k, v in chosen.items())


def evaluation_line(evaluated: dict | None) -> str | None:
    """Perplexity of each model on the answer tokens, answers that stopped, tool calls right: one line."""
    if not evaluated or not evaluated.get("table"):
        return None
    rows = [r for r in evaluated["table"] if "file" not in r]  # a removed twin is in the resource's table
    ppl = ", ".join(f"{r['model']} {_num(r['perplexity'])}" for r in rows)
    line = f"perplexity over {evaluated.get('tokens')} answer tokens: {ppl}"
    stopped = evaluated.get("stopped_on_its_own") or {}
    if stopped:
        line += "; answers that stopped on their own: " + ", ".join(f"{who} {n}" for who, n in stopped.items())
    calls = evaluated.get("tool_calls") or {}
    if calls:
        line += "; tool-call turns right: " + ", ".join(f"{who} {s['right']}/{s['turns']}" for who, s in calls.items())
    learned = evaluated.get("learned") or {}
    if learned:
        line += "; answers right: " + ", ".join(f"{who.removesuffix(' GGUF')} {t['matched']}/{t['of']}"
                                                for who, t in learned.items())
    return line + forgetting_line(evaluated)


def forgetting_line(evaluated: dict) -> str:
    """What the fine-tune kept on Forge's general set, or the flag when it lost ground beyond the budget."""
    forgot = evaluated.get("forgetting") or {}
    flagged = [w for w in evaluated.get("warnings") or [] if w.startswith("forgetting:")]
    if flagged:
        return "; " + flagged[0]
    tuned = forgot.get("fine-tuned")
    if not tuned:
        return ""
    return f"; general set kept {tuned['kept_pct']:g}%, prose ppl {tuned['prose_ppl_change_pct']:+g}% (within budget)"


def summary_line(result: dict | None) -> str | None:
    """What the job measured, in one line (training, then evaluation)."""
    if not result:
        return None
    stages = result.get("stages") or {}
    metrics = result.get("metrics") or stages.get("train", {}).get("metrics") or {}
    evaluated = result if "table" in result else stages.get("evaluate")
    chosen = result.get("defaults") or stages.get("train", {}).get("defaults")
    parts = [p for p in (training_line(metrics), defaults_line(chosen), evaluation_line(evaluated)) if p]
    return "; ".join(parts) or None


def evaluation_detail(result: dict | None) -> dict | None:
    """The evaluation as the resource gives it: the table, sample answers, tool-call scores, warnings."""
    evaluated = (result or {}) if "table" in (result or {}) else ((result or {}).get("stages") or {}).get("evaluate")
    if not evaluated:
        return None
    keys = ("measured_on", "reference", "table", "samples", "stopped_on_its_own", "tool_calls", "learned",
            "forgetting", "warnings", "record")
    return {k: evaluated[k] for k in keys if evaluated.get(k) is not None}


def _sweep_row(row: dict) -> str:
    """A trial in one short line: what was tried, and how it did (the resource has the whole row), e.g.
    ``t1 lr=0.0003 epochs=12 r=16: 6/6 right, kept 84.6%, prose +31.9%, within budget``."""
    tried = " ".join(f"{name}={row[key]:g}" for key, name in (("learning_rate", "lr"), ("num_train_epochs", "epochs"),
                                                              ("lora_r", "r")) if row.get(key) is not None)
    if row.get("status") != "succeeded" or row.get("learned") is None:
        code = (row.get("error") or {}).get("code")
        return f"{row.get('trial')} {tried}: {row.get('status')}" + (f" ({code})" if code else "")
    return (f"{row.get('trial')} {tried}: {row['learned']}/{row.get('of')} right, kept {row.get('kept_pct'):g}%, "
            f"prose {row.get('prose_ppl_change_pct'):+g}%, {'within' if row.get('within_budget') else 'over'} budget")


def sweep_table(result: dict | None) -> dict | None:
    """A sweep's table for its status, while it runs and when it ended: each trial's row, the winner and why."""
    if not result or "trials" not in result:
        return None
    rows = [_sweep_row(r) for r in result["trials"]]
    return {"trials": rows, **{k: result[k] for k in ("winner", "why", "winner_run_dir") if result.get(k)}}


WARNING_LINES, WARNING_CHARS = 3, 120


def parity_line(result: dict | None) -> str | None:
    """The merge's logit check in one line: merged against base + adapter, and what the adapter itself moves."""
    result = result or {}
    parity = result.get("parity") or ((result.get("stages") or {}).get("merge") or {}).get("parity")
    if not parity:
        return None
    verdict = "passed" if parity.get("passed") else "FAILED (the merged weights differ from base + adapter)"
    return (f"merge parity {verdict}: max |Δlogit| {_num(parity['max_abs_diff'])} within bound "
            f"{_num(parity['bound'])}; the adapter moves logits up to {_num(parity['adapter_effect'])}")


def warnings_of(result: dict | None, events: list[str], summary: str | None) -> list[str]:
    """The checks and warnings that matter, in that order: the merge's parity, what the job's events warned of
    (a base dequantized from a GGUF), what its stages warned of (quantization quality, an importance matrix);
    what the summary line already says is left out."""
    result = result or {}
    stage_warnings = [w for r in [result, *(result.get("stages") or {}).values()] if isinstance(r, dict)
                      for w in r.get("warnings") or []]
    return [w for w in dict.fromkeys([parity_line(result), *events, *stage_warnings])
            if w and not (summary and w in summary)]


def short_warnings(found: list[str], room: int, where: str) -> list[str]:
    """Up to three of ``found`` as short lines, within ``room`` bytes of JSON; the rest named as in ``where``."""
    def cost(line: str) -> int:
        return len(json.dumps(line, ensure_ascii=False).encode()) + 1  # as the reply's JSON spells it, and a comma

    rest = cost(f"+{len(found)} more in {where}")
    lines: list[str] = []
    for warning in found[:WARNING_LINES]:
        line = warning if len(warning) <= WARNING_CHARS else warning[:WARNING_CHARS - 1] + "…"
        if cost(line) > room - rest:
            break
        lines.append(line)
        room -= cost(line)
    if len(lines) < len(found) and rest <= room:
        lines.append(f"+{len(found) - len(lines)} more in {where}")
    return lines
