"""The job store's schema as append-only named migrations: add one, never edit one. The store records each
it applied in the ``_migrations`` table."""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_jobs_and_events", """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            stage TEXT,
            params TEXT NOT NULL,
            client_request_id TEXT UNIQUE,
            parent_id TEXT,
            run_dir TEXT,
            pid INTEGER,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            heartbeat_at REAL,
            progress TEXT NOT NULL DEFAULT '{}',
            result TEXT,
            error TEXT
        );
        CREATE INDEX jobs_status ON jobs(status, created_at);
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs(id),
            ts REAL NOT NULL,
            type TEXT NOT NULL,
            data TEXT NOT NULL
        );
        CREATE INDEX events_job ON events(job_id, seq);
    """),
    ("0002_job_cancel_force", "ALTER TABLE jobs ADD COLUMN cancel_requested_at REAL;"),
    # Neither column was ever read; parent_id was never written. (SQLite >= 3.35 drops columns.)
    ("0003_drop_unused_columns", """
        ALTER TABLE jobs DROP COLUMN cancel_requested_at;
        ALTER TABLE jobs DROP COLUMN parent_id;
    """),
    # A retry key belongs to one kind of job: the same key for a merge must not return a train job.
    ("0004_request_id_per_kind", """
        CREATE TABLE jobs_new (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            stage TEXT,
            params TEXT NOT NULL,
            client_request_id TEXT,
            run_dir TEXT,
            pid INTEGER,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            heartbeat_at REAL,
            progress TEXT NOT NULL DEFAULT '{}',
            result TEXT,
            error TEXT,
            UNIQUE (kind, client_request_id)
        );
        INSERT INTO jobs_new SELECT id, kind, status, stage, params, client_request_id, run_dir, pid, created_at,
            started_at, finished_at, heartbeat_at, progress, result, error FROM jobs;
        DROP TABLE jobs;
        ALTER TABLE jobs_new RENAME TO jobs;
        CREATE INDEX jobs_status ON jobs(status, created_at);
    """),
    # Where a job runs (null while it waits for Forge's own queue): {"executor": "local"} or, on a Ray
    # cluster, {"executor": "ray", "address": ..., "resources": ...}; and how far the server has read
    # the job's channel file (a Ray job reports through a file on shared storage, never through SQLite).
    ("0005_placement", """
        ALTER TABLE jobs ADD COLUMN placement TEXT;
        ALTER TABLE jobs ADD COLUMN channel_offset INTEGER NOT NULL DEFAULT 0
    """),
    # MCP tasks (the io.modelcontextprotocol/tasks extension): an unguessable task id for a job, one per
    # tools/call that asked for a task; the job is the task's state, so a task outlives the server too.
    ("0006_tasks", """
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs(id),
            tool TEXT NOT NULL,
            created_at REAL NOT NULL
        )
    """),
    # The job that continues a stopped train job in its run dir (params._resumes), found on every status poll
    ("0007_resumes_index", "CREATE INDEX jobs_resumes ON jobs(json_extract(params, '$._resumes'))"),
]
