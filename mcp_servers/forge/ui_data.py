"""What the live view shows, read from the job store and the runs' own records: the job list, one
job's curves, stage timeline, events, log tail and evaluation, the seals with their verify result,
and several runs' loss curves side by side. Read-only: nothing here writes.

Every file read goes through forge.paths under confinement (FORGE_HOME and the allowed roots), like
a tool's: a run dir a job recorded is read only if it still resolves inside them. The web page and
the MCP App both draw from these functions; strings in what they return are data, escaped by
whoever renders them."""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

from forge.errors import ForgeError
from forge.paths import confinement, forge_home, open_input
from forge.runs import PROGRESS_FILE, find_run_dir, load_stages
from mcp_servers.lib import results
from mcp_servers.lib.paths import job_dir
from mcp_servers.lib.store import TERMINAL, JobStore, Status

MAX_POINTS = 2000  # per curve: enough for a chart, bounded for a reply
EVENTS_SHOWN = 40
LOG_LINES = 80
SERIES = ("loss", "eval_loss", "learning_rate", "tokens_per_s")


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value and abs(value) != float("inf") else None


def _base_model(params: dict) -> str | None:
    return params.get("base_model") or params.get("model") or params.get("adapter") or params.get("run_dir")


def _run_name(job: dict) -> str | None:
    where = results.outputs_dir(job) or job["params"].get("output_dir") or (job.get("result") or {}).get("run_dir")
    return Path(where).name if where else None


def job_row(job: dict) -> dict:
    """One line of the job list."""
    progress = job.get("progress") or {}
    return {"id": job["id"], "kind": job["kind"], "status": job["status"], "stage": job.get("stage"),
            "percent": progress.get("percent"), "step": progress.get("step"),
            "total_steps": progress.get("total_steps"), "eta_s": progress.get("eta_s"),
            "loss": _number(progress.get("loss")), "tokens_per_s": progress.get("tokens_per_s"),
            "run_name": _run_name(job), "base_model": _base_model(job["params"]),
            "created_at": job["created_at"], "started_at": job.get("started_at"),
            "finished_at": job.get("finished_at"), "error_code": (job.get("error") or {}).get("code")}


def job_list(store: JobStore | None, limit: int = 100) -> list[dict]:
    return [job_row(j) for j in store.list(limit=limit)] if store else []


# ---- curves: from the run's progress.jsonl while it trains, from the result once it is done ----

class _Tail:
    """A progress.jsonl read incrementally: each poll parses only the lines appended since the last."""

    def __init__(self):
        self.lock = threading.Lock()  # one reader at a time per file; other files are read meanwhile
        self._reset(None)
        self.shown: tuple | None = None  # (what it was computed from, the curves): a poll with nothing new

    def _reset(self, ino) -> None:
        self.ino, self.offset, self.partial = ino, 0, b""
        self.points: dict[str, dict[int, float]] = {name: {} for name in SERIES}

    def read(self, path: Path) -> None:
        with open_input(path, "progress file") as fh:
            stat = os.fstat(fh.fileno())
            if stat.st_ino != self.ino or stat.st_size < self.offset:  # a new or truncated file: start over
                self._reset(stat.st_ino)
            fh.seek(self.offset)
            chunk = fh.read()
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()  # a line still being written waits for the next poll
        for line in lines:
            self._take(line)

    def _take(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict) or not isinstance(event.get("step"), int):
            return
        training = event.get("pipeline_stage") in (None, "train")  # a pipeline's merge has steps of its own
        if event.get("event") == "train_begin" and training:
            # a run resumed from step s, or started again in the same dir: what was logged after s is gone
            for series in self.points.values():
                for step in [s for s in series if s > event["step"]]:
                    del series[step]
        elif event.get("event") == "progress" and training:
            for name in ("loss", "learning_rate", "tokens_per_s"):
                value = _number(event.get(name))
                if value is not None and event["step"] > 0:
                    self.points[name][event["step"]] = value
        elif event.get("event") == "eval" and training and _number(event.get("eval_loss")) is not None:
            self.points["eval_loss"][event["step"]] = float(event["eval_loss"])


TAILS_KEPT = 16  # runs whose progress files are followed at once; the least recently viewed is let go
_tails: OrderedDict[str, _Tail] = OrderedDict()
_tails_lock = threading.Lock()


def _tail_of(path: Path) -> _Tail:
    with _tails_lock:
        tail = _tails.pop(str(path), None) or _Tail()
        _tails[str(path)] = tail
        while len(_tails) > TAILS_KEPT:
            _tails.popitem(last=False)
        return tail


