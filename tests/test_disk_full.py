"""A full disk, on a real small filesystem as FORGE_HOME (tmpfs): stages refuse to start without room,
a disk that fills mid-stage fails the job promptly as disk_full (path, free, needed), status tools keep
answering, and nothing half-written reaches a final path."""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import anyio
import pytest
from mcp import Client

from forge.errors import Codes, ForgeError
from forge.store_file import check
from helpers import call, stop_runner, wait_job
from mcp_servers.forge.server import create_server

pytestmark = pytest.mark.anyio
MIB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of the asked size; skip where the machine does not allow mounting (not root)."""
    mounts = []

    def make(size_mib: int) -> Path:
        point = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the disk-full cases need one")
        mounts.append(point)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(fs: Path, leave: int = 0) -> Path:
    """Write one file until only ``leave`` bytes are free. Unbuffered: each write reaches the disk or
    raises at once, so a full disk never surfaces later, as the file closes, outside the ``try``."""
    filler = fs / "filler.bin"
    with open(filler, "ab", buffering=0) as fh:
        while (room := shutil.disk_usage(fs).free - leave) > 0:
            try:
                if fh.write(b"\0" * min(room, 8 * MIB)) == 0:
                    break
            except OSError:  # ENOSPC: the disk is as full as it gets
                break
    return filler


@pytest.fixture
def home_on(small_fs, monkeypatch, assets):
    def make(size_mib: int) -> Path:
        home = small_fs(size_mib) / "home"
        monkeypatch.setenv("FORGE_HOME", str(home))
        monkeypatch.setenv("FORGE_MAX_CONCURRENT_JOBS", "1")
        monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["model_dir"]).parent))
        return home

    return make


def assert_disk_full(error: dict, where: Path) -> None:
    assert error["code"] == Codes.DISK_FULL, error
    assert error["retryable"] is True and "free" in error["message"] and "FORGE_HOME" in error["hint"]
    assert any(d.startswith("free_bytes: ") for d in error["details"]), error
    assert str(where) in error["message"] or any(str(where) in d for d in error["details"]), error


async def test_training_without_room_for_its_checkpoints_is_refused_before_it_starts(home_on, assets):
    home = home_on(24)
    server = create_server()
    try:
        async with Client(server) as client:
            handle = await call(client, "forge_train", {"base_model": assets["model_dir"],
                                                        "dataset": assets["dataset"],
                                                        "hyperparameters": {"max_steps": 3}})
            status = await wait_job(client, handle["job_id"], deadline_s=300)
    finally:
        stop_runner(server.runner)
    assert status["status"] == "failed"
    assert_disk_full(status["error"], home)
    assert any(d.startswith("needed_bytes: ") and d != "needed_bytes: None" for d in status["error"]["details"])
    assert not list(home.glob("runs/*/adapter"))


async def test_a_disk_that_fills_mid_training_fails_the_job_promptly_and_status_tools_still_answer(home_on, assets):
    home = home_on(96)  # room for the plan's estimate, then filled while the job trains
    server = create_server()
    try:
        async with Client(server) as client:
            handle = await call(client, "forge_train", {"base_model": assets["model_dir"],
                                                        "dataset": assets["dataset"],
                                                        "hyperparameters": {"max_steps": 400, "save_steps": 5}})
            assert "error" not in handle, handle
            with anyio.fail_after(300):
                while (await call(client, "forge_job_status", {"job_id": handle["job_id"]}))["stage"] != "training":
                    await anyio.sleep(0.2)
            filler = fill(home.parent)
            status = await wait_job(client, handle["job_id"], deadline_s=180)  # promptly: not at a restart
            # While the disk is full, the tools that read keep answering.
            listed = await call(client, "forge_job_list", {})
            events = await call(client, "forge_job_events", {"job_id": handle["job_id"], "limit": 200})
            again = await call(client, "forge_job_status", {"job_id": handle["job_id"]})
            fill(home.parent)  # the job freed the store's reserve to record its failure: fill that too
            submitted = await call(client, "forge_train", {"base_model": assets["model_dir"],
                                                           "dataset": assets["dataset"]})
            filler.unlink()
    finally:
        stop_runner(server.runner)
    assert status["status"] == "failed", status
    assert_disk_full(status["error"], home)
    assert [j["job_id"] for j in listed["jobs"]] == [handle["job_id"]] and events["events"]
    assert again["status"] == "failed"
    assert_disk_full(submitted["error"], home)  # a new job cannot even copy its dataset: a clear refusal
    run_dir = Path(status["run_dir"])
    assert not (run_dir / "adapter").exists()  # nothing half-written reached a final path
    assert not [p for p in (home / "datasets").glob("*") if p.name.startswith(".")]  # no temp copy left
    assert check(home / "forge.db")["ok"]  # the store came through intact


def test_quantizing_without_room_for_the_ggufs_is_refused_with_what_it_needs(small_fs, merged, monkeypatch):
    from forge.quantize import QuantizeConfig, quantize

    out = small_fs(8) / "gguf"
    with pytest.raises(ForgeError) as info:
        quantize(QuantizeConfig(model_dir=merged["merged_dir"], output_dir=out, quantizations=["Q8_0"]))
    error = info.value.to_dict()
    assert_disk_full(error, out)
    assert not list(out.glob("*.gguf"))


def test_a_merge_that_hits_a_full_disk_leaves_no_partial_output(small_fs, trained, monkeypatch):
    from forge import disk
    from forge.failures import error_from
    from forge.merge import MergeConfig, merge

    fs = small_fs(16)
    monkeypatch.setenv(disk.SLACK_ENV, "0")  # room for the weights estimate only: the stage starts, then fills it
    base = Path(merged_base(trained))
    fill(fs, leave=disk.merge_bytes(base, "bfloat16") + 16 * 1024)
    target = fs / "merged"
    with pytest.raises(Exception) as info:  # noqa: B017 - whatever the writer raised must map to disk_full
        merge(MergeConfig(adapter_dir=trained["adapter_dir"], output_dir=target, parity_check=False))
    error = error_from(info.value, near=fs).to_dict()
    assert error["code"] == Codes.DISK_FULL, error
    assert not target.exists() and not [p for p in fs.iterdir() if p.name.startswith(".merged")]


def merged_base(trained) -> str:
    import json

    return json.loads((Path(trained["adapter_dir"]) / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_the_free_space_check_names_the_path_free_and_needed():
    from forge import disk

    with pytest.raises(ForgeError) as info:
        disk.ensure_space(Path("/"), 10**18, "this stage")
    error = info.value.to_dict()
    assert error["code"] == Codes.DISK_FULL and "this stage needs" in error["message"]
    assert any(d.startswith("needed_bytes: ") for d in error["details"])
    assert os.path.sep in error["details"][0]
