"""Seals: what an agent or a person reads next week to know exactly what was trained, from what, how
it went and where every artifact is — and to prove none of it changed since.

A seal covers one or more run dirs. Its record is canonical JSON (sorted keys, compact, UTF-8);
its id is the sha256 of those bytes, tagged ``sha256:…``. Seals chain through ``previous`` and live
in ``$FORGE_HOME/seals/<time>-<short id>/`` (seal.json, retrospective.md, loss_curve.png); nothing is
ever overwritten. Stages leave their results in ``<run dir>/stages/<stage>.json``; the seal re-hashes
every artifact when it is made rather than trusting those records.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import check_path, confined, forge_home, open_input, read_text
from forge.quant_quality import compact
from forge.retrospective import plot_loss_curve, render_retrospective, results_table
from forge.runs import (
    ARTIFACT_GLOBS,
    IMATRIX_SUFFIX,
    STAGES_DIR,
    TRAIN_CONFIG_FILE,
    Outcome,
    load_stages,
    progress_warnings,
    resume_configs,
)
from forge.workspace import artifact, atomic_write_text, sha256_file

SCHEMA = "forge.seal/2"
SEAL_ID = re.compile(r"sha256:[0-9a-f]{64}")
ID_FILE = "seal.sha256"


class SealConfig(StageConfig):
    run_dirs: list[Path] = Field(description="Run dirs the seal covers (each holds stages/*.json).")
    note: str | None = Field(None, description="A note kept in the record.")
    project_dir: Path | None = Field(None, description="A git repo whose commit and dirty state are recorded.")
    jobs: list[dict] = Field(default_factory=list, description="Job records (from the MCP job store) to keep.")


# ---- hashing ----

def canonical_json(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def seal_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- building the record ----

def hub_revision(ref: str | None) -> str | None:
    """The commit a hub model was loaded at, when the local HF cache knows it."""
    if not ref:
        return None
    path = Path(ref)
    if path.is_dir():
        return path.name if path.parent.name == "snapshots" else None
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    refs = Path(constants.HF_HUB_CACHE) / f"models--{ref.replace('/', '--')}" / "refs" / "main"
    return refs.read_text(encoding="utf-8").strip() if refs.is_file() else None


def run_record(run_dir: Path) -> dict:
    run_dir = check_path(run_dir, "run dir") if confined() else Path(run_dir).resolve()
    stages = load_stages(run_dir)
    if not stages:
        raise ForgeError(Codes.SEAL_NOT_FOUND, f"{run_dir} holds no stage results ({STAGES_DIR}/*.json)",
                         "seal a run dir written by forge train / forge pipeline")
    train = stages.get("train", {})
    base_ref = train.get("base_model") or stages.get("merge", {}).get("base_model")
    artifacts = []
    for kind, pattern in ARTIFACT_GLOBS.items():
        artifacts += [artifact(p, kind) for p in sorted(run_dir.glob(pattern))
                      if p.is_file() and (kind == "imatrix" or not p.name.endswith(IMATRIX_SUFFIX))]
    template = next((run_dir / d / "chat_template.jinja" for d in ("merged", "adapter")
                     if (run_dir / d / "chat_template.jinja").is_file()), None)
    configs = {s: r["config"] for s, r in stages.items() if "config" in r}
    if (run_dir / TRAIN_CONFIG_FILE).is_file():
        configs["train"] = json.loads(read_text(run_dir / TRAIN_CONFIG_FILE, "train config"))
    resumes = [json.loads(read_text(p, "resume config")) for p in resume_configs(run_dir)]
    if resumes:  # each resume's own settings, beside the original's
        configs["train_resumes"] = resumes
    warnings = list(dict.fromkeys([w for s in stages.values() for w in s.get("warnings", [])]
                                  + progress_warnings(run_dir)))
    quant = stages.get("quantize", {})
    metrics = train.get("metrics", {})
    return {
        "run_dir": str(run_dir),
        "base_model": {"ref": base_ref, "revision": hub_revision(base_ref),
                       "from_gguf": train.get("base_gguf")},  # a GGUF base: what it was, where it was converted
        "method": train.get("method"),
        "dataset": train.get("dataset"),
        "configs": configs,
        # which record of each stage this seal used (a stage run twice keeps both: stages/<stage>-<n>.json)
        "stages": {s: {"status": r.get("status", Outcome.SUCCEEDED), "error": r.get("error"),
                       "record": r.get("record")} for s, r in stages.items()},
        "metrics": {k: v for k, v in metrics.items() if k not in ("loss_curve", "eval_curve")},
        **({"defaults": train["defaults"]} if train.get("defaults") else {}),  # chosen for the agent, with why
        "loss_curve": metrics.get("loss_curve", []),
        "eval_curve": metrics.get("eval_curve", []),
        "merge_parity": stages.get("merge", {}).get("parity"),
        # the sweep this run won: every trial, the budget, why this one
        "sweep": {k: stages["sweep"].get(k) for k in ("run_dir", "trials", "winner", "why", "budget")}
        if "sweep" in stages else None,
        "evaluation": {k: stages["evaluate"].get(k) for k in ("source", "tokens", "measured_on", "reference",
                                                               "quantization", "table", "samples",
                                                               "stopped_on_its_own", "warnings", "tool_calls",
                                                               "learned", "forgetting", "budget")
                       if k not in ("tool_calls", "learned", "forgetting", "budget") or k in stages["evaluate"]}
        if "evaluate" in stages else None,
        "gguf": [{"quant": o["quant"], "path": o["path"], "generated": o.get("verification", {}).get("generated"),
                  "imatrix": o.get("imatrix"), "quality": compact(o.get("quality"))}
                 for o in quant.get("outputs", [])],
        "quantization": {"measured_on": (quant.get("measured_on") or {}).get("text"),
                         "imatrix": quant.get("imatrix"), "auto": quant.get("auto")} if quant else None,
        "modelfile": {k: stages["modelfile"].get(k) for k in ("path", "template_family", "stop_tokens",
                                                              "ollama_create", "model_name")}
        if "modelfile" in stages else None,
        "lora_gguf": {k: stages["lora_gguf"].get(k) for k in ("lora_gguf", "base_gguf", "verification", "modelfile")}
        if "lora_gguf" in stages else None,
        "chat_template_sha256": sha256_file(template) if template else None,
        "chat_template": train.get("chat_template"),  # the template trained with and where it came from
        "artifacts": artifacts,
        "warnings": warnings,
    }


def git_state(project_dir: Path | None) -> dict | None:
    if project_dir is None:
        return None

    def git(*args):
        return subprocess.run(["git", "-C", str(project_dir), *args], capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"project_dir": str(project_dir), "git": False}
    return {"project_dir": str(Path(project_dir).resolve()), "git": True, "commit": head.stdout.strip(),
            "dirty": bool(git("status", "--porcelain").stdout.strip())}


def seals_dir() -> Path:
    path = forge_home() / "seals"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _chain_lock():
    """One seal at a time per workspace, so two seals never claim the same ``previous``."""
    with open(seals_dir() / ".lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def head_id() -> str | None:
    head = seals_dir() / "HEAD"
    if not head.is_file():
        return None
    found = read_text(head, "seal HEAD").strip()
    return found if SEAL_ID.fullmatch(found) else None


def seal(config: SealConfig) -> dict:
    from forge.env import versions
    from forge.hardware import hardware_summary

    runs = [run_record(d) for d in config.run_dirs]
    if not runs:
        raise ForgeError(Codes.SEAL_NOT_FOUND, "nothing to seal: no run dir given", "pass --run-dir RUN")
    with _chain_lock():
        record = {
            "schema": SCHEMA,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": config.note,
            "previous": head_id(),
            "runs": runs,
            "jobs": config.jobs,
            "git": git_state(config.project_dir),
            "versions": versions(),
            "hardware": hardware_summary(),
            "warnings": list(dict.fromkeys(w for r in runs for w in r["warnings"])),
        }
        data = canonical_json(record)
        sid = seal_id(data)
        target = seals_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{sid.removeprefix('sha256:')[:12]}"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.mkdir(parents=True)
        (tmp / "seal.json").write_bytes(data)
        (tmp / ID_FILE).write_text(sid + "\n", encoding="utf-8")
        retro = render_retrospective(record, sid, plot=plot_loss_curve(record, tmp / "loss_curve.png"))
        (tmp / "retrospective.md").write_text(retro, encoding="utf-8")
        tmp.rename(target)  # nothing is ever overwritten: each seal gets a dir of its own
        atomic_write_text(seals_dir() / "HEAD", sid + "\n")
    for run in runs:  # a convenience copy beside each run; the seal dir holds the sealed one
        atomic_write_text(Path(run["run_dir"]) / "retrospective.md", retro)
    return {"status": Outcome.SUCCEEDED, "seal_id": sid, "seal_dir": str(target),
            "seal_path": str(target / "seal.json"),
            "retrospective_path": str(target / "retrospective.md"), "previous": record["previous"],
            "results_table": results_table(runs[0], record["hardware"]),
            "artifacts": [artifact(target / "seal.json", "seal"),
                          artifact(target / "retrospective.md", "retrospective")]}


# ---- finding and verifying ----

def seal_dirs() -> list[Path]:
    """The seal dirs under $FORGE_HOME/seals, newest first: real directories only, never links."""
    return sorted((d for d in seals_dir().iterdir() if d.is_dir() and not d.is_symlink() and (d / ID_FILE).is_file()),
                  reverse=True)


def _id_of(seal_dir: Path) -> str:
    return read_text(seal_dir / ID_FILE, "seal id").strip()


def find_seal(ref: str | None = None) -> Path:
    """A seal dir by id (sha256:…, its hex, or a prefix of it); the newest seal when ref is None."""
    ref = ref or head_id()
    if not ref:
        raise ForgeError(Codes.SEAL_NOT_FOUND, f"no seal yet in {seals_dir()}", "make one with forge seal create")
    want = ref.removeprefix("sha256:")
    matches = [d for d in seal_dirs() if _id_of(d).removeprefix("sha256:").startswith(want)]
    if len(matches) != 1:
        raise ForgeError(Codes.SEAL_NOT_FOUND,
                         f"{'no' if not matches else len(matches)} seal(s) match {ref!r} in {seals_dir()}",
                         "pass the full id (sha256:…) printed when the seal was made")
    return matches[0]


def verify(ref: str | None = None) -> dict:
    """Re-hash the record and every artifact that still exists, and walk the chain back."""
    mismatches: list[dict] = []
    missing: list[str] = []
    chain: list[str] = []
    seal_dir = find_seal(ref)
    expected = _id_of(seal_dir)
    first = True
    while True:
        with open_input(seal_dir / "seal.json", "seal record") as fh:
            data = fh.read()
        found = seal_id(data)
        if found != expected:
            mismatches.append({"file": str(seal_dir / "seal.json"), "expected": expected, "found": found})
        chain.append(expected)
        record = json.loads(data)
        if first:
            for run in record.get("runs", []):
                for art in run.get("artifacts", []):
                    path = Path(art["path"])
                    if not path.is_file():
                        missing.append(str(path))
                        continue
                    digest = sha256_file(path)
                    if digest != art["sha256"]:
                        mismatches.append({"file": str(path), "expected": art["sha256"], "found": digest})
            first = False
        previous = record.get("previous")
        if not previous:
            break
        try:
            seal_dir = find_seal(previous)
        except ForgeError:
            mismatches.append({"file": f"previous seal {previous}", "expected": previous, "found": "missing"})
            break
        expected = previous
    return {"seal_id": chain[0], "ok": not mismatches, "mismatches": mismatches, "missing": missing,
            "chain": chain, "chain_length": len(chain)}
