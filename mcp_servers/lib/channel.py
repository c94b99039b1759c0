"""A job's channel: how a worker on another machine (a Ray job) and the server talk, through files in
the job's own dir (runs/<job id>/) on storage both see. The job store's SQLite file never leaves the server's machine.

- ``job.json``: the job as the server placed it (kind, params, run dir), written before it starts;
- ``channel.jsonl``: what the worker would have written to the store (updates, events, status moves),
  one JSON line each, applied by the server in order (``JobStore.apply``), the read offset kept in
  the store so a restarted server goes on where it stopped;
- ``kill``: a forced cancel's request; the worker ends its whole process group when it sees it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from forge.paths import open_input, open_output
from forge.workspace import atomic_write_json

JOB_FILE = "job.json"
CHANNEL_FILE = "channel.jsonl"
KILL_FILE = "kill"
READ_LIMIT = 4 << 20  # bytes applied per pass: a long backlog is taken in pieces


def place(own_dir: Path, job: dict) -> None:
    atomic_write_json(Path(own_dir) / JOB_FILE, job)


def request_kill(own_dir: Path) -> None:
    with open_output(Path(own_dir) / KILL_FILE, "kill request"):
        pass


def kill_requested(own_dir: Path) -> bool:
    return (Path(own_dir) / KILL_FILE).is_file()


def read(own_dir: Path, offset: int) -> tuple[list[dict], int]:
    """The complete lines written after ``offset`` and the offset after them (a line still being
    written waits for the next pass). A line that is not JSON is skipped, never fatal."""
    path = Path(own_dir) / CHANNEL_FILE
    if not path.is_file():
        return [], offset
    with open_input(path, "job channel") as fh:  # a link planted in its place is refused
        fh.seek(offset)
        data = fh.read(READ_LIMIT)
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    ops = []
    for line in data[:end].splitlines():
        try:
            op = json.loads(line)
        except ValueError:
            continue
        if isinstance(op, dict) and op.get("op") in ("update", "event", "transition"):
            ops.append(op)
    return ops, offset + end + 1


class ChannelStore:
    """The worker's side of the channel, with the JobStore methods a worker calls."""

    def __init__(self, own_dir: Path):
        self.dir = Path(own_dir)
        self._lock = threading.Lock()  # the heartbeat thread writes too
        self._own: str | None = None

    def get(self, job_id: str | None = None) -> dict:
        return json.loads((self.dir / JOB_FILE).read_text(encoding="utf-8"))

    def _append(self, op: dict) -> None:
        line = (json.dumps(op, default=str) + "\n").encode("utf-8")
        with self._lock, open_output(self.dir / CHANNEL_FILE, "job channel", append=True) as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())  # on a network filesystem the server reads what is on disk

    def _target(self, job_id: str) -> dict:
        """Another job than the channel's own (a sweep's trial) is named in the line."""
        if self._own is None:
            self._own = self.get()["id"]
        own = self._own
        return {} if job_id in (None, own) else {"job": job_id}

    def update(self, job_id: str, **fields) -> None:
        self._append({"op": "update", "fields": fields, **self._target(job_id)})

    def add_event(self, job_id: str, type_: str, data: dict) -> None:
        self._append({"op": "event", "type": type_, "data": data, **self._target(job_id)})

    def transition(self, job_id: str, status, **fields) -> None:
        self._append({"op": "transition", "status": str(status), "fields": fields, **self._target(job_id)})
