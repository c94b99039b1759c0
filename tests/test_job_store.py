import sqlite3
import subprocess
import time

import pytest

from forge.errors import ForgeError
from mcp_servers.lib.runner import Runner
from mcp_servers.lib.store import MIGRATIONS, JobStore, Status


def test_a_blank_database_gets_every_migration_in_wal_mode(tmp_path):
    store = JobStore(tmp_path / "forge.db")
    conn = sqlite3.connect(tmp_path / "forge.db")
    names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert store.migrate() == []  # running again applies nothing


def test_an_old_database_is_upgraded_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "forge.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    name, sql = MIGRATIONS[0]
    conn.executescript(sql)
    conn.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
    conn.execute("INSERT INTO jobs (id, kind, status, params, created_at) "
                 "VALUES ('old-1', 'train', 'succeeded', '{}', 1)")
    conn.commit()
    conn.close()
    store = JobStore(path)
    assert store.get("old-1")["status"] == "succeeded"
    assert "cancel_requested_at" not in store.get("old-1") and "parent_id" not in store.get("old-1")
    conn = sqlite3.connect(path)
    assert len(conn.execute("SELECT name FROM _migrations").fetchall()) == len(MIGRATIONS)
    conn.close()


def test_transitions_out_of_order_say_what_was_expected(tmp_path):
    store = JobStore(tmp_path / "forge.db")
    job, created = store.create("train", {"a": 1}, client_request_id="x")
    assert created and job["status"] == "queued"
    assert store.create("train", {"a": 2}, client_request_id="x")[0]["id"] == job["id"]
    store.transition(job["id"], Status.RUNNING)
    store.transition(job["id"], Status.SUCCEEDED)
    with pytest.raises(ForgeError) as info:
        store.transition(job["id"], Status.RUNNING)
    assert info.value.code == "invalid_transition"
    assert "expected a move to nothing (it is final), got running" in info.value.message
    assert [e["data"]["status"] for e in store.events(job["id"])] == ["queued", "running", "succeeded"]


def test_a_running_job_whose_worker_died_becomes_worker_lost_on_restart(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    store = JobStore(tmp_path / "forge.db")
    job, _ = store.create("train", {})
    store.transition(job["id"], Status.RUNNING, pid=dead.pid, heartbeat_at=time.time())
    runner = Runner(home=tmp_path, max_concurrent=1)
    runner.reconcile()
    after = runner.store.get(job["id"])
    assert after["status"] == "failed"
    assert after["error"]["code"] == "worker_lost" and after["error"]["retryable"] is True
    assert "resume_from_job" in after["error"]["hint"]


RESUME_RACER = """
import json, sys, time
from forge.errors import ForgeError
from mcp_servers.lib.store import JobStore
store = JobStore(sys.argv[1])
while time.time() < float(sys.argv[2]):  # both processes insert at the same moment
    pass
try:
    job, _ = store.create("train", {"_resumes": sys.argv[3]})
    print(json.dumps({"job": job["id"]}))
except ForgeError as err:
    print(json.dumps({"code": err.code, "message": err.message}))
"""


def test_two_processes_resuming_one_job_at_once_get_one_run_and_one_refusal(tmp_path):
    import json
    import sys

    JobStore(tmp_path / "forge.db").close()  # migrated before the race
    for attempt in range(5):  # several rounds, a job each: the moment the two meet differs each time
        start, resumed = time.time() + 2.0, f"train-cancelled-{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", RESUME_RACER, str(tmp_path / "forge.db"), str(start),
                                   resumed], stdout=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
        made = [o["job"] for o in outs if "job" in o]
        refused = [o for o in outs if "code" in o]
        assert len(made) == 1 and len(refused) == 1, outs
        assert refused[0]["code"] == "already_resumed" and made[0] in refused[0]["message"], outs
    store = JobStore(tmp_path / "forge.db")
    assert len(store.list(kind="train")) == 5 and store.continued_by("train-cancelled-4") is not None
    store.close()
