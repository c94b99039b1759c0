"""The retrospective: a seal record rendered as Markdown (results table, artifacts, friction, next
steps with exact commands) and its loss curve as a PNG. Rendered from the record alone, so anyone
holding a seal.json can render it again and get the same text."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from forge.runs import Outcome


def plot_loss_curve(record: dict, path: Path) -> str | None:
    points = [(r, r.get("loss_curve") or []) for r in record["runs"]]
    if not any(curve for _, curve in points):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for run, curve in points:
        name = Path(run["run_dir"]).name
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=f"{name} train")
        evals = run.get("eval_curve") or []
        if evals:
            ax.plot([p["step"] for p in evals], [p["eval_loss"] for p in evals], "o--", label=f"{name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _fmt(value, unit: str = "", digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}{unit}"
    return f"{value}{unit}"


def _gib(n) -> str:
    return "—" if n is None else f"{n / 1024**3:.2f} GiB"


def results_table(run: dict, hardware: dict) -> str:
    m = run.get("metrics", {})
    output = ", ".join(Path(g["path"]).name for g in run.get("gguf") or []) or run.get("run_dir") or "—"
    hw = ", ".join(hardware.get("gpus", [])) or f"CPU ({hardware.get('cpu_count', '?')} cores)"
    rows = [
        ("Final epoch", _fmt(m.get("final_epoch"))),
        ("Total duration", _fmt(m.get("duration_s"), " s")),
        ("Train loss", _fmt(m.get("train_loss"))),
        ("Eval loss", _fmt(m.get("eval_loss"))),
        ("Output", output),
        ("Samples/s", _fmt(m.get("samples_per_s"))),
        ("Steps/s", _fmt(m.get("steps_per_s"))),
        ("Tokens/s", _fmt(m.get("tokens_per_s"))),
        ("Peak memory", _gib(m.get("peak_memory_bytes"))),
        ("Hardware", hw),
    ]
    return "| Metric | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def next_steps(run: dict) -> list[str]:
    """The commands that continue this run, every value shell-quoted."""
    q = shlex.quote
    stages, run_dir = run.get("stages", {}), run.get("run_dir", ".")
    steps = []
    if "train" in stages and stages["train"]["status"] != Outcome.SUCCEEDED:
        steps.append(f"forge train --output-dir {q(run_dir)} --resume")
    if "merge" not in stages:
        steps.append(f"forge merge --adapter-dir {q(f'{run_dir}/adapter')}")
    if "quantize" not in stages:
        steps.append(f"forge quantize --model-dir {q(f'{run_dir}/merged')} --quantizations Q4_K_M")
    if "modelfile" not in stages and run.get("gguf"):
        steps.append(f"forge modelfile --gguf {q(run['gguf'][-1]['path'])}")
    if run.get("modelfile"):
        mf = run["modelfile"]
        steps += [mf["ollama_create"], f"ollama run {q(mf['model_name'])}"]
    if run.get("gguf"):
        steps.append(f"forge publish --source {q(str(Path(run['gguf'][-1]['path']).parent))} --kind gguf "
                     "--repo-id YOUR_NAME/MODEL_NAME --dry-run")
    return steps


def _cell(text: str, limit: int = 160) -> str:
    """Text that fits a Markdown table cell: one line, pipes escaped, cut at ``limit`` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "…"


def _answer(answer: dict | None) -> str:
    if not answer:
        return "—"
    ending = "stopped" if answer["stopped"] else f"**did not stop** ({answer['tokens']} tokens)"
    return f"{_cell(answer['text']) or '(empty)'} — {ending}"


def _g(value, spec: str = ".4g") -> str:
    return "—" if value is None else format(value, spec)


