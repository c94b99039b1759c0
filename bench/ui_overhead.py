"""What watching costs training: tokens/s of the same `forge_train` job with the live view open in headless
Chromium (the job page and the job list, each polling every second) against no page at all, through one
`forge-mcp --transport http` server, in one run. Runs alternate (closed, open, closed, open, …) so drift of
the machine falls on both; the ratio is of the medians.

    python bench/ui_overhead.py [--model smollm2|tiny] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import anyio
import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, home: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FORGE_HOME": str(home), "FORGE_MAX_CONCURRENT_JOBS": "1"}
        env.pop("FORGE_MCP_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "mcp_servers.forge.server", "--transport", "http",
                                      "--port", str(self.port)], env=env, cwd=str(ROOT), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(self.base + "/ui/", timeout=30)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)

    def call(self, name: str, arguments: dict) -> dict:
        async def one() -> dict:
            from mcp import Client

            async with Client(self.base + "/mcp") as client:
                result = await client.call_tool(name, arguments)
            if result.is_error:
                raise SystemExit(result.content[0].text)
            return result.structured_content

        with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's event loop
            return pool.submit(anyio.run, one).result()

    def train(self, assets: dict, steps: int, name: str) -> dict:
        handle = self.call("forge_train", {"base_model": assets["base_model"], "dataset": assets["dataset"],
                                           "run_name": name, "hyperparameters": {
                                               "max_steps": steps, "save_steps": 10**6, "eval_fraction": 0.0}})
        return handle["job_id"]

    def wait(self, job_id: str) -> dict:
        while True:
            status = self.call("forge_job_wait", {"job_id": job_id, "timeout_s": 20})
            if status["status"] in ("succeeded", "failed", "cancelled"):
                return status

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    rates: dict[str, list[float]] = {"closed": [], "open": []}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        server = Server(Path(tmp))
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            assets = server.call("forge_demo_assets", {"model": args.model})
            server.wait(server.train(assets, 2, "warm-up"))  # loads and caches what every run then reuses
            for i in range(args.repeats):
                for mode in ("closed", "open"):
                    job_id = server.train(assets, args.steps, f"{mode}-{i}")
                    pages = []
                    if mode == "open":
                        for path in (f"#/job/{job_id}", "#/"):
                            page = browser.new_page()
                            page.goto(f"{server.base}/ui/{path}")
                            pages.append(page)
                    status = server.wait(job_id)
                    for page in pages:
                        page.close()
                    if status["status"] != "succeeded":
                        raise SystemExit(json.dumps(status)[:2000])
                    rates[mode].append(status["metrics"]["tokens_per_s"])
                    print(f"{mode:6} run {i + 1}: {rates[mode][-1]:.1f} tokens/s", flush=True)
        finally:
            browser.close()
            server.close()
    ratio = median(rates["open"]) / median(rates["closed"])
    print(json.dumps({"model": args.model, "steps": args.steps, "repeats": args.repeats,
                      "closed_tokens_per_s": rates["closed"], "open_tokens_per_s": rates["open"],
                      "median_closed": median(rates["closed"]), "median_open": median(rates["open"]),
                      "ratio_open_to_closed": round(ratio, 4)}, indent=2))


if __name__ == "__main__":
    main()
