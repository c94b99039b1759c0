"""The SQLite job store: the one place job state lives. WAL, a busy timeout, and append-only
named migrations (``migrations``) recorded in a table."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
import uuid
from enum import StrEnum
from pathlib import Path

from forge.store_file import require_healthy
from mcp_servers.lib.errors import ForgeError, JobCodes
from mcp_servers.lib.migrations import MIGRATIONS


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}
ACTIVE = {Status.RUNNING, Status.CANCELLING}  # a worker holds the job
TRANSITIONS = {
    Status.QUEUED: {Status.RUNNING, Status.CANCELLED, Status.FAILED},
    Status.RUNNING: {Status.CANCELLING, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED},
    Status.CANCELLING: {Status.CANCELLED, Status.FAILED, Status.SUCCEEDED},
}

def new_job_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


JSON_COLUMNS = ("params", "progress", "result", "error", "placement")
# What a job's channel may set: its own progress and outcome, never its params, id or placement.
CHANNEL_FIELDS = {"stage", "progress", "heartbeat_at", "pid", "result", "error", "run_dir"}


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        require_healthy(self.path)  # a damaged or empty file is refused before anything touches it
        self.migrate()
        # Held open for the life of the process, so SQLite's -wal and -shm files stay: each query's own
        # connection then needs to create nothing, and reads keep working when the disk is full.
        self._keeper = self.connect()
        self._keeper.execute("SELECT count(*) FROM _migrations").fetchone()  # opened for real: SQLite is lazy

    def close(self) -> None:
        """Let go of the connection held open for the process (SQLite may then tidy -wal and -shm away)."""
        self._keeper.close()

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def migrate(self) -> list[str]:
        """Apply the migrations not yet recorded; return their names."""
        applied = []
        with self._conn() as conn:
            conn.execute("PRAGMA journal_mode=WAL")  # kept in the file: set once, not on every connection
            conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {r["name"] for r in conn.execute("SELECT name FROM _migrations")}
            for name, sql in MIGRATIONS:
                if name in done:
                    continue
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in filter(str.strip, sql.split(";")):
                        conn.execute(statement)
                    conn.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
                    conn.execute("COMMIT")
                except Exception:
                    conn.execute("ROLLBACK")
                    raise
                applied.append(name)
        return applied

    def _conn(self):
        import contextlib

        @contextlib.contextmanager
        def managed():
            conn = self.connect()
            try:
                yield conn
            finally:
                conn.close()

        return managed()

    # ---- jobs ----

    def create(self, kind: str, params: dict, client_request_id: str | None = None, held: bool = False,
               job_id: str | None = None, placement: dict | None = None, run_dir: str | None = None
               ) -> tuple[dict, bool]:
        """Insert a queued job; the same client_request_id returns the existing job (created=False). A ``held``
        job waits outside the queue until its placement is cleared (a sweep, until its trials exist); a job
        given a ``placement`` never enters it (a sweep's trial, with the id the sweep names it by). A job whose
        params say ``_resumes`` is refused when another job already continues that one."""
        with self._conn() as conn:
            # One writer at a time across every server on this FORGE_HOME: look up, then insert, atomically.
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._by_request(conn, kind, client_request_id)
                if row:
                    conn.execute("COMMIT")
                    return self._row(row), False
                if params.get("_resumes"):
                    self._refuse_resumed(conn, params["_resumes"])
                job_id = job_id or new_job_id(kind)
                placement = {"executor": "held"} if held else placement
                conn.execute(
                    "INSERT INTO jobs (id, kind, status, params, client_request_id, created_at, placement, run_dir) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, kind, Status.QUEUED.value, json.dumps(params, default=str), client_request_id,
                     time.time(), json.dumps(placement) if placement else None, run_dir))
                self._event(conn, job_id, "status", {"status": Status.QUEUED.value})
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return self.get(job_id), True

    def continued_by(self, job_id: str) -> str | None:
        """The job that continues ``job_id`` in its run dir (a resume), if one does."""
        with self._conn() as conn:
            return self._continuing(conn, job_id)

    @staticmethod
    def _continuing(conn, job_id: str) -> str | None:
        row = conn.execute("SELECT id FROM jobs WHERE json_extract(params, '$._resumes') = ? ORDER BY created_at "
                           "LIMIT 1", (job_id,)).fetchone()
        return row["id"] if row else None

    def refuse_resumed(self, job_id: str) -> None:
        """Raise already_resumed when another job continues ``job_id`` in its run dir."""
        with self._conn() as conn:
            self._refuse_resumed(conn, job_id)

    def _refuse_resumed(self, conn, job_id: str) -> None:
        """Inside the insert's transaction, so two resumes sent at one moment cannot both pass."""
        continuing = self._continuing(conn, job_id)
        if continuing:
            raise ForgeError(JobCodes.ALREADY_RESUMED, f"train job {job_id} was already resumed: {continuing} "
                             "continues it in the same run dir",
                             f'follow {continuing} (forge_job_status(job_id="{continuing}")); once it has stopped, '
                             f'resume it instead: forge_train(resume_from_job="{continuing}")')

    def by_request(self, kind: str, client_request_id: str | None) -> dict | None:
        """The job a client_request_id already made, so a retried call gets the same job back."""
        with self._conn() as conn:
            row = self._by_request(conn, kind, client_request_id)
        return self._row(row) if row else None

    @staticmethod
    def _by_request(conn, kind: str, client_request_id: str | None):
        if not client_request_id:
            return None
        return conn.execute("SELECT * FROM jobs WHERE kind = ? AND client_request_id = ?",
                            (kind, client_request_id)).fetchone()

    # ---- tasks ----

    def create_task(self, job_id: str, tool: str) -> dict:
        """A new task id (128 random bits, so no one can guess another caller's) for ``job_id``."""
        task = {"id": secrets.token_urlsafe(16), "job_id": job_id, "tool": tool, "created_at": time.time()}
        with self._conn() as conn:
            conn.execute("INSERT INTO tasks (id, job_id, tool, created_at) VALUES (?, ?, ?, ?)",
                         (task["id"], job_id, tool, task["created_at"]))
        return task

    def task(self, task_id: str) -> dict | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return dict(row) if row else None

    def get(self, job_id: str) -> dict:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise ForgeError(JobCodes.JOB_NOT_FOUND, f"no job with id {job_id!r}",
                             "list jobs with forge_job_list to find the id")
        return self._row(row)

    def list(self, status: str | None = None, kind: str | None = None, limit: int = 20,
             before: float | None = None) -> list[dict]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if status:
            sql, args = sql + " AND status = ?", args + [status]
        if kind:
            sql, args = sql + " AND kind = ?", args + [kind]
        if before is not None:
            sql, args = sql + " AND created_at < ?", args + [before]
        sql += " ORDER BY created_at DESC LIMIT ?"
        with self._conn() as conn:
            return [self._row(r) for r in conn.execute(sql, args + [limit])]

    def _in_status(self, statuses: set[Status]) -> list[dict]:
        marks = ", ".join("?" for _ in statuses)
        with self._conn() as conn:
            return [self._row(r) for r in conn.execute(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created_at", [s.value for s in statuses])]

    def queued(self) -> list[dict]:
        """Jobs waiting in Forge's own queue (a job handed to a Ray cluster waits in Ray's instead)."""
        return [j for j in self._in_status({Status.QUEUED}) if not j["placement"]]

    def placed(self, executor: str) -> list[dict]:
        """Unfinished jobs an executor holds, the ones still waiting in its queue included."""
        return [j for j in self._in_status({Status.QUEUED} | ACTIVE)
                if (j["placement"] or {}).get("executor") == executor]

    def active(self) -> list[dict]:
        return self._in_status(ACTIVE)

    def unfinished(self) -> list[dict]:
        """Every job not yet ended: queued here or on a cluster, running, cancelling."""
        return self._in_status({Status.QUEUED, *ACTIVE})

    def require(self, job_id: str, kind: str | tuple[str, ...], finished: bool = True) -> dict:
        """A job of one of ``kind``; by default one that succeeded (its outputs exist)."""
        job = self.get(job_id)
        kinds = (kind,) if isinstance(kind, str) else kind
        if job["kind"] not in kinds:
            raise ForgeError(JobCodes.WRONG_JOB_KIND,
                             f"job {job_id} is a {job['kind']} job, expected {' or '.join(kinds)}",
                             "pass the id of the right kind of job, or a path")
        if finished and job["status"] != Status.SUCCEEDED.value:
            raise ForgeError(JobCodes.JOB_NOT_FINISHED, f"job {job_id} is {job['status']}, not succeeded",
                             "wait for it with forge_job_wait, or pass a path")
        return job

    def transition(self, job_id: str, new: Status, **fields) -> dict:
        """Move a job to ``new``; a move the state machine does not allow raises 'expected X, got Y'."""
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._transition(conn, job_id, new, fields)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return self.get(job_id)

    def _transition(self, conn, job_id: str, new: Status, fields: dict) -> None:
        row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise ForgeError(JobCodes.JOB_NOT_FOUND, f"no job with id {job_id!r}", "check the job id")
        current = Status(row["status"])
        if new not in TRANSITIONS.get(current, set()):
            allowed = sorted(s.value for s in TRANSITIONS.get(current, set())) or ["nothing (it is final)"]
            raise ForgeError(JobCodes.INVALID_TRANSITION,
                             f"job {job_id}: expected a move to {', '.join(allowed)}, got {new.value}",
                             "the job already moved on; read its status")
        fields = {**fields, "status": new.value}
        if new == Status.RUNNING:
            fields.setdefault("started_at", time.time())
        if new in TERMINAL:
            fields.setdefault("finished_at", time.time())
        self._update(conn, job_id, fields)
        self._event(conn, job_id, "status", {"status": new.value, **({"error": fields["error"]}
                                                                    if fields.get("error") else {})})

    def apply(self, job_id: str, ops: list[dict], offset: int) -> None:
        """Apply what a job wrote to its channel (updates, events, moves) and the new read offset, in one
        transaction: a server that dies half-way reads the same lines again, and none twice. A move the
        job no longer may make (it was cancelled while it waited) is skipped."""
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in ops:
                    if set(op.get("fields") or ()) - CHANNEL_FIELDS:
                        continue  # not something a worker writes: skipped, never put into SQL
                    target = op.get("job") or job_id  # a sweep's worker writes its trials' jobs too, no other
                    if target != job_id and not self._trial_of(conn, str(target), job_id):
                        continue
                    if op["op"] == "update":
                        self._update(conn, target, op["fields"])
                    elif op["op"] == "event":
                        self._event(conn, target, op["type"], op["data"])
                    elif op["op"] == "transition":
                        try:
                            self._transition(conn, target, Status(op["status"]), op["fields"])
                        except ForgeError as err:
                            if err.code != JobCodes.INVALID_TRANSITION:
                                raise
                self._update(conn, job_id, {"channel_offset": offset})
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _trial_of(conn, target: str, sweep_id: str) -> bool:
        """Whether ``target`` is a trial job of the sweep ``sweep_id`` (what else a channel line names is skipped)."""
        row = conn.execute("SELECT kind, params FROM jobs WHERE id = ?", (target,)).fetchone()
        return bool(row) and row["kind"] == "trial" and json.loads(row["params"]).get("sweep") == sweep_id

    def update(self, job_id: str, **fields) -> None:
        with self._conn() as conn:
            self._update(conn, job_id, fields)

    def _update(self, conn, job_id: str, fields: dict) -> None:
        if not fields:
            return
        values = [json.dumps(v, default=str) if k in JSON_COLUMNS and v is not None else v for k, v in fields.items()]
        conn.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", values + [job_id])

    # ---- events ----

    def add_event(self, job_id: str, type_: str, data: dict) -> None:
        with self._conn() as conn:
            self._event(conn, job_id, type_, data)

    @staticmethod
    def _event(conn, job_id: str, type_: str, data: dict) -> None:
        conn.execute("INSERT INTO events (job_id, ts, type, data) VALUES (?, ?, ?, ?)",
                     (job_id, time.time(), type_, json.dumps(data, default=str)))

    def events(self, job_id: str, after: int = 0, limit: int = 50, type_: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM events WHERE job_id = ? AND seq > ?", [job_id, after]
        if type_:
            sql, args = sql + " AND type = ?", args + [type_]
        with self._conn() as conn:
            rows = conn.execute(sql + " ORDER BY seq LIMIT ?", args + [limit]).fetchall()
        return [{"seq": r["seq"], "ts": r["ts"], "type": r["type"], "data": json.loads(r["data"])} for r in rows]

    def events_tail(self, job_id: str, limit: int = 40) -> list[dict]:
        """A job's newest events, oldest first."""
        with self._conn() as conn:
            rows = conn.execute("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT ?",
                                (job_id, limit)).fetchall()
        return [{"seq": r["seq"], "ts": r["ts"], "type": r["type"], "data": json.loads(r["data"])} for r in rows[::-1]]

    @staticmethod
    def _row(row: sqlite3.Row) -> dict:
        out = dict(row)
        for key in JSON_COLUMNS:
            if out.get(key) is not None:
                out[key] = json.loads(out[key])
        return out