def _quantization_lines(quantization: dict) -> list[str]:
    """The importance matrix (what it was computed on, what it bought) and auto's choice, in words."""
    matrix, auto, out = quantization.get("imatrix") or {}, quantization.get("auto") or {}, []
    if matrix.get("used"):
        line = (f"Importance matrix: computed by llama.cpp from the {_cell(matrix.get('source'), 120)} "
                f"({matrix.get('tokens')} tokens of {matrix.get('records')} records)" if matrix.get("setting") == "auto"
                else "Importance matrix: given")
        compared = matrix.get("comparison")
        if compared:
            line += (f"; {compared['quant']} mean KLD {_g(compared['with']['kld_mean'])} with it, "
                     f"{_g(compared['without']['kld_mean'])} without")
            if compared.get("kept") == "without":
                line += " (the file made without it measured better and was kept)"
        out.append(line + ".")
    elif matrix:
        out.append("No importance matrix was used.")
    if auto:
        out.append(f"Chosen by auto: {_cell(auto.get('why'), 600)}.")
    return ["", *out] if out else []


def evaluation_section(ev: dict) -> list[str]:
    """What the fine-tune gained and each quantization cost, and sample answers side by side."""
    source = ev.get("source") or {}
    out = ["### Evaluation", "",
           f"On {source.get('records')} records of the {source.get('kind')} (`{source.get('path')}`), "
           f"{ev.get('tokens')} answer tokens scored by every model; each GGUF also against the f16 GGUF "
           "(KL divergence and same top token, as llama.cpp measures them"
           + (f": {_cell(ev['measured_on']['text'], 300)}" if (ev.get("measured_on") or {}).get("text") else "")
           + "):", "",
           "| Model | Loss | Perplexity | Change | Mean KLD | KLD p99 | Same top | Size |",
           "|---|---|---|---|---|---|---|---|"]
    for row in ev.get("table") or []:
        change = ("vs base " + f"{row['vs_base_pct']:+.2f}%" if "vs_base_pct" in row
                  else "vs fine-tuned " + f"{row['vs_fine_tuned_pct']:+.2f}%" if "vs_fine_tuned_pct" in row else "")
        quant = (f" {_g(row.get('kld_mean'))} | {_g(row.get('kld_p99'))} | {_g(row.get('same_top_pct'), '.1f')} % | "
                 f"{row['bytes'] / 1e6:.1f} MB, {row['bpw']} bpw{', imatrix' if row.get('imatrix') else ''}"
                 f"{' (deleted)' if row.get('file') else ''} |" if "bytes" in row else " | | | |")
        out.append(f"| {row['model']} | {row['loss']:.4f} | {row['perplexity']:.4g} | {change} |{quant}")
    out += _quantization_lines(ev.get("quantization") or {})
    out += _learned_lines(ev)
    samples = ev.get("samples") or []
    if samples:
        quant = samples[0].get("quantized_model", "quantized")
        out += ["", f"Sample answers (greedy), base, fine-tuned and {quant} GGUF; stopped on its own: "
                + ", ".join(f"{k} {v}" for k, v in (ev.get("stopped_on_its_own") or {}).items()) + ".", "",
                f"| Prompt | Expected | Base | Fine-tuned | {quant} |", "|---|---|---|---|---|"]
        out += [f"| {_cell(s['prompt'], 80)} | {_cell(s['expected'], 80)} | {_answer(s.get('base'))} | "
                f"{_answer(s.get('fine-tuned'))} | {_answer(s.get('quantized'))} |" for s in samples]
    tools = ev.get("tool_calls") or {}
    if tools:
        out += ["", "Tool calls (greedy, parsed with the template's call syntax): right = the data's tool names and "
                "arguments (as JSON values); no-call turns are right when the model calls nothing.", "",
                "| Model | Right | Calling turns | No-call turns | Calls that parse |", "|---|---|---|---|---|"]
        for who, row in tools.items():
            parsed = "—" if row.get("parsed_share") is None else f"{row['parsed_share']:.0%}"
            out.append(f"| {_cell(who, 40)} | {row['right']}/{row['turns']} | {row['calls_right']} | "
                       f"{row['no_call_right']} | {parsed} |")
    return out + [""]


