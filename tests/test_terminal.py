"""Watching a run from a terminal: `forge train` draws a live bar on a TTY (a real pseudo-terminal) and the
plain lines when piped; `forge watch` follows a job an agent started over MCP to its end; `forge jobs` lists
it; text from data never reaches the terminal as an escape sequence."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import anyio
import pytest

from forge.cli import main
from forge.term import ProgressBar, plain_line, printable
from helpers import call_ok, serving

FORGE = [sys.executable, "-m", "forge.cli"]
CLEAR = "\r\x1b[K"
# A redraw of the train bar: label, stage, bar, step/total, percent, loss, tokens/s, ETA
BAR = re.compile(r"train training [█░]{10,40} (\d+)/(\d+) (\d+)% loss \d+\.\d{4} \d+ tok/s ETA \d+:\d\d")
PLAIN = re.compile(r"  step (\d+)/(\d+) \(\d+%\) epoch \d+\.\d\d loss (None|\d+\.\d{4}) \d+ tok/s eta \d+s")


def _ctrl_c_as_in_a_shell() -> None:
    """Ctrl-C reaches `forge watch` as it does from a shell: SIGINT at its default and not blocked. A child
    inherits an ignored or blocked SIGINT, and after the whole suite this process has one: the watch then
    never saw the Ctrl-C (seen twice in full runs, never alone)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def terminal_env() -> dict:
    """The test's environment as a terminal's: a TERM that erases lines, and the width the pty reports
    (COLUMNS would override it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, "TERM": "xterm-256color"}


def run_in_pty(argv: list[str], deadline_s: float = 300, columns: int = 100) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr; its exit code and everything it
    wrote. The process is ended and reaped whatever happens."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=terminal_env(),
                                close_fds=True)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # the child holds its own copy: reads end (EIO) once it exits
    out = bytearray()
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            assert time.monotonic() < deadline, f"{argv[3:]} still running after {deadline_s} s:\n{out.decode()}"
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: no process holds the terminal any more
                    chunk = b""
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=60), out.decode("utf-8", "replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)


def keep_screen(name: str, out: str) -> None:
    """What the terminal shows at the end (each redraw over the last), to $FORGE_UI_SCREENSHOTS/NAME.txt
    when it is set: the README's terminal view comes from there."""
    where = os.environ.get("FORGE_UI_SCREENSHOTS")
    if not where:
        return
    lines = [line.rstrip("\r").split("\r")[-1].replace("\x1b[K", "") for line in out.split("\n")]
    Path(where).mkdir(parents=True, exist_ok=True)
    (Path(where) / f"{name}.txt").write_text("\n".join(lines).strip("\n") + "\n", encoding="utf-8")


def run_piped(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FORGE, *args], capture_output=True, text=True, timeout=300, env=terminal_env())


def train_args(assets: dict, output_dir: Path, steps: int = 30) -> list[str]:
    return ["train", "--base-model", assets["model_dir"], "--dataset", assets["dataset"], "--output-dir",
            str(output_dir), "--max-steps", str(steps)]


# ---- forge train: a bar on a terminal, the plain lines when piped ----

