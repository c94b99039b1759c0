"""A person's confirmation before anything is published: where the client supports elicitation, forge_publish
(not a dry run) shows the repo, its visibility and the files to upload, and publishes only on "accept" with
publish=true. Where it does not, nothing is asked and the call behaves as before.

The question is a resolver (``Resolve`` returning ``Elicit``): on a 2026-07-28 connection the SDK carries it
in an InputRequiredResult and the client's retry brings the answer; on an older one it is an
``elicitation/create`` request within the call."""

from __future__ import annotations

from typing import Any

from mcp.server.elicitation import AcceptedElicitation
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import Elicit
from pydantic import BaseModel, Field

from forge.errors import Codes, ForgeError
from mcp_servers.forge.context import runner_of
from mcp_servers.lib import results

NOT_ASKED = "not asked"  # a dry run, or a client that cannot be asked
SHOWN_FILES = 12


class PublishConfirmation(BaseModel):
    publish: bool = Field(description="Upload these files to the Hub now.")


def can_ask(ctx: Context) -> bool:
    """The client declared form elicitation (a bare ``elicitation: {}`` is form, as before modes existed)."""
    capabilities = ctx.request_context.session.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


def _size(n: int | None) -> str:
    if n is None:
        return "model card"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


def question(repo_id: str, private: bool, kind: str, files: list[dict]) -> str:
    shown = [f"  {f['path_in_repo']} ({_size(f['bytes'])})" for f in files[:SHOWN_FILES]]
    if len(files) > SHOWN_FILES:
        shown.append(f"  … and {len(files) - SHOWN_FILES} more")
    total = sum(f["bytes"] or 0 for f in files)
    return (f"Publish to the Hugging Face Hub?\nrepo: {repo_id} ({'private' if private else 'PUBLIC'})\n"
            f"what: the run's {kind}, {len(files)} files, {_size(total)}\n" + "\n".join(shown))


def ask_to_publish(source: str, repo_id: str, private: bool, kind: str, dry_run: bool, ctx: Context) -> Any:
    """The resolver behind forge_publish's confirmation."""
    from forge.publish import PublishConfig, planned_files

    if dry_run or not can_ask(ctx):
        return NOT_ASKED
    path = results.resolve_input(runner_of(ctx).store, source, "gguf_dir" if kind == "gguf" else kind, "source")
    files = planned_files(PublishConfig.build(source=str(path), repo_id=repo_id, private=private, kind=kind))
    return Elicit(question(repo_id, private, kind, files), PublishConfirmation)


def confirmed(outcome: Any, repo_id: str) -> None:
    """Go on when not asked or when the person accepted with publish=true; otherwise publish nothing."""
    if isinstance(outcome, AcceptedElicitation) and (outcome.data == NOT_ASKED or outcome.data.publish):
        return
    answer = outcome.action if not isinstance(outcome, AcceptedElicitation) else "accept without publish"
    raise ForgeError(Codes.PUBLISH_DECLINED, f"the person did not confirm publishing to {repo_id} ({answer}): "
                     "nothing was uploaded",
                     "ask them what to change (repo, visibility, files); forge_publish(dry_run=true) shows the plan")