def thin(points: list, limit: int = MAX_POINTS) -> list:
    """Every n-th point and the last one: the shape of a curve in at most about ``limit`` points."""
    if len(points) <= limit:
        return points
    stride = -(-len(points) // limit)
    kept = points[::stride]
    return kept if (len(points) - 1) % stride == 0 else [*kept, points[-1]]


def _thin(points: dict[int, float]) -> list[list[float]]:
    return thin([[step, value] for step, value in sorted(points.items())])


def _run_dir(job: dict) -> Path | None:
    """The run a job trains or works on: a train or pipeline job's output dir (known from the start), or
    the run dir a merge, quantize or evaluate job wrote into."""
    for candidate in filter(None, [results.outputs_dir(job), job["params"].get("output_dir"),
                                   (job.get("result") or {}).get("run_dir")]):
        found = find_run_dir(Path(candidate))
        if found is not None:
            return found
    return results.run_dir_of(job)


def _merged(points: dict[str, dict[int, float]], final: dict) -> dict[str, list[list[float]]]:
    points = {name: dict(series) for name, series in points.items()}
    for point in final.get("loss_curve") or []:  # every logged step, once training ended
        points["loss"][point["step"]] = point["loss"]
    for point in final.get("eval_curve") or []:
        points["eval_loss"][point["step"]] = point["eval_loss"]
    return {name: _thin({s: v for s, v in series.items() if _number(v) is not None}) for name, series in points.items()}


def curves(job: dict) -> dict[str, list[list[float]]]:
    """The job's run: train loss, eval loss, learning rate and tokens/s, as [step, value] pairs."""
    run_dir = _run_dir(job)
    final = (_train_result(job, run_dir) or {}).get("metrics") or {}
    if run_dir is None or not (run_dir / PROGRESS_FILE).is_file():
        return _merged({name: {} for name in SERIES}, final)
    tail = _tail_of(run_dir / PROGRESS_FILE)
    with tail.lock:
        try:
            tail.read(run_dir / PROGRESS_FILE)
        except (ForgeError, OSError):
            return _merged({name: {} for name in SERIES}, final)
        source = (tail.ino, tail.offset, len(final.get("loss_curve") or []), len(final.get("eval_curve") or []))
        if tail.shown is None or tail.shown[0] != source:
            tail.shown = (source, _merged(tail.points, final))
        return tail.shown[1]


def _train_result(job: dict, run_dir: Path | None) -> dict | None:
    result = job.get("result") or {}
    if job["kind"] == "train":
        return result
    if job["kind"] == "pipeline":
        return (result.get("stages") or {}).get("train")
    return _stages(run_dir).get("train")


def _stages(run_dir: Path | None) -> dict[str, dict]:
    if run_dir is None:
        return {}
    try:
        return load_stages(run_dir)
    except (ForgeError, OSError, ValueError):
        return {}


# ---- one job ----

def _timeline(store: JobStore, job: dict) -> list[dict]:
    """When each stage began: status changes and stage events, oldest first."""
    rows = []
    for event in store.events(job["id"], limit=500, type_="status"):
        rows.append({"ts": event["ts"], "what": event["data"].get("status")})
    for event in store.events(job["id"], limit=500, type_="stage"):
        data = event["data"]
        what = ":".join(filter(None, [data.get("pipeline_stage"), data.get("stage")]))
        if rows and rows[-1]["what"] == what:
            continue
        rows.append({"ts": event["ts"], "what": what})
    return sorted(rows, key=lambda r: r["ts"])


def _events(store: JobStore, job_id: str) -> list[dict]:
    newest = store.events_tail(job_id, EVENTS_SHOWN)
    return [{"seq": e["seq"], "ts": e["ts"], "type": e["type"],
             "text": json.dumps({k: v for k, v in e["data"].items() if k != "ts"}, default=str)[:300]}
            for e in newest]


def log_tail(job: dict, lines: int = LOG_LINES) -> str:
    """The end of the job's own log (runs/<job id>/job.log under FORGE_HOME, where the runner writes it)."""
    path = job_dir(forge_home(), job["id"]) / "job.log"
    if not path.is_file():
        return ""
    try:
        with open_input(path, "job log") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - 64_000))
            text = fh.read().decode("utf-8", errors="replace")
    except (ForgeError, OSError):
        return ""
    return "\n".join(text.splitlines()[-lines:])


def evaluation(job: dict, run_dir: Path | None) -> dict | None:
    """The run's evaluate result: the table (base / fine-tuned / each GGUF), tool-call scores, answers."""
    found = (job.get("result") or {}) if job["kind"] == "evaluate" else None
    if job["kind"] == "pipeline":
        found = ((job.get("result") or {}).get("stages") or {}).get("evaluate")
    found = found or _stages(run_dir).get("evaluate")
    if not isinstance(found, dict) or not isinstance(found.get("table"), list):
        return None
    return {"table": found["table"], "tokens": found.get("tokens"), "source": found.get("source"),
            "samples": found.get("samples", []), "tool_calls": found.get("tool_calls"),
            "measured_on": (found.get("measured_on") or {}).get("text"), "quantization": found.get("quantization"),
            "warnings": found.get("warnings", [])}


