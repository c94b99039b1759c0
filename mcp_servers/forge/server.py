"""The Forge MCP server: the pipeline as tools. Heavy stages return a job handle at once and run in
worker processes; agents follow them with forge_job_status / forge_job_wait / forge_job_events.

Run: ``forge-mcp`` (stdio) or ``forge-mcp --transport http --host 127.0.0.1 --port 8765``.

The tools are module-level functions grouped by what they do (tools_stages, tools_jobs,
tools_follow, resources); they reach the job runner through the lifespan context this module sets up.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent
from pydantic import ValidationError

import forge
from forge.errors import Codes, ForgeError
from mcp_servers.forge import resources, tools_follow, tools_jobs, tools_stages
from mcp_servers.forge.context import ForgeState
from mcp_servers.lib.runner import Runner

log = logging.getLogger("forge.mcp")

INSTRUCTIONS = """Forge fine-tunes open LLMs: validate a dataset, train a LoRA/QLoRA adapter, merge it,
convert to GGUF and quantize, write an Ollama Modelfile, seal the run. Heavy tools (forge_train,
forge_merge, forge_quantize, forge_pipeline) return a job handle at once: follow it with
forge_job_wait (blocks up to timeout_s) or forge_job_status, then use next_actions. Ids of finished
jobs can be passed where a path is expected. Try it offline with forge_demo_assets."""


def _error_result(error: dict) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(error))], is_error=True)


def _validation_error(err: ValidationError) -> dict:
    problems = [f"{'.'.join(str(p) for p in e['loc']) or '(arguments)'}: {e['msg']}" for e in err.errors()]
    return ForgeError(Codes.CONFIG_INVALID, "invalid arguments: " + "; ".join(problems),
                      "fix the arguments named; each tool's input schema lists them with descriptions",
                      details=problems).to_dict()


class ForgeServer(MCPServer[ForgeState]):
    """MCPServer whose tool errors are what an agent can branch on: one JSON object with a code."""

    runner: Runner

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, ForgeError):
                return _error_result(cause.to_dict())
            if isinstance(cause, ValidationError):
                return _error_result(_validation_error(cause))
            if cause is None:  # the SDK's own refusal, e.g. an unknown tool name
                return _error_result(ForgeError(Codes.CONFIG_INVALID, str(exc), "list the tools with tools/list")
                                     .to_dict())
            log.error("tool %s failed unexpectedly", name, exc_info=cause)
            return _error_result(ForgeError(Codes.INTERNAL, f"{type(cause).__name__} in {name}",
                                            "see the server's log; retry, or report it").to_dict())


def create_server(home: Path | None = None) -> ForgeServer:
    runner = Runner(home)

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[ForgeState]:
        runner.start()  # idempotent: each session enters the lifespan, the runner starts once
        yield ForgeState(runner=runner)

    server = ForgeServer(name="forge", title="Forge", version=forge.__version__, instructions=INSTRUCTIONS,
                         lifespan=lifespan)
    server.runner = runner  # tests and the CLI reach the runner through the server
    for fn, title, hints in [*tools_stages.TOOLS, *tools_jobs.TOOLS, *tools_follow.TOOLS]:
        server.add_tool(fn, title=title, annotations=hints)
    for uri, fn, mime_type in resources.RESOURCES:
        server.resource(uri, mime_type=mime_type)(fn)
    return server


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _bearer_app(app, token: str):
    """Refuse HTTP requests without ``Authorization: Bearer <FORGE_MCP_TOKEN>``."""
    import hmac

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            got = headers.get(b"authorization", b"").decode()
            if not hmac.compare_digest(got, f"Bearer {token}"):
                body = b'{"error": "missing or wrong bearer token (FORGE_MCP_TOKEN)"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(prog="forge-mcp", description="Forge MCP server")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    from forge.progress import quiet_libraries

    quiet_libraries()
    token = os.environ.get("FORGE_MCP_TOKEN")
    if args.transport == "http" and args.host not in LOOPBACK and not token:
        print("error [token_required]: serving HTTP on a non-loopback address needs FORGE_MCP_TOKEN\n"
              "hint: export FORGE_MCP_TOKEN=<a long random string>, or use --host 127.0.0.1", file=sys.stderr)
        return 2
    server = create_server()
    if args.transport == "stdio":
        server.run("stdio")
        return 0
    import uvicorn

    app = server.streamable_http_app()
    if token:
        app = _bearer_app(app, token)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
