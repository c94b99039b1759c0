"""What a job left behind, read from its stored result: artifacts, metrics, the GGUF it made, its run
dir, a pipeline's stage states, what a seal keeps of it, and what an agent usually calls next.

Tools ask this module; they never dig through result dicts themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from forge.errors import Codes, ForgeError
from forge.paths import check_path, check_tree, forge_home
from forge.runs import STAGES, STAGES_DIR, find_run_dir
from mcp_servers.lib.errors import JobCodes
from mcp_servers.lib.paths import job_dir
from mcp_servers.lib.store import ACTIVE, JobStore, Status

JOB_KINDS = ("train", "merge", "quantize", "lora_gguf", "evaluate", "pipeline", "publish", "sweep")
# a sweep's trials: the sweep's id and the trial's name, e.g. sweep-20261206-101500-3f9a1c-t2
JOB_ID = re.compile(rf"(?:{'|'.join(JOB_KINDS)})-\d{{8}}-\d{{6}}-[0-9a-f]{{6}}"
                    rf"|sweep-\d{{8}}-\d{{6}}-[0-9a-f]{{6}}-t\d{{1,2}}")
ARTIFACT_KEYS = ("kind", "path", "bytes", "sha256")
CURVES = ("loss_curve", "eval_curve")


def is_job_id(ref: str) -> bool:
    return bool(JOB_ID.fullmatch(ref))


# ---- reading a result ----

def artifacts(result: dict | None) -> list[dict]:
    """Every artifact of a job, a pipeline's child stages included."""
    if not result:
        return []
    items = list(result.get("artifacts", []))
    for stage in (result.get("stages") or {}).values():
        items += stage.get("artifacts", [])
    return [{k: a[k] for k in ARTIFACT_KEYS} for a in items]


def metrics(result: dict | None) -> dict:
    """A train job's metrics (or a pipeline's train stage's), without the curves."""
    if not result:
        return {}
    found = result.get("metrics") or (result.get("stages") or {}).get("train", {}).get("metrics") or {}
    return {k: v for k, v in found.items() if k not in CURVES}


QUALITY_KEYS = ("kld_mean", "kld_p99", "same_top_pct", "delta_ppl", "bpw", "bytes", "imatrix")
QUALITY_ROWS = 8


def quality(result: dict | None) -> dict | None:
    """What each quant lost against the f16, compact: the evaluate table's GGUF rows (else the quantize stage's
    own measurements), what they were measured on, the importance matrix and auto's choice in words."""
    if not result:
        return None
    stages = result.get("stages") or {}
    evaluated = result if "table" in result else stages.get("evaluate")
    quantized = result if "outputs" in result and "gguf_dir" in result else stages.get("quantize")
    rows, basis = [], None
    if evaluated:
        rows = [{"model": r["model"], **{k: r[k] for k in QUALITY_KEYS if k in r}}
                for r in evaluated.get("table", []) if "kld_mean" in r]
        basis = (evaluated.get("measured_on") or {}).get("text")
    elif quantized:
        rows = [{"model": f"{o['quant']} GGUF", **{k: o["quality"].get(k) for k in QUALITY_KEYS[:-1]},
                 "imatrix": o.get("imatrix")} for o in quantized.get("outputs", []) if o.get("quality")]
        basis = (quantized.get("measured_on") or {}).get("text")
    if not rows:
        return None
    out: dict = {"measured_on": basis, "rows": rows[:QUALITY_ROWS]}
    matrix = (quantized or {}).get("imatrix") or ((evaluated or {}).get("quantization") or {}).get("imatrix") or {}
    compared = matrix.get("comparison")
    if matrix.get("used"):
        out["imatrix"] = (f"computed from the {matrix.get('source')} ({matrix.get('tokens')} tokens)"
                          if matrix.get("setting") == "auto" else f"given: {matrix.get('path')}")
        if compared:
            out["imatrix"] += (f"; {compared['quant']} mean KLD {compared['with']['kld_mean']} with it, "
                               f"{compared['without']['kld_mean']} without; kept: {compared.get('kept')}")
    auto = (quantized or {}).get("auto") or ((evaluated or {}).get("quantization") or {}).get("auto")
    if auto:
        out["chosen"] = auto.get("why")
    return out


