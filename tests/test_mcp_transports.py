"""The server as a real process: stdio through the SDK's stdio client, streamable HTTP, a kill -9
mid-train, and the MCP Inspector CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import httpx2 as httpx
import pytest
from mcp import Client, StdioServerParameters

from helpers import call_ok as call
from helpers import free_port, stop_runner, wait_job
from mcp_servers.forge.server import create_server
from mcp_servers.forge.server import main as server_main

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent



def server_env(home) -> dict:
    return {**os.environ, "FORGE_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def stdio_params(home) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "mcp_servers.forge.server"],
                                 env=server_env(home), cwd=str(ROOT))


async def test_stdio_server_takes_the_demo_from_dataset_to_seal_with_forge_pipeline(home):
    async with Client(stdio_params(home), read_timeout_seconds=600) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"forge_pipeline", "forge_job_wait", "forge_seal_snapshot"} <= names
        assets = await call(client, "forge_demo_assets")
        report = await call(client, "forge_validate_dataset", {"path": assets["dataset"]})
        assert report["records"] == 60
        handle = await call(client, "forge_pipeline", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                       "system_prompt": "Answer briefly.",
                                                       "hyperparameters": {"max_steps": 6}})
        status = await wait_job(client, handle["job_id"])
        assert status["status"] == "succeeded", status
        assert [a["kind"] for a in status["artifacts"]] == ["gguf", "modelfile", "seal"]  # what the pipeline delivers
        detail = json.loads((await client.read_resource(f"forge://jobs/{handle['job_id']}")).contents[0].text)
        kinds = {a["kind"] for a in detail["artifacts"]}  # every file, in the job's resource
        assert {"adapter", "merged", "gguf", "modelfile", "seal"} <= kinds
        sealed = await call(client, "forge_seal_snapshot", {"note": "via stdio"})
        assert sealed["seal_id"].startswith("sha256:")
    run_dir = Path(status["run_dir"])
    assert (run_dir / "gguf" / "Modelfile").is_file() and list(run_dir.glob("gguf/*-Q4_K_M.gguf"))


async def wait_http(url: str, proc) -> None:
    with anyio.fail_after(300):
        while True:
            assert proc.poll() is None, "server exited"
            try:
                async with httpx.AsyncClient(timeout=30) as http:
                    await http.get(url)
                return
            except httpx.HTTPError:
                await anyio.sleep(0.2)


async def test_http_server_killed_mid_train_then_a_new_server_sees_the_job_finish(home):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mcp_servers.forge.server", "--transport", "http",
                             "--port", str(port)], env=server_env(home), cwd=str(ROOT))
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        await wait_http(url, proc)
        async with Client(url) as client:
            assets = await call(client, "forge_demo_assets")
            handle = await call(client, "forge_train", {"base_model": assets["model_dir"], "dataset": assets["dataset"],
                                                        "hyperparameters": {"max_steps": 150, "save_steps": 50}})
            with anyio.fail_after(600):
                while ((await call(client, "forge_job_status", {"job_id": handle["job_id"]}))["progress"].get("step")
                       or 0) < 2:
                    await anyio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    server = create_server()
    try:
        async with Client(server) as client:
            status = await wait_job(client, handle["job_id"])
    finally:
        stop_runner(server.runner)
    assert status["status"] == "succeeded", status
    assert status["progress"]["step"] == 150


async def test_http_bearer_token_is_required_off_loopback_and_checked(home, monkeypatch, capsys):
    monkeypatch.delenv("FORGE_MCP_TOKEN", raising=False)
    assert server_main(["--transport", "http", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "FORGE_MCP_TOKEN" in capsys.readouterr().err
    port = free_port()
    env = {**server_env(home), "FORGE_MCP_TOKEN": "s3cret-token"}
    proc = subprocess.Popen([sys.executable, "-m", "mcp_servers.forge.server", "--transport", "http",
                             "--port", str(port)], env=env, cwd=str(ROOT))
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        await wait_http(url, proc)
        async with httpx.AsyncClient() as http:
            denied = await http.post(url, json={})
            assert denied.status_code == 401
        from mcp.client.streamable_http import streamable_http_client

        # The SDK's default client timeouts (30 s, 5 min reading streams), not httpx's 5 s: the server imports
        # torch on first use, which takes a while on a busy machine.
        auth = httpx.AsyncClient(headers={"Authorization": "Bearer s3cret-token"},
                                 timeout=httpx.Timeout(30, read=300))
        async with auth, Client(streamable_http_client(url, http_client=auth)) as client:
            env_report = await call(client, "forge_environment")
            assert env_report["python"]
    finally:
        proc.terminate()
        proc.wait()


def raw_post(port: int, headers: dict[bytes, bytes]) -> int:
    """POST an initialize to /mcp with exactly these header bytes (no client library to tidy them); the status."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}).encode()
    lines = [b"POST /mcp HTTP/1.1", b"Content-Type: application/json", b"Accept: application/json, text/event-stream",
             b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    lines += [k + b": " + v for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        reply = sock.recv(4096)
    return int(reply.split(b" ", 2)[1])


async def test_http_off_loopback_takes_the_allowed_hosts_and_refuses_others_and_bad_headers(home):
    port = free_port()
    env = {**server_env(home), "FORGE_MCP_TOKEN": "s3cret-token", "FORGE_MCP_ALLOWED_HOSTS": "forge.internal"}
    proc = subprocess.Popen([sys.executable, "-m", "mcp_servers.forge.server", "--transport", "http",
                             "--host", "0.0.0.0", "--port", str(port)], env=env, cwd=str(ROOT))
    try:
        await wait_http(f"http://127.0.0.1:{port}/mcp", proc)
        good = {b"Host": f"forge.internal:{port}".encode(), b"Authorization": b"Bearer s3cret-token"}
        statuses = {
            "allowed host": raw_post(port, good),
            "allowed host and origin": raw_post(port, {**good, b"Origin": f"http://forge.internal:{port}".encode()}),
            "other host": raw_post(port, {**good, b"Host": f"192.168.1.50:{port}".encode()}),
            "other origin": raw_post(port, {**good, b"Origin": b"http://evil.example"}),
            "no token": raw_post(port, {b"Host": good[b"Host"]}),
            "wrong token": raw_post(port, {**good, b"Authorization": b"Bearer nope"}),
            "non-ascii token": raw_post(port, {**good, b"Authorization": "Bearer é".encode()}),
            "invalid utf-8": raw_post(port, {**good, b"Authorization": b"Bearer \xff\xfe"}),
            "no scheme": raw_post(port, {**good, b"Authorization": b"s3cret-token"}),
        }
        token = {b"Authorization": b"Bearer s3cret-token"}
        for name in ("127.0.0.1", "localhost", "[::1]"):  # a client on the same machine, always allowed
            statuses[f"loopback {name}"] = raw_post(port, {b"Host": f"{name}:{port}".encode(), **token})
            statuses[f"loopback {name}, no token"] = raw_post(port, {b"Host": f"{name}:{port}".encode()})
        from mcp.client.streamable_http import streamable_http_client

        auth = httpx.AsyncClient(headers={"Authorization": "Bearer s3cret-token"}, timeout=httpx.Timeout(30, read=300))
        async with auth, Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=auth)) as client:
            env_report = await call(client, "forge_environment")
    finally:
        proc.terminate()
        proc.wait()
    assert statuses["allowed host"] == 200 and statuses["allowed host and origin"] == 200, statuses
    assert statuses["other host"] == 421 and statuses["other origin"] == 403, statuses
    assert all(statuses[k] == 401 for k in ("no token", "wrong token", "non-ascii token", "invalid utf-8",
                                           "no scheme")), statuses
    assert all(statuses[f"loopback {n}"] == 200 and statuses[f"loopback {n}, no token"] == 401
               for n in ("127.0.0.1", "localhost", "[::1]")), statuses
    assert env_report["forge_home"] == str(home.resolve())  # the SDK client over 127.0.0.1, with the token


