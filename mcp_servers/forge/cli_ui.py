"""``forge ui``: the live view on its own, for a person watching the jobs in FORGE_HOME (those an agent
started over MCP, or a forge-mcp that is not serving HTTP). The same page and rules as /ui on
``forge-mcp --transport http``: loopback by default; anywhere else only with FORGE_MCP_TOKEN and the
host names in FORGE_MCP_ALLOWED_HOSTS. It only reads: no job store is created where there is none.

Added to the ``forge`` command through the ``forge.cli`` entry-point group (pyproject.toml)."""

from __future__ import annotations

import os
import sys

DEFAULT_PORT = 8766


def register(subparsers) -> None:
    """The ``forge.cli`` entry point: add ``ui`` to the ``forge`` command."""
    ui = subparsers.add_parser("ui", help="Serve the live view of jobs, curves, evaluations and seals.",
                               description="Serve the live view (the job list, each job's curves, evaluation and "
                                           "log, the seals, runs compared) of $FORGE_HOME at http://HOST:PORT/ui/. "
                                           "Read-only. Off loopback it needs FORGE_MCP_TOKEN and "
                                           "FORGE_MCP_ALLOWED_HOSTS, as forge-mcp does.")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    ui.set_defaults(_handler=serve)


def serve(args) -> dict:
    import uvicorn

    from forge.errors import Codes, ForgeError
    from forge.paths import forge_home
    from mcp_servers.forge.server import HOSTS_ENV, LOOPBACK, TOKEN_ENV, transport_security
    from mcp_servers.forge.ui_web import UiApp, store_in

    if not 0 < args.port < 65536:
        raise ForgeError(Codes.INVALID_ARGUMENT, f"port {args.port} is not a TCP port", "pass --port 1-65535")
    token = os.environ.get(TOKEN_ENV)
    if args.host not in LOOPBACK and not token:
        raise ForgeError(Codes.TOKEN_REQUIRED, f"serving the view on {args.host} (not loopback) needs {TOKEN_ENV}",
                         f"export {TOKEN_ENV}=<a long random string>, or use --host 127.0.0.1")
    security = transport_security(args.host, os.environ.get(HOSTS_ENV))
    app = UiApp(store_in(forge_home()), token, security.allowed_hosts, root_redirect=True)
    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}/ui/"
    print(f"Forge's live view of {forge_home()} at {url}" + (f"?token=<{TOKEN_ENV}>" if token else "")
          + "  (Ctrl-C stops it)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return {"status": "succeeded", "url": url}
