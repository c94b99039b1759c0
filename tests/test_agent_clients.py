"""What an agent's client sees: the official TypeScript SDK client driving the chain with its default
options, both protocol versions the Python SDK offers, and replies that fit a context window."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client

from helpers import call, call_ok, free_port, stop_runner, wait_job
from mcp_servers.forge.server import create_server

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
# tools/list: 18 KB (issue 21), 19.5 KB with forge_sweep's tool (issue 23). Output shapes name their
# fields (a nullable one untyped), the seven tools that start a job share a handle described once, caps and
# alphabets the server enforces and names in its errors are not spelled out in the schemas.
BUDGETS = {"tools/list": 19_500, "job_list_20": 8_000, "train_status": 3_000}


# Each official TypeScript client with its default options: the 1.x SDK speaks 2025-11-25; its successor
# @modelcontextprotocol/client 2.x, pinned to 2026-07-28, the new era (per-request capabilities, no handshake).
SDKS = {"2025-11-25": (ROOT / ".tsclient", "sdk"), "2026-07-28": (ROOT / ".tsclient2", "client")}


def node_chain(version: str, *args: str) -> dict:
    root, package = SDKS[version]
    assert (root / "node_modules" / "@modelcontextprotocol" / package).is_dir(), \
        f"the TypeScript {package} package is not installed: run `make test`, which installs it into {root.name}/"
    proc = subprocess.run(["node", str(ROOT / "tests" / "ts" / "drive_chain.cjs"), *args], capture_output=True,
                          text=True, timeout=1500, env={**os.environ, "TSCLIENT_DIR": str(root)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no summary (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["ok"], summary
    return summary


def check_chain(summary: dict, version: str) -> None:
    assert summary["tools"] == 19 and summary["errors_checked"] == 3
    # the quantize job's artifacts: the f16, the Q4_K_M and the importance matrix it was made with
    assert summary["train_steps"] == 40 and summary["artifacts"] == 3 and summary["template"] == "chatml"
    assert summary["notifications"] >= summary["waits"] and summary["seal"].startswith("sha256:")
    if version == "2026-07-28" or summary["protocol"] is not None:  # 1.x over stdio does not say
        assert summary["protocol"] == version, summary


@pytest.mark.parametrize("version", SDKS)
def test_the_typescript_sdk_client_drives_the_chain_over_stdio_with_default_options(home, version):
    check_chain(node_chain(version, "stdio", sys.executable, str(home)), version)


@pytest.mark.parametrize("version", SDKS)
async def test_the_typescript_sdk_client_drives_the_chain_over_http_with_default_options(home, version):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mcp_servers.forge.server", "--transport", "http", "--port",
                             str(port)], env={**os.environ, "FORGE_HOME": str(home)}, cwd=str(ROOT))
    try:
        with anyio.fail_after(300):
            while True:
                assert proc.poll() is None, "the server exited"
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5):
                        break
                except OSError:
                    await anyio.sleep(0.3)
        summary = await anyio.to_thread.run_sync(node_chain, version, "http", f"http://127.0.0.1:{port}/mcp")
    finally:
        proc.terminate()
        proc.wait()
    check_chain(summary, version)


@pytest.mark.parametrize("mode,version", [("legacy", "2025-11-25"), ("2026-07-28", "2026-07-28")])
async def test_both_protocol_versions_the_sdk_offers_list_call_and_fail_alike(home, mode, version):
    server = create_server()
    try:
        async with Client(server, mode=mode) as client:
            assert client.protocol_version == version
            tools = (await client.list_tools()).tools
            env = await call_ok(client, "forge_environment")
            missing = await call(client, "forge_job_status", {"job_id": "train-20000101-000000-000000"})
    finally:
        stop_runner(server.runner)
    assert len(tools) == 19 and env["forge_home"] == str(home.resolve())
    assert set(missing["error"]) == {"code", "message", "hint", "retryable", "details"}


@pytest.mark.parametrize("mode,code", [("legacy", -32002), ("2026-07-28", -32602)])
async def test_a_job_or_seal_that_does_not_exist_answers_the_code_its_protocol_version_specifies(home, mode, code):
    """-32002 "Resource not found" up to 2025-11-25; 2026-07-28 retired it for -32602 (invalid params)."""
    from mcp.shared.exceptions import MCPError

    server = create_server()
    errors = {}
    try:
        async with Client(server, mode=mode) as client:
            for uri in ("forge://jobs/train-20000101-000000-000000", "forge://seals/0123456789abcdef"):
                with pytest.raises(MCPError) as info:
                    await client.read_resource(uri)
                errors[uri] = info.value
    finally:
        stop_runner(server.runner)
    assert [e.code for e in errors.values()] == [code, code], errors
    assert all(e.message.startswith("no ") and e.data == {"uri": uri} for uri, e in errors.items()), errors


def wire_size(result) -> int:
    """Bytes of a result as it crosses the wire."""
    return len(result.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8"))


def reply_size(result) -> int:
    """Bytes of a tool's reply as the agent reads it (its compact JSON)."""
    return len(json.dumps(result.structured_content, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


async def test_replies_fit_a_context_window(home, assets, monkeypatch):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["model_dir"]).parent))
    server = create_server()
    try:
        async with Client(server) as client:
            tools_list = await client.list_tools()
            train = await call_ok(client, "forge_train", {"base_model": assets["model_dir"],
                                                          "dataset": assets["dataset"],
                                                          "hyperparameters": {"max_steps": 2}})
            done = await wait_job(client, train["job_id"])
            status = await client.call_tool("forge_job_status", {"job_id": train["job_id"]})
            server.runner.max_concurrent = 0  # the rest stay queued: only their listing is measured
            for i in range(19):
                await call_ok(client, "forge_quantize", {"model": str(Path(assets["model_dir"])),
                                                         "client_request_id": f"q-{i}"})
            listed = await client.call_tool("forge_job_list", {"limit": 20})
            # a 50,000-character system prompt is shown cut in the status (whole in the job's resource)
            long = await call_ok(client, "forge_pipeline", {"base_model": assets["model_dir"],
                                                            "dataset": assets["dataset"],
                                                            "system_prompt": "x" * 50_000})
            long_status = await client.call_tool("forge_job_status", {"job_id": long["job_id"]})
            long_detail = json.loads((await client.read_resource(f"forge://jobs/{long['job_id']}")).contents[0].text)
    finally:
        stop_runner(server.runner)
    assert done["status"] == "succeeded"
    assert reply_size(long_status) <= BUDGETS["train_status"] and len(long_detail["inputs"]["system_prompt"]) == 50_000
    sizes = {"tools/list": wire_size(tools_list), "job_list_20": reply_size(listed), "train_status": reply_size(status)}
    assert len(listed.structured_content["jobs"]) == 20
    assert all(sizes[k] <= BUDGETS[k] for k in BUDGETS), sizes
    # the text twin is compact JSON of the same content, not indented
    assert json.loads(status.content[0].text) == status.structured_content and "\n" not in status.content[0].text
