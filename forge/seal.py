"""Seal a run: a canonical-JSON record (configs, dataset and artifact hashes, metrics, versions,
hardware, warnings) whose sha256 is its id, and a Markdown retrospective rendered from it alone.

Stages leave their results in ``<run dir>/stages/<stage>.json``; the seal re-hashes every artifact
when it is made rather than trusting those records.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.workspace import artifact, atomic_write_text, sha256_file

SCHEMA = "forge.seal/1"
STAGE_ORDER = ("train", "merge", "quantize", "modelfile")
ARTIFACT_GLOBS = {"adapter": "adapter/*", "merged": "merged/*", "gguf": "gguf/*.gguf", "modelfile": "gguf/Modelfile"}


class SealConfig(StageConfig):
    run_dir: Path = Field(description="Run dir to seal (holds stages/*.json).")
    note: str | None = Field(None, description="A note kept in the record.")


def record_stage(run_dir: Path, stage: str, result: dict) -> None:
    """Keep a stage's result in the run dir, so a seal (or an agent) can read it later."""
    atomic_write_text(Path(run_dir) / "stages" / f"{stage}.json", json.dumps(result, indent=2, default=str) + "\n")


def find_run_dir(path: Path) -> Path | None:
    """The run dir an output belongs to: the nearest parent holding train_config.json or stages/."""
    for parent in list(Path(path).resolve().parents)[:3]:
        if (parent / "train_config.json").is_file() or (parent / "stages").is_dir():
            return parent
    return None


def record_stage_near(output: Path, stage: str, result: dict) -> None:
    run_dir = find_run_dir(output)
    if run_dir is not None:
        record_stage(run_dir, stage, result)


def canonical_json(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def seal_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _load_stages(run_dir: Path) -> dict:
    stages = {}
    for stage in STAGE_ORDER:
        path = run_dir / "stages" / f"{stage}.json"
        if path.is_file():
            stages[stage] = json.loads(path.read_text(encoding="utf-8"))
    return stages


def build_record(run_dir: Path, note: str | None = None) -> dict:
    from forge.env import versions
    from forge.hardware import hardware_summary

    run_dir = Path(run_dir).resolve()
    stages = _load_stages(run_dir)
    if not stages:
        raise ForgeError(Codes.MODEL_NOT_FOUND, f"{run_dir} holds no stage results (stages/*.json)",
                         "seal a run dir written by forge train / forge pipeline")
    train = stages.get("train", {})
    artifacts = []
    for kind, pattern in ARTIFACT_GLOBS.items():
        artifacts += [artifact(p, kind) for p in sorted(run_dir.glob(pattern)) if p.is_file()]
    template = next((run_dir / d / "chat_template.jinja" for d in ("merged", "adapter")
                     if (run_dir / d / "chat_template.jinja").is_file()), None)
    warnings = [w for s in stages.values() for w in s.get("warnings", [])]
    quant = stages.get("quantize", {})
    return {
        "schema": SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_dir": str(run_dir),
        "note": note,
        "base_model": train.get("base_model") or stages.get("merge", {}).get("base_model"),
        "method": train.get("method"),
        "dataset": train.get("dataset"),
        "configs": {s: json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))
                    for s in ("train",) if (run_dir / "train_config.json").is_file()},
        "stages": {s: {"status": r.get("status", "succeeded")} for s, r in stages.items()},
        "metrics": {k: v for k, v in train.get("metrics", {}).items() if k not in ("loss_curve", "eval_curve")},
        "loss_curve": train.get("metrics", {}).get("loss_curve", []),
        "eval_curve": train.get("metrics", {}).get("eval_curve", []),
        "merge_parity": stages.get("merge", {}).get("parity"),
        "gguf": [{"quant": o["quant"], "path": o["path"],
                  "generated": o.get("verification", {}).get("generated")} for o in quant.get("outputs", [])],
        "modelfile": {k: stages["modelfile"].get(k) for k in ("path", "template_family", "stop_tokens",
                                                              "ollama_create", "model_name")}
        if "modelfile" in stages else None,
        "chat_template_sha256": sha256_file(template) if template else None,
        "artifacts": artifacts,
        "versions": versions(),
        "hardware": hardware_summary(),
        "warnings": warnings,
    }


