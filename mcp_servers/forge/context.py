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


SPEC_DEFAULTS = {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": False, "openWorldHint": True}


def _hints(read_only: bool, destructive: bool, idempotent: bool, open_world: bool) -> ToolAnnotations:
    """Annotations, listing only the hints that differ from the spec's defaults (a missing hint means
    the default: not read-only, destructive, not idempotent, open world)."""
    hints = {"readOnlyHint": read_only, "destructiveHint": destructive, "idempotentHint": idempotent,
             "openWorldHint": open_world}
    if read_only:  # destructive and idempotent are meaningful only when the tool writes (read-only is both safe
        hints.pop("destructiveHint")  # and repeatable by definition)
        hints.pop("idempotentHint")
    return ToolAnnotations(**{k: v for k, v in hints.items() if v != SPEC_DEFAULTS.get(k)})


# Annotations are promises a test holds each tool to (tests/test_annotations.py).
READ_ONLY = _hints(read_only=True, destructive=False, idempotent=True, open_world=False)
# Reads, and may reach past this machine: a tokenizer from the Hugging Face Hub, a running Ollama.
READ_ONLY_OPEN = _hints(read_only=True, destructive=False, idempotent=True, open_world=True)
# Writes new files only; the same call twice gives the same result (existing files are reused, never changed).
WRITES = _hints(read_only=False, destructive=False, idempotent=True, open_world=False)
# Adds a new record each call (a seal), changing nothing that exists.
APPENDS = _hints(read_only=False, destructive=False, idempotent=False, open_world=False)
# Starts a job (a new one each call, unless client_request_id repeats); may download a hub model.
STARTS_JOB = _hints(read_only=False, destructive=False, idempotent=False, open_world=True)
STARTS_LOCAL_JOB = _hints(read_only=False, destructive=False, idempotent=False, open_world=False)
# Uploads to the Hub: files of the same name in an existing repo are replaced (the repo keeps history).
PUBLISHES = _hints(read_only=False, destructive=True, idempotent=False, open_world=True)
CANCELS = _hints(read_only=False, destructive=True, idempotent=True, open_world=False)
