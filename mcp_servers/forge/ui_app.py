"""The MCP App (extension ``io.modelcontextprotocol/ui``): a view of one job that hosts which render
Apps show inline under forge_job_status, forge_job_wait and the tools that start a job.

The view is one self-contained HTML page (ui_static/app_view.html, served as ``ui://forge/job``). The
host hands it the tool's reply; it takes the job id from there and polls ``forge_job_view``, a tool
only views may call (``_meta.ui.visibility = ["app"]``), every 2 s through the host until the job ends.
forge_job_view reads what the live web page reads (ui_data.job_view), trimmed for an iframe.

A client that did not negotiate Apps sees none of it: the server lists the tools and resources it
listed before (no ``_meta.ui``, no forge_job_view, no ``ui://`` resource) and answers a call of the
view's tool or a read of its page as it answers an unknown name (ForgeServer does the filtering)."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import anyio
from mcp.server.apps import Apps, client_supports_apps
from mcp.server.mcpserver import Context
from mcp_types import Resource, Tool
from pydantic import BaseModel

from mcp_servers.forge import ui_data
from mcp_servers.forge.context import READ_ONLY, runner_of
from mcp_servers.forge.tools_follow import JobIdArg

VIEW_URI = "ui://forge/job"
VIEW_TOOL = "forge_job_view"
VIEW_HTML = Path(__file__).parent / "ui_static" / "app_view.html"
# Tools whose reply names a job: a host that renders Apps shows the view under them.
SHOWN_ON = ("forge_job_status", "forge_job_wait", "forge_train", "forge_merge", "forge_quantize",
            "forge_pipeline", "forge_evaluate", "forge_publish", "forge_sweep")

# The view is polled every 2 s for as long as a job runs: its reply stays small.
CURVE_POINTS = 300
CURVES_SHOWN = ("loss", "eval_loss")
LOG_LINES = 20
SAMPLES = 3
SAMPLE_CHARS = 400


class JobView(BaseModel):
    """What the view draws for one job."""

    job: dict[str, Any]
    progress: dict[str, Any]
    terminal: bool
    dataset: str | None
    run_dir: str | None
    curves: dict[str, list[list[float]]]
    timeline: list[dict[str, Any]]
    log_tail: str
    evaluation: dict[str, Any] | None
    artifacts: list[dict[str, Any]]
    error: dict[str, Any] | None
    polled_at: float


def _cut(text: Any) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + "…"


def _answer(answer: Any) -> str | None:
    return _cut(answer.get("text")) if isinstance(answer, dict) else None


def _evaluation(found: dict | None) -> dict | None:
    if not found:
        return None
    samples = [{"prompt": _cut(s.get("prompt")), "expected": _cut(s.get("expected")), "base": _answer(s.get("base")),
                "quantized": _answer(s.get("quantized"))} for s in (found.get("samples") or [])[:SAMPLES]]
    return {**found, "samples": samples}


def app_view(full: dict) -> JobView:
    """ui_data.job_view's reply as the view needs it: two curves, thinned; a short log; a few answers."""
    log_lines = (full.get("log_tail") or "").splitlines()[-LOG_LINES:]
    return JobView(job=full["job"], progress=full["progress"], terminal=full["terminal"], dataset=full.get("dataset"),
                   run_dir=full.get("run_dir"),
                   curves={name: ui_data.thin(full["curves"].get(name) or [], CURVE_POINTS) for name in CURVES_SHOWN},
                   timeline=full["timeline"][-20:], log_tail="\n".join(log_lines),
                   evaluation=_evaluation(full.get("evaluation")), artifacts=full["artifacts"], error=full["error"],
                   polled_at=time.time())


async def forge_job_view(job_id: JobIdArg, ctx: Context) -> JobView:
    """One job as the Forge job view draws it: status, stage, progress, loss curve, evaluation table,
    error. Called by the view (an MCP App) every few seconds while the job runs, not by the model."""
    store = runner_of(ctx).store
    return app_view(await anyio.to_thread.run_sync(ui_data.job_view, store, job_id))


def build_apps() -> Apps:
    """The Apps extension: the view's page and its tool. Pass to ``MCPServer(extensions=[...])``."""
    apps = Apps()
    apps.tool(resource_uri=VIEW_URI, visibility=["app"], name=VIEW_TOOL, title="Job view data",
              description=inspect.cleandoc(forge_job_view.__doc__ or ""), annotations=READ_ONLY)(forge_job_view)
    apps.add_html_resource(VIEW_URI, VIEW_HTML.read_text(encoding="utf-8"), name="forge-job-view",
                           title="Forge job", description="One Forge job, live: progress, loss curve, evaluation.",
                           prefers_border=True)
    return apps


def negotiated(ctx: Any) -> bool:
    """Whether the client behind a request negotiated Apps; no request (a call from code) means no."""
    if ctx is None:
        return False
    try:
        return client_supports_apps(ctx)
    except ValueError:  # a Context made outside a request
        return False


def is_view_uri(uri: Any) -> bool:
    return str(uri).startswith("ui://")


def tools_for(tools: list[Tool], apps: bool) -> list[Tool]:
    """tools/list for one client: with Apps, the job tools point at the view; without, the list it
    always had (the view's tool left out)."""
    if not apps:
        return [tool for tool in tools if tool.name != VIEW_TOOL]
    return [tool.model_copy(update={"meta": {**(tool.meta or {}), "ui": {"resourceUri": VIEW_URI}}})
            if tool.name in SHOWN_ON else tool for tool in tools]


def resources_for(resources: list[Resource], apps: bool) -> list[Resource]:
    return resources if apps else [r for r in resources if not is_view_uri(r.uri)]
