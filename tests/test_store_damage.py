"""A damaged job store is refused before anything touches it, and `forge store check` / `recover` say
what can be kept; retry keys are per kind of job and race-free across servers."""

import hashlib
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from forge.cli import main as forge_main
from forge.errors import Codes, ForgeError
from mcp_servers.forge.server import main as server_main
from mcp_servers.lib.store import JobStore


def make_store(home: Path, jobs: int = 30) -> Path:
    store = JobStore(home / "forge.db")
    for i in range(jobs):
        store.create("train", {"n": i, "pad": "x" * 2000}, client_request_id=f"req-{i}")
    store.close()
    conn = sqlite3.connect(store.path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file, as after a clean stop
    conn.close()  # the last connection: SQLite removes -wal and -shm, as after a clean stop
    return store.path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(home: Path) -> dict:
    return {p.name: digest(p) for p in sorted(home.iterdir()) if p.is_file()}


def corrupt_pages(path: Path, pages: tuple[int, ...] = (6, 9)) -> None:
    """Scribble over a few pages in the middle of the file, as a bad sector or a torn write would."""
    data = bytearray(path.read_bytes())
    for page in pages:
        data[page * 4096:page * 4096 + 512] = bytes(range(256)) * 2
    path.write_bytes(bytes(data))


DAMAGE = {
    "zero-length": lambda p: p.write_bytes(b""),
    "not-sqlite": lambda p: p.write_text("these are not the jobs you are looking for\n", encoding="utf-8"),
    "header-garbage": lambda p: p.write_bytes(b"\xff" * 100 + p.read_bytes()[100:]),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3]),
    "scribbled-pages": corrupt_pages,
    "half-a-page": lambda p: p.write_bytes(p.read_bytes()[:1000]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_store_stops_the_server_with_a_clear_message_and_is_left_untouched(home, damage, capsys):
    path = make_store(home)
    DAMAGE[damage](path)
    before = listing(home)
    assert server_main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [store_damaged]: the job store") and "forge store check" in err
    assert "Traceback" not in err
    assert listing(home) == before  # never touched: no migration, no new WAL, no repair attempt


def test_an_empty_file_is_not_silently_taken_for_a_new_store(home):
    (home / "forge.db").parent.mkdir(parents=True, exist_ok=True)
    (home / "forge.db").write_bytes(b"")
    with pytest.raises(ForgeError) as info:
        JobStore(home / "forge.db")
    assert info.value.code == Codes.STORE_DAMAGED and "empty" in info.value.message


def test_store_check_reports_a_healthy_store_and_each_problem_of_a_damaged_one(home, capsys):
    path = make_store(home)
    assert forge_main(["store", "check", "--json"]) == 0
    healthy = json.loads(capsys.readouterr().out)
    assert healthy["ok"] and healthy["tables"]["jobs"] == 30
    corrupt_pages(path)
    assert forge_main(["store", "check", "--json"]) == 1
    damaged = json.loads(capsys.readouterr().out)
    assert not damaged["ok"] and damaged["problems"]


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 shell (Debian: sqlite3) does the recovery")
def test_store_recover_copies_what_can_be_read_to_a_new_file_and_keeps_the_damaged_one(home, capsys):
    path = make_store(home, jobs=40)
    corrupt_pages(path)
    damaged = digest(path)
    assert forge_main(["store", "recover", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    recovered = Path(out["recovered_path"])
    assert digest(path) == damaged and recovered != path and out["ok"]
    rows = out["tables"]["jobs"]
    assert 0 < rows <= 40  # some pages were lost, the rest kept
    store = JobStore(recovered)  # the recovered file is a store the server accepts
    assert len(store.list(limit=100)) == rows
    assert out["next"].startswith("mv ")


def test_a_retry_key_belongs_to_one_kind_of_job(tmp_path):
    store = JobStore(tmp_path / "forge.db")
    train, created = store.create("train", {}, client_request_id="X")
    merge, merge_created = store.create("merge", {}, client_request_id="X")
    again, again_created = store.create("merge", {}, client_request_id="X")
    assert created and merge_created and not again_created
    assert train["id"] != merge["id"] and again["id"] == merge["id"] and merge["kind"] == "merge"


def test_concurrent_duplicates_across_two_stores_get_the_same_job_and_no_error(tmp_path):
    JobStore(tmp_path / "forge.db")
    stores = [JobStore(tmp_path / "forge.db"), JobStore(tmp_path / "forge.db")]  # two servers, one FORGE_HOME
    got, errors = [], []
    barrier = threading.Barrier(20)

    def submit(i):
        try:
            barrier.wait()
            got.append(stores[i % 2].create("train", {"i": i}, client_request_id="same-key")[0]["id"])
        except Exception as exc:  # noqa: BLE001 - the test reports whatever went wrong
            errors.append(repr(exc))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 20 and len(set(got)) == 1
    assert len(stores[0].list(limit=100)) == 1