def test_serving_off_loopback_without_allowed_hosts_is_refused_and_changes_nothing(home, monkeypatch, capsys):
    monkeypatch.setenv("FORGE_MCP_TOKEN", "s3cret-token")
    monkeypatch.delenv("FORGE_MCP_ALLOWED_HOSTS", raising=False)
    assert server_main(["--transport", "http", "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "FORGE_MCP_ALLOWED_HOSTS" in err and "Traceback" not in err
    assert not (home / "forge.db").exists()  # refused before the store was opened: no migration, no reconcile


def test_mcp_inspector_cli_lists_tools_and_calls_environment(home):
    inspector = ROOT / ".inspector" / "node_modules" / ".bin" / "mcp-inspector"
    assert inspector.exists(), "the MCP Inspector is not installed: run `make test`, which installs it"
    base = [str(inspector), "--cli", sys.executable, "-m", "mcp_servers.forge.server"]
    env = server_env(home)
    listed = subprocess.run([*base, "--method", "tools/list"], capture_output=True, text=True, env=env,
                            cwd=str(ROOT), timeout=600)
    assert listed.returncode == 0, listed.stderr
    names = {t["name"] for t in json.loads(listed.stdout)["tools"]}
    assert {"forge_environment", "forge_train", "forge_job_wait"} <= names
    called = subprocess.run([*base, "--method", "tools/call", "--tool-name", "forge_environment"],
                            capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    assert called.returncode == 0, called.stderr
    report = json.loads(json.loads(called.stdout)["content"][0]["text"])
    assert report["forge_home"] == str(Path(home).resolve())