def test_train_draws_a_bar_redrawn_in_place_on_a_terminal_and_plain_lines_when_piped(assets, tmp_path):
    # the same command twice at once (start-up is most of each run): piped, and on a pseudo-terminal
    piped = subprocess.Popen([*FORGE, *train_args(assets, tmp_path / "piped")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=terminal_env())
    try:
        code, out = run_in_pty([*FORGE, *train_args(assets, tmp_path / "tty")])
        stdout, stderr = piped.communicate(timeout=300)
    finally:
        if piped.poll() is None:
            piped.kill()
        piped.communicate()

    assert code == 0, out
    bars = [m for m in map(BAR.match, out.split(CLEAR)) if m]
    assert bars, out
    assert all(m.group(2) == "30" for m in bars)
    final = max(bars, key=lambda m: int(m.group(1)))
    assert final.group(1) == "30" and final.group(3) == "100"
    assert "░" not in final.group(0)  # full
    assert all(len(m.group(0)) < 100 for m in bars)  # fitted to the terminal's 100 columns: no line wraps
    # stage changes above the bar; the summary on a line of its own after it
    assert f"{CLEAR}  stage: training\r\n" in out
    assert re.search(r"ETA \d+:\d\d\r\nstatus: succeeded\r\n", out), out

    assert piped.returncode == 0, stderr
    steps = [PLAIN.fullmatch(line) for line in stdout.splitlines() if line.startswith("  step ")]
    assert steps and all(steps) and steps[-1].group(1) == steps[-1].group(2) == "30"
    assert "  stage: training\n" in stdout and "status: succeeded" in stdout
    assert "\r" not in stdout and "\x1b" not in stdout and "█" not in stdout


# ---- forge watch and forge jobs: a job an agent started over MCP ----

@pytest.mark.anyio
async def test_forge_watch_follows_a_job_started_over_mcp_to_its_end(home, assets, monkeypatch, capsys):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["model_dir"]).parent))
    async with serving() as client:
        handle = await call_ok(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                       "hyperparameters": {"max_steps": 30}})
        job_id = handle["job_id"]
        code, out = await anyio.to_thread.run_sync(lambda: run_in_pty([*FORGE, "watch", job_id]))
        status = await call_ok(client, "forge_job_status", {"job_id": job_id})
    assert code == 0, out
    keep_screen("terminal", out)
    assert status["status"] == "succeeded"
    assert "  status: running\r\n" in out and "  status: succeeded\r\n" in out  # the job's moves, as lines
    bars = [m for m in (re.match(r"train \S+ [█░]{10,40} (\d+)/(\d+) (\d+)%", p) for p in out.split(CLEAR)) if m]
    assert bars and bars[-1].group(1) == bars[-1].group(2) == "30" and bars[-1].group(3) == "100", out
    assert f"job {job_id}: succeeded\r\n" in out

    capsys.readouterr()
    assert main(["jobs"]) == 0  # the same code in this process: each start of `forge` costs seconds here
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split() == ["JOB", "KIND", "STATUS", "STAGE", "%", "RUN", "CREATED"]
    assert row.split()[:5] == [job_id, "train", "succeeded", "done", "100"]
    assert main(["jobs", "--status", "succeeded", "--json"]) == 0
    assert [j["job_id"] for j in json.loads(capsys.readouterr().out)["jobs"]] == [job_id]
    assert main(["jobs", "--status", "failed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == []

    assert main(["watch", "nope\x1b]0;owned\x07"]) == 2
    missing = capsys.readouterr()
    assert missing.out == "" and missing.err.splitlines() == [
        "error [job_not_found]: no job with id 'nope'",
        "hint: `forge jobs` lists the jobs and their ids; FORGE_HOME must be the server's"]


def test_watch_reports_a_failed_job_and_ctrl_c_leaves_a_job_alone(home, capsys):
    from mcp_servers.lib.store import JobStore, Status

    store = JobStore(home / "forge.db")
    try:
        failed, _ = store.create("merge", {"adapter_dir": "/nowhere"})
        store.transition(failed["id"], Status.RUNNING)
        store.transition(failed["id"], Status.FAILED, error={
            "code": "adapter_not_found", "message": "no adapter in \x1b]0;owned\x07/nowhere", "hint": "train first"})
        queued, _ = store.create("train", {"base_model": "m", "dataset": "d"})

        assert main(["watch", failed["id"]]) == 1
        watched = capsys.readouterr().out
        assert "\x1b" not in watched and watched.splitlines()[-4:] == [
            "  status: failed [adapter_not_found] no adapter in /nowhere", f"job {failed['id']}: failed",
            "error [adapter_not_found]: no adapter in /nowhere", "hint: train first"]
        assert main(["jobs"]) == 0
        rows = [line.split()[:4] for line in capsys.readouterr().out.splitlines()[1:]]
        assert rows == [[queued["id"], "train", "queued", "—"],
                        [failed["id"], "merge", "failed", "(adapter_not_found)"]]

        proc = subprocess.Popen([*FORGE, "watch", queued["id"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=terminal_env(), preexec_fn=_ctrl_c_as_in_a_shell)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 300)  # a deadline, not a read that may never end
            assert ready, "forge watch printed nothing within 300 s"
            assert proc.stdout.readline() == "  status: queued\n"  # following: Ctrl-C now reaches the watch loop
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        assert proc.returncode == 1 and "Traceback" not in err
        assert out.strip() == f"stopped watching; job {queued['id']} is queued (`forge watch {queued['id']}` follows " \
                              "it again)"
        assert store.get(queued["id"])["status"] == "queued"  # the job is untouched
        assert [e["type"] for e in store.events(queued["id"])] == ["status"]
    finally:
        store.close()


def test_forge_jobs_without_a_store_says_so_and_creates_nothing(tmp_path, monkeypatch, capsys):
    home = tmp_path / "never-made"
    monkeypatch.setenv("FORGE_HOME", str(home))
    assert main(["jobs"]) == 0
    assert capsys.readouterr().out.startswith("no jobs yet")
    assert main(["watch", "train-20260101-000000-abcdef"]) == 2
    assert capsys.readouterr().err.startswith("error [job_not_found]: no job with id 'train-20260101-000000-abcdef' "
                                              "(there is no job store")
    assert not home.exists()


def test_a_plugin_that_fails_to_load_leaves_the_other_commands_working(tmp_path, monkeypatch):
    dist = tmp_path / "site" / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text("[forge.cli]\nbroken = no_such_module_here:register\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    listed = run_piped("jobs")
    assert listed.returncode == 0 and listed.stdout.startswith("no jobs yet")
    assert "warning: the forge.cli plugin 'broken' (no_such_module_here:register) failed to load: " \
           "ModuleNotFoundError" in listed.stderr


# ---- what reaches the terminal ----

def test_printable_removes_escape_sequences_and_control_characters():
    assert printable("\x1b]0;owned\x07title") == "title"  # OSC (window title), ended by BEL
    assert printable("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ end") == "link end"  # OSC 8 hyperlink, ended by ST
    assert printable("\x1b[31mred\x1b[0m \x1b[2J\x1b[1;1H") == "red "  # colours, clear screen, cursor moves
    assert printable("\x9b31mC1\x9d0;t\x9c!") == "C1!"  # the 8-bit forms
    assert printable("\x1bcreset \x1b") == "reset "  # two-byte ESC sequences, a trailing ESC
    assert printable("a\nb\r\tc") == "a b  c"  # one line: breaks and tabs as spaces
    assert printable("nul\x00 bel\x07 del\x7f bs\x08") == "nul? bel? del? bs?"
    assert printable("\u202eevil\u2066") == "evil"  # bidi overrides that reorder what is shown
    assert printable("lone \ud800") == "lone ?"  # would not even encode
    assert printable("héllo █ 日本 🙂") == "héllo █ 日本 🙂"
    assert printable("x" * 10, limit=5) == "xxxx…"


def test_the_bar_writes_no_escape_sequence_of_the_data(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    stream = io.StringIO()
    with ProgressBar(stream, label="train", tty=True) as bar:
        bar({"event": "stage", "stage": "\x1b]0;owned\x07training"})
        bar({"event": "warning", "message": "template \x1b[2Jsays\nhi"})
        bar({"event": "progress", "step": 5, "total_steps": 10, "percent": 50.0, "loss": 1.5, "tokens_per_s": 10.0,
             "eta_s": 65.0, "epoch": 0.5})
    out = stream.getvalue()
    assert out.replace(CLEAR, "").count("\x1b") == 0 and "\x07" not in out
    assert "  warning: template says hi\n" in out
    assert out.endswith("train training ████████████████████░░░░░░░░░░░░░░░░░░░░ 5/10 50% loss 1.5000 10 tok/s "
                        "ETA 1:05\n")


def test_plain_lines_keep_the_format_scripts_parse():
    assert plain_line({"event": "progress", "step": 3, "total_steps": 30, "percent": 10.0, "epoch": 0.214,
                       "loss": None, "tokens_per_s": 812.4, "eta_s": 41.6}) == \
        "  step 3/30 (10%) epoch 0.21 loss None 812 tok/s eta 42s"
    assert plain_line({"event": "stage", "stage": "merging", "pipeline_stage": "merge"}) == "  [merge] stage: merging"
    assert plain_line({"event": "progress", "percent": 97.0, "pipeline_stage": "seal"}) == "  [seal] progress (97%)"
    assert plain_line({"event": "eval", "eval_loss": 1.0}) is None


def test_the_bar_fits_a_narrow_terminal():
    bar = ProgressBar(io.StringIO(), label="pipeline", tty=True)
    bar({"event": "progress", "step": 120, "total_steps": 400, "percent": 30.0, "loss": 1.2345,
         "tokens_per_s": 812.0, "eta_s": 3725.0, "pipeline_stage": "train"})
    assert bar.line(120) == ("train ████████████░░░░░░░░░░░░░░░░░░░░░░░░░░░░ 120/400 30% loss 1.2345 812 tok/s "
                             "ETA 1:02:05")
    assert len(bar.line(40)) == 39 and bar.line(40).endswith("…")
