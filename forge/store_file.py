"""The job store's file (``$FORGE_HOME/forge.db``) checked and recovered from outside the job system:
``forge store check`` and ``forge store recover``. SQLite's own tools do the work: ``PRAGMA
integrity_check`` on a read-only connection, and the ``sqlite3`` shell's ``.recover``. Neither ever
writes to the file it examines; a recovery goes to a new file.

The MCP server runs the same check before it opens the store and refuses to start on a damaged one.
"""

from __future__ import annotations

import shlex
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from pydantic import Field

from forge.config import StageConfig
from forge.errors import Codes, ForgeError
from forge.paths import forge_home

NOT_SQLITE = "the file does not start with SQLite's header: it is not an SQLite database"
STORE_NAME = "forge.db"


class StoreConfig(StageConfig):
    path: Path | None = Field(None, description="The store file; default $FORGE_HOME/forge.db.")
    output: Path | None = Field(None, description="recover: where the recovered store goes; default "
                                                  "<store>.recovered-<time>.db beside it.")


def store_path(path: Path | None = None) -> Path:
    return Path(path) if path else forge_home() / STORE_NAME


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot change anything. Without a -wal/-shm beside the file (no other connection
    open, no unclean stop) it is opened immutable, so SQLite does not even create those files."""
    live = any(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-shm"))
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro{'' if live else '&immutable=1'}", uri=True,
                           timeout=30)


def _sql_of(shell: str, path: Path) -> str:
    """SQL that rebuilds what SQLite can read of a damaged file: ``.recover`` where the shell was built with
    it, else ``.dump``, which skips what it cannot read and would end in a rollback; that is turned into a
    commit so that what was read is kept."""
    recovered = subprocess.run([shell, str(path.resolve()), ".recover"], capture_output=True, text=True,
                               errors="replace")
    if recovered.returncode == 0 and "error" not in recovered.stderr.lower() and recovered.stdout.strip():
        return recovered.stdout
    dumped = subprocess.run([shell, str(path.resolve()), ".dump"], capture_output=True, text=True,
                            errors="replace")
    text = dumped.stdout.rstrip()
    if text.endswith("ROLLBACK; -- due to errors"):
        text = text[: -len("ROLLBACK; -- due to errors")] + "COMMIT;"
    if "CREATE TABLE" not in text:
        raise ForgeError(Codes.STORE_DAMAGED, f"SQLite could not read any table of {path}: "
                         f"{(dumped.stderr or recovered.stderr).strip()[-300:]}",
                         "nothing can be kept: delete the file to start a new store")
    return text + "\n"


def _table_rows(conn: sqlite3.Connection) -> dict[str, int | str]:
    rows: dict[str, int | str] = {}
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
        try:
            rows[name] = conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
        except sqlite3.DatabaseError as exc:
            rows[name] = f"unreadable: {exc}"
    return rows


def check(path: Path | None = None) -> dict:
    """What is wrong with the store file, if anything; never writes to it."""
    path = store_path(path)
    report: dict = {"path": str(path), "exists": path.is_file(), "ok": True, "problems": [], "tables": {}}
    if not path.is_file():
        return report  # no store yet: the server creates one
    report["bytes"] = path.stat().st_size
    # Only SQLite opens the file: closing any descriptor of it would drop every POSIX lock this process
    # holds on it, the locks of another store open in the same process included.
    if report["bytes"] == 0:
        report["problems"].append("the file is empty (0 bytes): it is not a job store, and an empty store "
                                  "would silently forget every job")
    else:
        try:
            conn = _read_only(path)
            try:
                found = [r[0] for r in conn.execute("PRAGMA integrity_check")]
                if found != ["ok"]:
                    report["problems"] += [f"integrity_check: {line}" for line in found[:50]]
                report["tables"] = _table_rows(conn)
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            report["problems"].append(NOT_SQLITE if "not a database" in str(exc) else f"SQLite cannot read it: {exc}")
    report["ok"] = not report["problems"]
    return report


def require_healthy(path: Path | None = None) -> None:
    """Refuse (with what to do) a store file that is damaged or empty; a missing one is fine."""
    report = check(path)
    if not report["ok"]:
        raise ForgeError(
            Codes.STORE_DAMAGED, f"the job store {report['path']} is damaged: " + "; ".join(report["problems"][:3]),
            f"nothing was changed. Run `forge store check --path {report['path']}` for the details and "
            f"`forge store recover --path {report['path']}` to copy what can be read to a new file; then move "
            "the damaged file aside and the recovered one into its place (or delete the file to start afresh)",
            details=report["problems"])


def recover(path: Path | None = None, output: Path | None = None) -> dict:
    """Copy whatever SQLite can still read into a new store file; the damaged file is left as it is."""
    path = store_path(path)
    if not path.is_file():
        raise ForgeError(Codes.FILE_NOT_FOUND, f"no store file at {path}", "pass --path to the store to recover")
    target = Path(output) if output else path.with_name(f"{path.stem}.recovered-{time.strftime('%Y%m%d-%H%M%S')}.db")
    if target.exists():
        raise ForgeError(Codes.OUTPUT_EXISTS, f"{target} already exists", "pass another --output")
    shell = shutil.which("sqlite3")
    if shell is None:
        raise ForgeError(Codes.INTERNAL, "the sqlite3 shell is not installed, and its .recover does the recovery",
                         "install it (Debian: apt-get install sqlite3), then run this again")
    if path.stat().st_size == 0:
        raise ForgeError(Codes.STORE_DAMAGED, f"{path} is empty: there is nothing to recover",
                         "delete the empty file; the server then starts a new store")
    sql = _sql_of(shell, path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    load = subprocess.run([shell, str(tmp)], input=sql, capture_output=True, text=True)
    if load.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ForgeError(Codes.STORE_DAMAGED, f"the recovered data would not load: {load.stderr.strip()[-300:]}",
                         "delete the file to start a new store")
    tmp.replace(target)
    after = check(target)
    return {"status": "succeeded", "path": str(path), "recovered_path": str(target), "tables": after["tables"],
            "ok": after["ok"],
            "next": f"mv {shlex.quote(str(path))} {shlex.quote(f'{path}.damaged')} && "
                    f"mv {shlex.quote(str(target))} {shlex.quote(str(path))}"}