def job_view(store: JobStore | None, job_id: str) -> dict:
    """Everything the job page draws, in one reply."""
    if store is None:
        store_missing()
    with confinement():
        job = store.get(job_id)
        run_dir = _run_dir(job)
        err = job.get("error")
        return {"job": job_row(job), "progress": job.get("progress") or {},
                "terminal": Status(job["status"]) in TERMINAL,
                "inputs": {k: v for k, v in job["params"].items() if not k.startswith("_") and k != "output_dir"},
                "dataset": (job["params"].get("_dataset") or {}).get("source"),
                "run_dir": str(run_dir) if run_dir else job.get("run_dir"),
                "curves": curves(job), "timeline": _timeline(store, job), "events": _events(store, job_id),
                "log_tail": log_tail(job), "evaluation": evaluation(job, run_dir),
                "artifacts": results.artifacts(job.get("result")), "metrics": results.metrics(job.get("result")),
                "error": {k: err.get(k) for k in ("code", "message", "hint")} if err else None}


def compare(store: JobStore | None, job_ids: list[str]) -> list[dict]:
    """Several runs' train and eval loss, to overlay."""
    if store is None:
        store_missing()
    out = []
    with confinement():
        for job_id in job_ids[:8]:
            job = store.get(job_id)
            series = curves(job)
            out.append({"job": job_row(job), "loss": series["loss"], "eval_loss": series["eval_loss"]})
    return out


def store_missing():
    from forge.errors import Codes

    raise ForgeError(Codes.FILE_NOT_FOUND, "there is no job store in FORGE_HOME yet",
                     "start a job (forge-mcp, or forge pipeline) first")


# ---- seals ----

_verified: dict[str, tuple[tuple, dict]] = {}  # seal id → (what its files looked like, the verify result)
_verify_locks: dict[str, threading.Lock] = {}
_verify_lock = threading.Lock()


def _stat(path: Path) -> tuple | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_size, found.st_mtime_ns, found.st_ino


def _signature(seal_dir: Path, record: dict) -> tuple:
    """What a seal's verify result depends on, as cheap as a stat: its record and every artifact it lists."""
    runs = [r for r in record.get("runs") or [] if isinstance(r, dict)]
    paths = [a.get("path") for r in runs for a in r.get("artifacts") or [] if isinstance(a, dict)]
    return (_stat(seal_dir / "seal.json"), *(_stat(Path(p)) for p in paths if isinstance(p, str)))


def _verify(seal_id: str, signature: tuple) -> dict:
    """A seal's verify result, re-hashed only when one of its files changed (artifacts can be gigabytes, and
    the page asks every second); one poll hashes while the others wait for its result."""
    from forge.seal import verify

    with _verify_lock:
        lock = _verify_locks.setdefault(seal_id, threading.Lock())
    with lock:
        cached = _verified.get(seal_id)
        if cached and cached[0] == signature:
            return cached[1]
        try:
            found = verify(seal_id)
            outcome = {"ok": found["ok"], "mismatches": len(found["mismatches"]), "missing": len(found["missing"]),
                       "chain_length": found["chain_length"]}
        except ForgeError as err:
            outcome = {"ok": False, "error": err.message}
        _verified[seal_id] = (signature, outcome)
        return outcome


def seals(limit: int = 20) -> list[dict]:
    """The newest seals: id, when, what runs they hold, the verify result and the retrospective."""
    from forge.paths import read_text
    from forge.seal import ID_FILE, seal_dirs, seals_dir

    out = []
    with confinement():
        if not seals_dir().is_dir():
            return []
        for seal_dir in seal_dirs()[:limit]:
            try:
                record = json.loads(read_text(seal_dir / "seal.json", "seal record"))
                seal_id = read_text(seal_dir / ID_FILE, "seal id").strip()
                retro = read_text(seal_dir / "retrospective.md", "retrospective") \
                    if (seal_dir / "retrospective.md").is_file() else ""
            except (ForgeError, OSError, ValueError):
                continue
            if not isinstance(record, dict):
                continue
            runs = [r for r in record.get("runs") or [] if isinstance(r, dict)]
            out.append({"seal_id": seal_id, "created_at": record.get("created_at"), "note": record.get("note"),
                        "runs": [Path(str(r.get("run_dir", ""))).name for r in runs],
                        "verify": _verify(seal_id, _signature(seal_dir, record)), "retrospective": retro})
    return out

