"""The Forge MCP server: the pipeline as tools. Heavy stages return a job handle at once and run in
worker processes; agents follow them with forge_job_status / forge_job_wait / forge_job_events.

Run: ``forge-mcp`` (stdio) or ``forge-mcp --transport http --host 127.0.0.1 --port 8765``.

The tools are module-level functions grouped by what they do (tools_stages, tools_jobs,
tools_follow, resources); they reach the job runner through the lifespan context this module sets up.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    CallToolResult,
    ListResourcesResult,
    ListToolsResult,
    PaginatedRequestParams,
    ReadResourceRequestParams,
    TextContent,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

import forge
from forge.errors import Codes, ForgeError
from forge.failures import error_from
from forge.paths import confinement
from mcp_servers.forge import resources, tools_follow, tools_jobs, tools_stages, tools_sweep, ui_app
from mcp_servers.forge.context import ForgeState
from mcp_servers.forge.tasks import ForgeTasks
from mcp_servers.lib.runner import Runner

log = logging.getLogger("forge.mcp")

INSTRUCTIONS = """Forge fine-tunes open LLMs: validate a dataset, train a LoRA/QLoRA adapter, merge it,
convert to GGUF and quantize, write an Ollama Modelfile, seal the run. Heavy tools (forge_train,
forge_merge, forge_quantize, forge_pipeline, forge_sweep, forge_evaluate, forge_publish) return a job handle
({job_id, kind, status, queue_position, poll_after_s, note}): follow it with forge_job_wait (blocks up
to timeout_s) or forge_job_status, then use next_actions. Ids of finished jobs can be passed where a
path is expected. Try it offline with forge_demo_assets."""


def _error_result(error: ForgeError) -> CallToolResult:
    """A tool error as an agent reads it: one JSON object, nothing around it."""
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(error.to_dict()))], is_error=True)


def _validation_error(err: ValidationError) -> ForgeError:
    problems = []
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "(arguments)"
        shown = repr(e.get("input"))
        problems.append(f"{where}: {e['msg']} (got {shown[:80] + '…' if len(shown) > 80 else shown})")
    return ForgeError(Codes.INVALID_ARGUMENT, "invalid arguments: " + "; ".join(problems[:5]),
                      "fix the arguments named; each tool's input schema lists them with their descriptions",
                      details=problems)


HANDLE_TOOLS = tools_jobs.HANDLE_TOOLS | tools_sweep.HANDLE_TOOLS  # the tools that start a job
SAFETY_CAP = 1_000_000
LEGACY_RESOURCE_NOT_FOUND = -32002  # "Resource not found" up to 2025-11-25; 2026-07-28 retired it for -32602


def compact_schema(node: Any, output: bool = False, depth: int = 0) -> Any:
    """A tool's JSON schema as small as it can be for what it is for (tools/list goes into every agent's
    context): no generated titles, no null defaults, no ``additionalProperties``, no ``minLength: 1``, and no
    ``maxLength``, ``maxItems`` or ``pattern`` (caps and alphabets the server enforces and names in its error).
    An input schema keeps its descriptions, numeric bounds, enums and defaults; an optional argument is typed
    as what to send (omit it for the default). An output schema keeps the shape of the reply: the type of each top-level
    field, whether it may be null, and the fields of the objects in it; the tool's description says what
    the fields mean."""
    if isinstance(node, list):
        return [compact_schema(item, output, depth) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if (key == "title" and isinstance(value, str)) or (key == "default" and value is None):
            continue
        if key == "additionalProperties" or (key == "minLength" and value == 1):
            continue  # unknown keys are refused by name either way
        if key in ("maxLength", "maxItems", "pattern"):  # caps and alphabets the server enforces and names
            continue  # in its error (ids, names, paths, texts, lists): the descriptions say what to send
        if key == "maximum" and value >= SAFETY_CAP:  # likewise: 10,000,000 steps, 2**32 - 1 for a seed
            continue
        if output and key in ("description", "default", "examples"):
            continue
        if key in ("properties", "$defs", "definitions"):
            out[key] = {name: compact_schema(sub, output, depth + 1) for name, sub in value.items()}
        else:
            out[key] = compact_schema(value, output, depth)
    if out.get("type") == "integer" and out.get("exclusiveMinimum") == 0:
        del out["exclusiveMinimum"]
        out["minimum"] = 1
    options = out.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        other = next(o for o in options if o != {"type": "null"})
        if not output:  # an argument: say what to send; leaving it out gives the default
            del out["anyOf"]
            out = {**other, **out}
        elif isinstance(other.get("type"), str) and "$ref" not in other:
            del out["anyOf"]
            out = {**other, **out, "type": [other["type"], "null"]}
    return out


def _types(node: dict) -> list[str]:
    if "$ref" in node:
        return ["object"]
    if "anyOf" in node:
        return sorted({t for option in node["anyOf"] for t in _types(option)})
    found = node.get("type", [])
    return [found] if isinstance(found, str) else list(found)


def _shape(node: dict) -> dict:
    """An output field's JSON type only: nested objects are described by the tool, not spelled out. A field
    that may be null is left untyped ({}): the name is what a reader needs, and tools/list stays small."""
    types = _types(node)
    shape: dict = {"type": types[0]} if len(types) == 1 else {}
    if "enum" in node:
        shape["enum"] = node["enum"]
    return shape


def output_shape(schema: dict) -> dict:
    """An output schema cut to the type of each top-level field (every field is always sent)."""
    schema = compact_schema(schema, output=True)
    return {"type": "object", "properties": {k: _shape(v) for k, v in schema.get("properties", {}).items()}}


class ForgeServer(MCPServer[ForgeState]):
    """MCPServer whose tool errors are what an agent can branch on: one JSON object with a code, for
    our errors, argument validation and unknown arguments alike; tool bodies run confined to the roots."""

    runner: Runner

    def _unknown_arguments(self, name: str, arguments: dict[str, Any], apps: bool) -> ForgeError | None:
        # the view's tool is there only for a client that negotiated Apps: to any other it does not exist
        tool = self._tool_manager.get_tool(name) if apps or name != ui_app.VIEW_TOOL else None
        if tool is None:
            return ForgeError(Codes.INVALID_ARGUMENT, f"there is no tool named {name[:80]!r}",
                              "list the tools with tools/list")
        known = set(tool.parameters.get("properties", {}))
        unknown = sorted(set(arguments) - known)
        if not unknown:
            return None
        return ForgeError(Codes.INVALID_ARGUMENT,
                          f"{name} has no argument(s) {', '.join(repr(u[:80]) for u in unknown[:5])}",
                          f"its arguments are: {', '.join(sorted(known))}",
                          details=[f"unknown argument: {u[:80]}" for u in unknown])

    async def list_tools(self) -> list:
        tools = await super().list_tools()
        for tool in tools:
            tool.input_schema = compact_schema(tool.input_schema)
            if tool.name in HANDLE_TOOLS:
                # the six tools that start a job return the same small handle (job_id, kind, status,
                # queue_position, poll_after_s, note): described once, in the server's instructions and README
                tool.output_schema = None
            elif tool.output_schema is not None:
                shape = output_shape(tool.output_schema)  # a report whose fields vary has no fixed shape to give
                tool.output_schema = shape if shape["properties"] else None
        return tools

    # What a client lists depends on whether it negotiated the MCP App (ui_app): these handlers get the request.
    async def _handle_list_tools(self, ctx: ServerRequestContext, params: PaginatedRequestParams | None
                                 ) -> ListToolsResult:
        return ListToolsResult(tools=ui_app.tools_for(await self.list_tools(), ui_app.negotiated(ctx)))

    async def _handle_list_resources(self, ctx: ServerRequestContext, params: PaginatedRequestParams | None
                                     ) -> ListResourcesResult:
        return ListResourcesResult(resources=ui_app.resources_for(await self.list_resources(),
                                                                  ui_app.negotiated(ctx)))

    async def _handle_read_resource(self, ctx: ServerRequestContext, params: ReadResourceRequestParams) -> Any:
        """A job or seal that does not exist: -32602 on a 2026-07-28 connection (SEP-2164), the -32002
        "Resource not found" earlier versions specify on an older one."""
        try:
            return await super()._handle_read_resource(ctx, params)
        except MCPError as err:
            if err.code == INVALID_PARAMS and ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
                raise MCPError(LEGACY_RESOURCE_NOT_FOUND, err.message, err.data) from None
            raise

    async def read_resource(self, uri: Any, context: Context | None = None) -> Any:
        if ui_app.is_view_uri(uri) and not ui_app.negotiated(context):
            raise ResourceNotFoundError(f"Unknown resource: {uri}")  # the SDK's own words for a name it lacks
        with confinement():  # resources read files an agent named too
            return await super().read_resource(uri, context)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:
        refused = self._unknown_arguments(name, arguments, ui_app.negotiated(context))
        if refused is not None:
            return _error_result(refused)
        try:
            with confinement():  # what an agent names is held to FORGE_HOME and the allowed roots
                result = await super().call_tool(name, arguments, context)
            if isinstance(result, CallToolResult) and result.structured_content is not None:
                # The text twin of the structured content, compact: it goes into the agent's context too.
                text = json.dumps(result.structured_content, separators=(",", ":"), ensure_ascii=False)
                result.content = [TextContent(type="text", text=text)]
            return result
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, ValidationError):
                return _error_result(_validation_error(cause))
            if cause is None:  # the SDK's own refusal
                return _error_result(ForgeError(Codes.INVALID_ARGUMENT, str(exc)[:500], "check the call"))
            error = error_from(cause, near=self.runner.home)
            if error.code == Codes.INTERNAL:
                log.error("tool %s failed unexpectedly", name, exc_info=cause)
            return _error_result(error)


def create_server(home: Path | None = None, apps: bool = True) -> ForgeServer:
    """The server; ``apps=False`` leaves the MCP App out altogether (what a client without Apps sees)."""
    runner = Runner(home)

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[ForgeState]:
        runner.start()  # idempotent: each session enters the lifespan, the runner starts once
        yield ForgeState(runner=runner)

    job_tasks = ForgeTasks(None, HANDLE_TOOLS)  # MCP tasks for the tools that start a job
    server = ForgeServer(name="forge", title="Forge", version=forge.__version__, instructions=INSTRUCTIONS,
                         lifespan=lifespan, extensions=[*([ui_app.build_apps()] if apps else []), job_tasks])
    server.runner = runner  # tests and the CLI reach the runner through the server
    job_tasks.server = server
    for fn, title, hints in [*tools_stages.TOOLS, *tools_jobs.TOOLS, *tools_sweep.TOOLS, *tools_follow.TOOLS]:
        server.add_tool(fn, title=title, description=inspect.cleandoc(fn.__doc__ or ""), annotations=hints)
    for uri, fn, mime_type in resources.RESOURCES:
        server.resource(uri, mime_type=mime_type)(fn)
    return server


LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "FORGE_MCP_TOKEN"
HOSTS_ENV = "FORGE_MCP_ALLOWED_HOSTS"


def _bearer_app(app, token: str):
    """Refuse HTTP requests without ``Authorization: Bearer <FORGE_MCP_TOKEN>``; a header that is
    missing, malformed or not UTF-8 is a 401 like a wrong token (compared as bytes, in constant time)."""
    import hmac

    expected = b"Bearer " + token.encode("utf-8")

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            got = b"".join(v for k, v in scope.get("headers") or [] if k.lower() == b"authorization")
            if not hmac.compare_digest(got, expected):
                body = b'{"error": "missing or wrong bearer token (FORGE_MCP_TOKEN)"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def transport_security(bind_host: str, allowed: str | None):
    """DNS-rebinding protection: the Host (and Origin) headers a request may carry. Loopback names always (a
    client on the same machine, with the token when one is set); other names must be listed
    (FORGE_MCP_ALLOWED_HOSTS, comma-separated) to serve off loopback."""
    from mcp.server.transport_security import TransportSecuritySettings

    names = [h.strip() for h in (allowed or "").split(",") if h.strip()]
    if not names and bind_host not in LOOPBACK:
        raise ForgeError(Codes.INVALID_ARGUMENT,
                         f"serving HTTP on {bind_host} needs the host names clients will use",
                         f"export {HOSTS_ENV}=forge.internal,192.168.1.50 (the names or addresses in the URL "
                         "clients connect to)")
    names = list(dict.fromkeys([*names, "127.0.0.1", "localhost", "[::1]"]))
    hosts = [h for name in names for h in (name, f"{name}:*")]
    origins = [f"{scheme}://{h}" for scheme in ("http", "https") for h in hosts]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=origins)


def _refuse_start(err: ForgeError) -> int:
    import sys

    print(f"error [{err.code}]: {err.message}\nhint: {err.hint}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(prog="forge-mcp", description="Forge MCP server")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    os.umask(0o077)  # FORGE_HOME, the store, logs and seals: the user's alone
    from forge.progress import quiet_libraries

    quiet_libraries()
    token = os.environ.get(TOKEN_ENV)
    # Every refusal comes before the store is opened: a server that does not start changes nothing.
    try:
        if args.transport == "http" and args.host not in LOOPBACK and not token:
            raise ForgeError(Codes.TOKEN_REQUIRED, f"serving HTTP on {args.host} (not loopback) needs {TOKEN_ENV}",
                             f"export {TOKEN_ENV}=<a long random string>, or use --host 127.0.0.1")
        security = transport_security(args.host, os.environ.get(HOSTS_ENV)) if args.transport == "http" else None
        server = create_server()
    except ForgeError as err:
        return _refuse_start(err)
    if args.transport == "stdio":
        server.run("stdio")
        return 0
    import uvicorn

    from mcp_servers.forge.ui_web import UiApp, with_ui

    app = server.streamable_http_app(transport_security=security, host=args.host)
    if token:
        app = _bearer_app(app, token)
    # The live view at /ui: the same Host rules and token (read from a cookie too: a browser sends no header)
    app = with_ui(app, UiApp(lambda: server.runner.store, token, security.allowed_hosts))
    print(f"Forge MCP at http://{args.host}:{args.port}/mcp, the live view at http://{args.host}:{args.port}/ui/",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