def last_gguf(result: dict) -> str:
    """The last GGUF a quantize or pipeline job wrote (the most quantized one)."""
    outputs = result.get("outputs") or (result.get("stages") or {}).get("quantize", {}).get("outputs")
    if not outputs:
        raise ForgeError(JobCodes.JOB_NOT_FINISHED, "that job produced no GGUF",
                         "pass a quantize or pipeline job id, or a .gguf path")
    return outputs[-1]["path"]


# What each job kind's result holds, by the thing a later tool asks for.
OUTPUTS: dict[str, tuple[tuple[str, ...], Callable[[dict], str]]] = {
    # a sweep gives its winner's adapter, a trial its own
    "adapter": (("train", "trial", "sweep"), lambda r: r.get("adapter_dir") or _winner(r, "adapter")),
    "merged": (("merge",), lambda r: r["merged_dir"]),
    "gguf_dir": (("quantize", "pipeline", "sweep"), lambda r: r.get("gguf_dir") or _stage_output(r, "gguf_dir")),
    "gguf": (("quantize", "lora_gguf", "pipeline", "sweep"), last_gguf),  # a sweep's: its carried winner's
}


def _stage_output(result: dict, key: str) -> str:
    found = ((result.get("stages") or {}).get("quantize") or {}).get(key)
    if not found:
        raise ForgeError(JobCodes.JOB_NOT_FINISHED, "that job made no GGUF (a sweep makes one with carry_through)",
                         "quantize its output first, or pass a quantize or pipeline job id")
    return found


def _winner(result: dict, sub: str) -> str:
    if not result.get("winner_run_dir"):
        raise ForgeError(JobCodes.JOB_NOT_FINISHED, "that sweep kept no winner: no trial finished within the "
                         "forgetting budget", "read the sweep's table (forge_job_status) and pass a trial's id")
    return str(Path(result["winner_run_dir"]) / sub)


def resolve_input(store: JobStore, ref: str, output: str, what: str) -> Path:
    """The one path-or-job-id resolver: a job id (``train-20261126-101500-3f9a1c``) gives the
    ``output`` its result holds; anything else is a path, checked against the allowed roots."""
    if is_job_id(ref):
        kinds, pick = OUTPUTS[output]
        path = check_path(pick(store.require(ref, kinds)["result"]), what)
    else:
        path = check_path(ref, what)
    if not path.exists():
        raise ForgeError(Codes.FILE_NOT_FOUND, f"{what} {ref} does not exist ({path})",
                         "pass an existing path, or the id of a job that made it")
    return check_tree(path, what) if path.is_dir() else path


def run_dir_of(job: dict) -> Path | None:
    """The run dir a job's outputs live in (merge and quantize write into their train run's dir)."""
    result = job.get("result") or {}
    candidates = [result.get("run_dir"), result.get("merged_dir"), result.get("gguf_dir"),
                  job["params"].get("output_dir")]
    for candidate in filter(None, candidates):
        found = find_run_dir(Path(candidate))
        if found is not None and (found / STAGES_DIR).is_dir():
            return found
    return None


def outputs_dir(job: dict, home: Path | None = None) -> str | None:
    """Where a job's outputs go: the store's run_dir. A row written before run_dir meant that holds the job's own
    dir there (runs/<job id>: its log only); for it, the run the job wrote into."""
    run_dir = job.get("run_dir")
    if run_dir != str(job_dir(home or forge_home(), job["id"])):
        return run_dir
    if job["kind"] in ("train", "pipeline", "sweep"):
        return job["params"].get("output_dir") or run_dir
    found = run_dir_of(job)
    return str(found) if found else run_dir


