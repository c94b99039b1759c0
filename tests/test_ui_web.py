"""The live view in a real browser (Debian's headless Chromium, driven by Playwright): `forge-mcp --transport
http` serving /ui off loopback behind its token, a pipeline that trained, quantized, evaluated and sealed on a
dataset whose answers carry markup, and a training job that runs while the page watches it.

Screenshots of each view go to $FORGE_UI_SCREENSHOTS when it is set (the README's come from there)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from helpers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "ui-test-token-7f3a"
CHROMIUM = "/usr/bin/chromium"
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


class Site:
    """The server process, an MCP client's calls to it (over HTTP, with the token), and its URLs."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FORGE_HOME": str(home), "FORGE_MCP_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
               "FORGE_MCP_ALLOWED_HOSTS": "127.0.0.1,localhost", "FORGE_MAX_CONCURRENT_JOBS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mcp_servers.forge.server", "--transport", "http",
                                      "--host", "0.0.0.0", "--port", str(self.port)], env=env, cwd=str(ROOT))

    def wait_up(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the server exited"
            try:
                httpx.get(self.base + "/ui/", timeout=30)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("the server did not answer within 300 s")

    def call(self, name: str, arguments: dict) -> dict:
        """One tool call through the official Python SDK client, over streamable HTTP with the bearer token (in a
        thread of its own: Playwright's sync API keeps an event loop running in the test's thread)."""
        from concurrent.futures import ThreadPoolExecutor

        import anyio

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(anyio.run, self._call, name, arguments).result()

    async def _call(self, name: str, arguments: dict) -> dict:
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        auth = httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=httpx.Timeout(30, read=300))
        async with auth, Client(streamable_http_client(self.base + "/mcp", http_client=auth)) as client:
            result = await client.call_tool(name, arguments)
        assert not result.is_error, result.content[0].text
        return result.structured_content

    def status(self, job_id: str) -> dict:
        return self.call("forge_job_status", {"job_id": job_id})

    def wait(self, job_id: str, deadline_s: float = 900) -> dict:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            status = self.call("forge_job_wait", {"job_id": job_id, "timeout_s": 20})
            if status["status"] in ("succeeded", "failed", "cancelled"):
                return status
        raise AssertionError(f"{job_id} did not end within {deadline_s} s")

    def close(self) -> None:
        """Cancel what still runs (its worker outlives the server by design), then stop the server."""
        try:
            if self.proc.poll() is None:
                for job in self.call("forge_job_list", {"limit": 50})["jobs"]:
                    if job["status"] in ("queued", "running", "cancelling"):
                        self.call("forge_job_cancel", {"job_id": job["job_id"], "force": True})
                        self.wait(job["job_id"], 120)
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def hostile_dataset(source: Path, target: Path) -> Path:
    lines = []
    for line in source.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        record["output"] = f"{record['output']} {HOSTILE}"
        lines.append(json.dumps(record))
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("ui_home"))
    try:
        site.wait_up()
        assets = site.call("forge_demo_assets", {})
        site.assets = assets
        dataset = hostile_dataset(Path(assets["dataset"]), site.home / "hostile.jsonl")
        piped = site.call("forge_pipeline", {"base_model": assets["model_dir"], "dataset": str(dataset),
                                             "run_name": "first-run",
                                             "hyperparameters": {"num_train_epochs": 2, "learning_rate": 2e-3}})
        site.pipeline = site.wait(piped["job_id"])
        assert site.pipeline["status"] == "succeeded", site.pipeline
        second = site.call("forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                           "run_name": "second-run", "hyperparameters": {"max_steps": 20}})
        assert site.wait(second["job_id"])["status"] == "succeeded"
        site.second = second["job_id"]
        yield site
    finally:
        site.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is not installed: run `make test`, which installs Debian's chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{site.base}/ui/?token={TOKEN}")  # the cookie the page then keeps
    page.errors = errors
    try:
        yield page
    finally:
        context.close()
    assert errors == [], errors


def shot(page, name: str, at: str | None = None) -> None:
    """The page (the window from ``at`` down, when given) to $FORGE_UI_SCREENSHOTS/NAME.png, if set."""
    where = os.environ.get("FORGE_UI_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        if at:
            page.evaluate("sel => window.scrollTo(0, document.querySelector(sel).getBoundingClientRect().top"
                          " + window.scrollY - 10)", at)
        # the bytes, written here: given a path, Playwright writes it from a thread of its event loop's executor,
        # which outlives the test
        (Path(where) / f"{name}.png").write_bytes(page.screenshot(full_page=at is None))


def test_off_loopback_the_page_and_its_data_refuse_without_the_token(site, browser):
    context = browser.new_context()
    try:
        page = context.new_page()
        assert page.goto(f"{site.base}/ui/").status == 401
        assert page.goto(f"{site.base}/ui/api/jobs").status == 401
        assert page.goto(f"{site.base}/ui/?token=wrong").status == 401
        assert context.cookies() == []
        assert page.goto(f"{site.base}/ui/?token={TOKEN}").status == 200  # redirected to /ui/, the cookie set
        assert "token" not in page.url
        page.wait_for_selector("#jobs tr[data-job]")
    finally:
        context.close()
    with_header = httpx.get(f"{site.base}/ui/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert with_header.status_code == 200 and with_header.json()["jobs"]
    other_host = httpx.get(f"{site.base}/ui/api/jobs", headers={"Authorization": f"Bearer {TOKEN}",
                                                                 "Host": f"evil.example:{site.port}"})
    assert other_host.status_code == 421
    posted = httpx.post(f"{site.base}/ui/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert posted.status_code == 405  # the view changes nothing
    # only the page's own files, by name: the dots are sent encoded, as a client that does not tidy a URL would
    for name in ("%2e%2e%2fserver.py", "..%2f..%2fui_web.py", "vendor%2fLICENSE", "index.html"):
        served = raw_get(site.port, f"/ui/static/{name}", {"Authorization": f"Bearer {TOKEN}"})
        assert served == 404, name
    assert raw_get(site.port, "/ui/?token=%E2%82%AC", {}) == 401  # not Latin-1, and wrong: no error of ours
    hostile = raw_get(site.port, "/ui/?token=a%0d%0aX-Evil:%201", {"Authorization": f"Bearer {TOKEN}"})
    assert hostile == 303  # redirected, the cookie derived from the real token: nothing of the URL in a header


def raw_get(port: int, target: str, headers: dict) -> int:
    """GET exactly this request target (no client library to tidy it); the status."""
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        reply = sock.recv(65536)
    assert b"X-Evil" not in reply.split(b"\r\n\r\n")[0]
    return int(reply.split(b" ", 2)[1])


def percent_of(page, job_id: str) -> float:
    return float(page.get_attribute(f'#jobs tr[data-job="{job_id}"] .bar', "data-percent"))


def points_of(page, chart: str) -> int:
    return int(page.get_attribute(f'[data-chart="{chart}"]', "data-points"))


def test_a_running_job_s_progress_bar_advances_and_its_loss_curve_gains_points(site, page):
    handle = site.call("forge_train", {"base_model": site.assets["model_dir"], "dataset": site.assets["dataset"],
                                       "run_name": "live-run",
                                       "hyperparameters": {"max_steps": 20000, "save_steps": 100000,
                                                           "learning_rate": 1e-3}})
    job_id = handle["job_id"]
    try:
        page.goto(f"{site.base}/ui/#/")
        page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]')
        page.wait_for_function("id => { const b = document.querySelector(`#jobs tr[data-job='${id}'] .bar`);"
                               " return b && Number(b.dataset.percent) > 0; }", arg=job_id, timeout=300_000)
        first = percent_of(page, job_id)
        page.wait_for_function("([id, p]) => Number(document.querySelector(`#jobs tr[data-job='${id}'] .bar`)"
                               ".dataset.percent) > p", arg=[job_id, first], timeout=300_000)
        assert percent_of(page, job_id) > first
        assert "running" in page.inner_text(f'#jobs tr[data-job="{job_id}"]')
        shot(page, "jobs")

        page.goto(f"{site.base}/ui/#/job/{job_id}")
        page.wait_for_function("() => { const c = document.querySelector('[data-chart=loss]');"
                               " return c && Number(c.dataset.points) >= 2; }", timeout=300_000)
        seen = points_of(page, "loss")
        page.wait_for_function("n => Number(document.querySelector('[data-chart=loss]').dataset.points) > n",
                               arg=seen, timeout=300_000)
        assert points_of(page, "loss") > seen
        assert page.query_selector('[data-chart="loss"] canvas') is not None  # drawn by the chart library
        assert "step" in page.inner_text("#summary")
        shot(page, "job", at="h1")
    finally:
        site.call("forge_job_cancel", {"job_id": job_id, "force": True})
        assert site.wait(job_id, 120)["status"] in ("cancelled", "failed")


def test_the_evaluate_table_and_the_answers_render_and_markup_in_them_stays_text(site, page):
    job_id = site.pipeline["job_id"]
    page.goto(f"{site.base}/ui/#/job/{job_id}")
    page.wait_for_selector("#evaluation tr[data-model]")
    models = [r.get_attribute("data-model") for r in page.query_selector_all("#evaluation tr[data-model]")]
    assert models == ["base", "fine-tuned", "f16 GGUF", "Q4_K_M GGUF", "Q4_K_M GGUF (no imatrix)"]
    cells = {}
    for row in page.query_selector_all("#evaluation tr[data-model]"):
        cells[row.get_attribute("data-model")] = [td.inner_text() for td in row.query_selector_all("td")]
        assert float(cells[row.get_attribute("data-model")][2].replace(",", "")) > 0  # a perplexity
    # each GGUF's KL divergence from the f16 GGUF: the f16 itself 0 and 100 % same top token, 4 bits more
    assert float(cells["f16 GGUF"][5]) == 0 and cells["f16 GGUF"][7] == "100.0%"
    assert float(cells["Q4_K_M GGUF"][5]) > 0 and "bpw" in cells["Q4_K_M GGUF"][8]
    assert cells["Q4_K_M GGUF"][9] == "imatrix" and "removed" in cells["Q4_K_M GGUF (no imatrix)"][9]
    assert "KLD and same top token over" in page.inner_text("#measured-on")
    answers = page.inner_text("#answers")
    assert "<script>window.__pwned = 1</script>" in answers  # shown as the characters it is
    assert page.evaluate("window.__pwned") is None
    assert page.query_selector("#answers script, #answers img") is None
    assert page.query_selector('[data-chart="loss"]') is not None and points_of(page, "loss") >= 2
    shot(page, "evaluation", at="#evaluation-title")


def test_the_seal_and_its_verify_result_render(site, page):
    page.goto(f"{site.base}/ui/#/seals")
    page.wait_for_selector("#seals tr[data-seal]")
    verify = page.inner_text("#seals tr[data-seal] .verify")
    assert verify.startswith("OK"), verify
    assert "first-run" in page.inner_text("#seals")
    page.click("details summary")
    assert "## Run first-run" in page.inner_text("details pre")  # the retrospective itself
    shot(page, "seals")


def test_two_runs_loss_curves_overlay(site, page):
    runs = [site.pipeline["job_id"], site.second]
    page.goto(f"{site.base}/ui/#/")
    for job_id in runs:
        page.check(f'#jobs tr[data-job="{job_id}"] input[data-compare]')
    page.click("#compare")
    page.wait_for_selector('[data-chart="compare"] canvas')
    legend = page.inner_text('[data-chart="compare"]')
    assert "first-run" in legend and "second-run" in legend
    shot(page, "compare")


def test_forge_ui_serves_the_same_view_of_the_store_on_its_own(site, browser):
    env = {k: v for k, v in os.environ.items() if k != "FORGE_MCP_TOKEN"}
    env["FORGE_HOME"] = str(site.home)
    refused = subprocess.run([sys.executable, "-m", "forge.cli", "ui", "--host", "0.0.0.0"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "FORGE_MCP_TOKEN" in refused.stderr and "Traceback" not in refused.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "forge.cli", "ui", "--port", str(port)], env=env, cwd=str(ROOT))
    context = browser.new_context()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "forge ui exited"
            try:
                httpx.get(base + "/ui/", timeout=30)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "forge ui did not answer within 300 s"
                time.sleep(0.2)
        page = context.new_page()
        page.goto(base + "/")  # on loopback without a token: no token asked for; / leads to the view
        page.wait_for_selector(f'#jobs tr[data-job="{site.pipeline["job_id"]}"]')
        assert "first-run" in page.inner_text("#jobs")
    finally:
        context.close()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