def _learned_lines(ev: dict) -> list[str]:
    """Held-out answers matched, and what each model kept of the base's general ability (the budget)."""
    out = []
    learned, held = ev.get("learned") or {}, (ev.get("source") or {}).get("held_out") or {}
    if learned:
        out += ["", "Eval answers matching the record's answer (exact / normalised / contains): "
                + ", ".join(f"{_cell(who, 40)} {t['matched']}/{t['of']}" for who, t in learned.items()) + "."
                + (f" {_cell(held['text'], 300)}." if held.get("text") else "")]
    forgetting, budget = ev.get("forgetting") or {}, ev.get("budget") or {}
    if forgetting:
        out += ["", f"Forgetting, on Forge's general set against the base (budget: at least "
                f"{budget.get('min_kept_pct')}% of the questions the base answered, prose perplexity at most "
                f"+{budget.get('max_prose_ppl_pct')}%):", "",
                "| Model | General answered | Kept | Stopped | Prose perplexity | Change | Within budget |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {_cell(who, 40)} | {c['general_answered']}/{c['of']} (base {c['base_answered']}) | "
                f"{c['kept_pct']:g}% | {c['stopped']} (base {c['base_stopped']}) | {c['prose_ppl']:.4g} | "
                f"{c['prose_ppl_change_pct']:+g}% | {'yes' if c['within_budget'] else '**no**'} |"
                for who, c in forgetting.items()]
    return out


def sweep_section(sweep: dict) -> list[str]:
    from forge.sweep_table import table_text

    return ["### Sweep", "", f"This run won the sweep `{sweep.get('run_dir')}`: {_cell(sweep.get('why'), 400)}", "",
            table_text(sweep.get("trials") or [], sweep.get("winner")), ""]


def render_retrospective(record: dict, sid: str, plot: str | None = None) -> str:
    out = [f"# Retrospective — {', '.join(Path(r['run_dir']).name for r in record['runs'])}", "",
           f"Seal `{sid}`, made {record['created_at']}; previous seal "
           f"{'`' + record['previous'] + '`' if record.get('previous') else 'none (first in the chain)'}.", ""]
    if record.get("note"):
        out += [f"> {record['note']}", ""]
    if record.get("git") and record["git"].get("git"):
        g = record["git"]
        out += [f"Project `{g['project_dir']}` at commit `{g['commit'][:12]}`{' (dirty)' if g['dirty'] else ''}.", ""]
    for run in record["runs"]:
        base = run.get("base_model") or {}
        out += [f"## Run {Path(run['run_dir']).name}", "",
                f"Base model `{base.get('ref')}`" + (f" at `{base['revision'][:12]}`" if base.get("revision") else "")
                + f", method {run.get('method') or '—'}.", ""]
        ds = run.get("dataset") or {}
        if ds:
            out += [f"Dataset `{ds.get('path')}` ({ds.get('format')}, sha256 `{str(ds.get('sha256'))[:16]}…`): "
                    f"{ds.get('train_records')} train / {ds.get('eval_records')} eval records.", ""]
        out += ["### Results", "", results_table(run, record.get("hardware", {}))]
        parity = run.get("merge_parity")
        if parity:
            out += [f"Merge parity: max |Δlogit| {parity['max_abs_diff']:.3g} (bound {parity['bound']:.3g}, "
                    f"{parity['dtype']}).", ""]
        if run.get("evaluation"):
            out += evaluation_section(run["evaluation"])
        if run.get("sweep"):
            out += sweep_section(run["sweep"])
        out += ["### Artifacts", "", "| Kind | File | Bytes | sha256 |", "|---|---|---|---|"]
        for a in run.get("artifacts", []):
            rel = os.path.relpath(a["path"], run["run_dir"])
            out.append(f"| {a['kind']} | {rel} | {a['bytes']} | `{a['sha256'][:16]}…` |")
        out += ["", "### Next steps", ""]
        out += [f"- `{s}`" for s in next_steps(run)] or ["- nothing left to run"]
        out.append("")
    if plot:
        out += ["## Loss curve", "", f"![loss curve]({plot})", ""]
    out += ["## Friction", ""]
    friction = list(record.get("warnings", []))
    friction += [f"{s} failed: {st['error'].get('code')}: {st['error'].get('message')}"
                 for r in record["runs"] for s, st in r["stages"].items() if st.get("error")]
    friction += [f"job {j.get('id')} ({j.get('kind')}) {j.get('status')}: {(j.get('error') or {}).get('code')}"
                 for j in record.get("jobs", []) if j.get("status") not in (Outcome.SUCCEEDED, None)]
    out += [f"- {w}" for w in friction] or ["- none recorded"]
    return "\n".join(out) + "\n"