def seal(config: SealConfig) -> dict:
    record = build_record(config.run_dir, config.note)
    data = canonical_json(record)
    sid = seal_id(data)
    run_dir = Path(record["run_dir"])
    seal_path, retro_path = run_dir / "seal.json", run_dir / "retrospective.md"
    atomic_write_text(seal_path, data.decode("utf-8"))
    retro = render_retrospective(record, sid)
    atomic_write_text(retro_path, retro)
    return {"status": "succeeded", "seal_id": sid, "seal_path": str(seal_path),
            "retrospective_path": str(retro_path), "results_table": results_table(record),
            "artifacts": [artifact(seal_path, "seal"), artifact(retro_path, "retrospective")]}


# ---- the retrospective, rendered from the record alone ----

def _fmt(value, unit: str = "", digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}{unit}"
    return f"{value}{unit}"


def _gib(n) -> str:
    return "—" if n is None else f"{n / 1024**3:.2f} GiB"


def results_table(record: dict) -> str:
    m = record.get("metrics", {})
    gguf = record.get("gguf") or []
    output = ", ".join(Path(g["path"]).name for g in gguf) or (record.get("run_dir") or "—")
    hw = record.get("hardware", {})
    hardware = ", ".join(hw.get("gpus", [])) or f"CPU ({hw.get('cpu_count', '?')} cores)"
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
        ("Hardware", hardware),
    ]
    return "| Metric | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def next_steps(record: dict) -> list[str]:
    stages, run_dir = record.get("stages", {}), record.get("run_dir", ".")
    steps = []
    if "merge" not in stages:
        steps.append(f"forge merge --adapter-dir {run_dir}/adapter")
    if "quantize" not in stages:
        steps.append(f"forge quantize --model-dir {run_dir}/merged --quantizations Q4_K_M")
    if "modelfile" not in stages and record.get("gguf"):
        steps.append(f"forge modelfile --gguf {record['gguf'][-1]['path']}")
    if record.get("modelfile"):
        mf = record["modelfile"]
        steps += [mf["ollama_create"], f"ollama run {mf['model_name']}"]
    return steps


def render_retrospective(record: dict, sid: str) -> str:
    out = [f"# Retrospective — {Path(record['run_dir']).name}", "",
           f"Seal `{sid}`, made {record['created_at']}. Base model `{record.get('base_model')}`, "
           f"method {record.get('method') or '—'}.", ""]
    if record.get("note"):
        out += [f"> {record['note']}", ""]
    ds = record.get("dataset") or {}
    if ds:
        out += [f"Dataset `{ds.get('path')}` ({ds.get('format')}, sha256 `{str(ds.get('sha256'))[:16]}…`): "
                f"{ds.get('train_records')} train / {ds.get('eval_records')} eval records.", ""]
    out += ["## Results", "", results_table(record)]
    parity = record.get("merge_parity")
    if parity:
        out += [f"Merge parity: max |Δlogit| {parity['max_abs_diff']:.3g} (bound {parity['bound']:.3g}, "
                f"{parity['dtype']}).", ""]
    out += ["## Artifacts", "", "| Kind | File | Bytes | sha256 |", "|---|---|---|---|"]
    out += [f"| {a['kind']} | {Path(a['path']).relative_to(record['run_dir']) if a['path'].startswith(record['run_dir']) else a['path']}"
            f" | {a['bytes']} | `{a['sha256'][:16]}…` |" for a in record.get("artifacts", [])]
    out += ["", "## Friction", ""]
    out += [f"- {w}" for w in record.get("warnings", [])] or ["- none recorded"]
    out += ["", "## Next steps", ""]
    out += [f"- `{s}`" for s in next_steps(record)] or ["- nothing left to run"]
    return "\n".join(out) + "\n"