CHAIN_KINDS = ("train", "merge", "quantize", "lora_gguf", "evaluate", "pipeline")


def latest_chain(store: JobStore, window: int = 200) -> list[dict]:
    """The newest finished chain: the run dir of the job that succeeded last (train, merge, quantize or
    pipeline), with every succeeded job that wrote into it, oldest first."""
    done = [j for j in store.list(status=Status.SUCCEEDED.value, limit=window) if j["kind"] in CHAIN_KINDS]
    newest = max(done, key=lambda j: j.get("finished_at") or 0, default=None)
    run_dir = run_dir_of(newest) if newest else None
    if run_dir is None:
        raise ForgeError(JobCodes.JOB_NOT_FOUND, "there is no finished train, merge, quantize or pipeline job to seal",
                         "run one first, or pass job_ids")
    return sorted((j for j in done if run_dir_of(j) == run_dir), key=lambda j: j["created_at"])


def pipeline_stages(job: dict, finished: dict[str, str]) -> list[dict]:
    """Each child stage of a pipeline job with its state; ``finished`` maps stage → final status."""
    if job["kind"] != "pipeline":
        return []
    current = (job.get("stage") or "").split(":")[0]
    status = Status(job["status"])
    states = []
    for stage in STAGES:
        if stage in finished:
            state = finished[stage]
        elif stage == current and status in ACTIVE:
            state = Status.RUNNING.value
        elif stage == current and status in (Status.FAILED, Status.CANCELLED):
            state = status.value
        else:
            state = "pending"
        states.append({"stage": stage, "status": state})
    return states


def seal_record(job: dict, warnings: list[str]) -> dict:
    """What a seal keeps of a job: identity, inputs, outcome, and the warnings it met."""
    return {"id": job["id"], "kind": job["kind"], "status": job["status"], "params": job["params"],
            "created_at": job["created_at"], "finished_at": job.get("finished_at"), "error": job.get("error"),
            "warnings": warnings}


def next_actions(job: dict, continued_by: str | None = None) -> list[str]:
    """The tool calls an agent usually makes next, ready to send; a stopped train job another job already
    continues (``continued_by``) points at that job, never at a second resume."""
    jid, kind, status = job["id"], job["kind"], Status(job["status"])
    if status == Status.SUCCEEDED and kind == "sweep":
        result = job.get("result") or {}
        if ((result.get("stages") or {}).get("quantize") or {}).get("outputs"):  # carried through to a GGUF
            return [f'forge_query_model(model="{jid}", prompt="Hello")']
        return [f'forge_merge(adapter="{jid}")'] if result.get("winner") else [f'forge_job_events(job_id="{jid}")']
    if status == Status.SUCCEEDED:
        return {
            "trial": [f'forge_merge(adapter="{jid}")'],
            "train": [f'forge_merge(adapter="{jid}")'],
            "merge": [f'forge_quantize(model="{jid}")'],
            "quantize": [f'forge_evaluate(run="{jid}")', f'forge_modelfile(gguf="{jid}")',
                         f'forge_query_model(model="{jid}", prompt="Hello")', "forge_seal_snapshot()"],
            "evaluate": ["forge_seal_snapshot()"],
            "lora_gguf": ["forge_seal_snapshot()"],
            # a pipeline sealed its run already: what is left is trying the model and sharing it
            "pipeline": [f'forge_query_model(model="{jid}", prompt="Hello")',
                         f'forge_publish(source="{jid}", repo_id="OWNER/NAME", kind="gguf", dry_run=true)'],
        }.get(kind, [])
    if status in ACTIVE or status == Status.QUEUED:
        return [f'forge_job_wait(job_id="{jid}")']
    if kind == "train" and continued_by:
        return [f'forge_job_status(job_id="{continued_by}")']
    if kind == "train":
        return [f'forge_train(resume_from_job="{jid}")', f'forge_job_events(job_id="{jid}")']
    return [f'forge_job_events(job_id="{jid}")']
