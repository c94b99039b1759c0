"""What every tool shares: the runner (reached through the server's lifespan context) and the
annotation sets tools promise."""

from __future__ import annotations

from dataclasses import dataclass

from mcp.server.mcpserver import Context
from mcp_types import ToolAnnotations

from mcp_servers.lib.runner import Runner


@dataclass
class ForgeState:
    """What the server's lifespan yields to every request."""

    runner: Runner


def runner_of(ctx: Context) -> Runner:
    return ctx.request_context.lifespan_context.runner


READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)
STARTS_JOB = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False, openWorldHint=False)
WRITES = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True, openWorldHint=False)
CANCELS = ToolAnnotations(readOnlyHint=False, destructiveHint=True, idempotentHint=True, openWorldHint=False)
