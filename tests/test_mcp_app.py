"""The MCP App: a client that negotiates Apps finds the job view on the job tools, reads its page and
follows a real job through the app-only tool; a client without Apps sees exactly the server without the
App. The view itself runs in a real browser, inside a minimal Apps host that forwards its calls to the
real server."""

import json
import os
import shutil
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client import advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID
from mcp.shared.exceptions import MCPError

from helpers import TERMINAL, call, call_ok, stop_runner, wait_job
from mcp_servers.forge.server import create_server
from mcp_servers.forge.ui_app import VIEW_TOOL, VIEW_URI

pytestmark = pytest.mark.anyio
MODES = ["legacy", "2026-07-28"]
# The tools whose reply names a job: status, wait, and every tool that starts one.
JOB_TOOLS = {"forge_job_status", "forge_job_wait", "forge_train", "forge_merge", "forge_quantize", "forge_pipeline",
             "forge_evaluate", "forge_publish", "forge_sweep"}
UNKNOWN_JOB = "train-20000101-000000-000000"
# What a dataset may hold: the view must show it as text, never run it.
HOSTILE = """<img src=x onerror="parent.postMessage('pwned','*')"><script>parent.postMessage('pwned','*')</script>"""
HOSTILE_ID = """<img src=x onerror="parent.postMessage('pwned','*')">"""  # fits a job id's 64 characters


def apps_client(server, mode: str = "auto") -> Client:
    return Client(server, mode=mode, extensions=[advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})])


def stdio_server(home: Path):
    """A second server process over stdio: the negotiation as it crosses a real wire."""
    from mcp import StdioServerParameters

    return StdioServerParameters(command=sys.executable, args=["-m", "mcp_servers.forge.server"],
                                 env={**os.environ, "FORGE_HOME": str(home)}, cwd=str(Path(__file__).parent.parent))


def wire(result) -> str:
    return result.model_dump_json(by_alias=True, exclude_none=True)


@pytest.fixture
def roots(assets, monkeypatch):
    monkeypatch.setenv("FORGE_ALLOWED_ROOTS", str(Path(assets["model_dir"]).parent))


@pytest.mark.parametrize("mode", [*MODES, "stdio"])
async def test_an_apps_client_finds_the_view_on_the_job_tools_and_reads_its_page(home, mode):
    server = create_server()
    try:
        target, mode = (stdio_server(home), "auto") if mode == "stdio" else (server, mode)
        async with apps_client(target, mode) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            listed = (await client.list_resources()).resources
            page = (await client.read_resource(VIEW_URI)).contents[0]
            unknown = await call(client, VIEW_TOOL, {"job_id": UNKNOWN_JOB})
        async with Client(target, mode=mode) as client:
            plain = {t.name: t.meta for t in (await client.list_tools()).tools}
    finally:
        stop_runner(server.runner)
    assert unknown["error"]["code"] == "job_not_found" and VIEW_TOOL not in plain and not any(plain.values())
    shown = {name for name, tool in tools.items() if (tool.meta or {}).get("ui", {}).get("resourceUri") == VIEW_URI}
    assert shown == JOB_TOOLS | {VIEW_TOOL}
    view_tool = tools[VIEW_TOOL]
    assert view_tool.meta["ui"]["visibility"] == ["app"]  # a host that renders Apps hides it from the model
    assert view_tool.annotations.read_only_hint is True and view_tool.input_schema["required"] == ["job_id"]
    assert all("visibility" not in tools[name].meta["ui"] for name in JOB_TOOLS)  # the model still calls them
    assert [(str(r.uri), r.mime_type) for r in listed] == [(VIEW_URI, APP_MIME_TYPE)]
    assert page.mime_type == APP_MIME_TYPE and str(page.uri) == VIEW_URI
    html = page.text
    assert html.lstrip().lower().startswith("<!doctype html>") and "ui/initialize" in html and VIEW_TOOL in html
    # self-contained, and data never parsed as HTML: the host's sandbox allows no fetch and no outside file
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "fetch(", "XMLHttpRequest",
                   'src="http', "src='http", 'href="http', "@import"):
        assert banned not in html, banned


async def listing(client) -> dict:
    """Everything a client can see of a server, and how it answers what it does not have."""
    seen = {"tools": wire(await client.list_tools()), "resources": wire(await client.list_resources()),
            "templates": wire(await client.list_resource_templates())}
    for name, args in [(VIEW_TOOL, {"job_id": UNKNOWN_JOB}), ("forge_job_status", {"job_id": UNKNOWN_JOB}),
                       ("forge_job_wait", {"job_id": UNKNOWN_JOB, "timeout_s": 0})]:
        seen[name] = wire(await client.call_tool(name, args))
    try:
        await client.read_resource(VIEW_URI)
        seen["read"] = "read"
    except MCPError as err:
        seen["read"] = (err.code, err.message)
    return seen


@pytest.mark.parametrize("mode", MODES)
async def test_a_client_without_apps_sees_exactly_the_server_without_the_app(home, mode):
    with_app, without = create_server(), create_server(apps=False)
    try:
        async with Client(without, mode=mode) as client:
            before = await listing(client)
        async with Client(with_app, mode=mode) as client:
            plain = await listing(client)
        # the extension named without the App's MIME type is not Apps either
        async with Client(with_app, mode=mode, extensions=[advertise(EXTENSION_ID, {})]) as client:
            no_mime = await listing(client)
        async with apps_client(with_app, mode) as client:
            negotiated = await listing(client)
    finally:
        stop_runner(with_app.runner)
        stop_runner(without.runner)
    assert plain == before and no_mime == before
    assert VIEW_TOOL not in plain["tools"] and "ui://" not in plain["tools"] + plain["resources"]
    assert "there is no tool named" in plain[VIEW_TOOL] and plain["read"][1] == f"Unknown resource: {VIEW_URI}"
    # the App changes what an Apps client lists, and nothing it is answered
    assert negotiated["tools"] != before["tools"] and negotiated["read"] == "read"
    assert json.loads(negotiated[VIEW_TOOL])["content"][0]["text"].startswith('{"code": "job_not_found"')
    assert negotiated["forge_job_status"] == before["forge_job_status"]


async def test_the_view_tool_follows_a_real_job_and_job_replies_are_the_same_with_or_without_apps(home, assets,
                                                                                                   roots):
    server = create_server()
    try:
        async with apps_client(server) as client, Client(server) as plain:
            handle = await call_ok(client, "forge_train", {"base_model": assets["model_dir"],
                                                           "dataset": assets["dataset"],
                                                           "hyperparameters": {"max_steps": 6}})
            views = []
            with anyio.fail_after(900):
                while not views or not views[-1]["terminal"]:
                    views.append(await call_ok(client, VIEW_TOOL, {"job_id": handle["job_id"]}))
                    await anyio.sleep(0.5)
            replies = {}
            for who, each in (("apps", client), ("plain", plain)):
                for name, args in [("forge_job_status", {"job_id": handle["job_id"]}),
                                   ("forge_job_wait", {"job_id": handle["job_id"], "timeout_s": 0})]:
                    result = await each.call_tool(name, args)
                    replies[who, name] = (result.structured_content, result.content[0].text, result.is_error)
            refused = await call(client, VIEW_TOOL, {"job_id": "../../etc/passwd"})
            too_long = await call(client, VIEW_TOOL, {"job_id": "x" * 65})
    finally:
        stop_runner(server.runner)
    last = views[-1]
    assert last["job"]["id"] == handle["job_id"] and last["job"]["status"] == "succeeded" and last["error"] is None
    assert last["job"]["step"] == last["job"]["total_steps"] == 6 and last["job"]["percent"] == 100.0
    loss = last["curves"]["loss"]
    assert [step for step, _ in loss] == [1, 2, 3, 4, 5, 6] and all(value > 0 for _, value in loss)
    assert all(v["job"]["status"] in ("queued", "running", *TERMINAL) for v in views)
    for name in ("forge_job_status", "forge_job_wait"):
        assert replies["apps", name] == replies["plain", name]
        assert replies["apps", name][0]["status"] == "succeeded"
    assert refused["error"]["code"] == "job_not_found" and set(refused["error"]) == {
        "code", "message", "hint", "retryable", "details"}
    assert too_long["error"]["code"] == "invalid_argument"


# ---- the view in a real browser, in a minimal host ----

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "media-src data:; connect-src 'none'; frame-src 'none'; object-src 'none'; base-uri 'none'")

# A host that renders Apps, as little of one as the view needs: the page in a sandboxed iframe with the
# spec's default CSP; the ui/initialize answer; the tool's input and result once the view is initialized;
# tools/call forwarded to the real server (window.forgeCallTool, bound by the test); sizes applied.
HOST_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Apps host</title>
<style>body { margin: 0; padding: 16px; background: #eef1f4; font-family: sans-serif; }
iframe { width: 760px; height: 200px; border: 1px solid #c8ccd0; background: #fff; display: block; }</style>
</head><body><div id="slot"></div><script>
window.received = []; window.pwned = 0; window.calls = [];
let frame = null, handOver = null;
function toView(message) { frame.contentWindow.postMessage({jsonrpc: "2.0", ...message}, "*"); }
window.showView = (html, input, result) => {
  document.getElementById("slot").replaceChildren();
  frame = document.createElement("iframe");
  frame.id = "view";
  frame.setAttribute("sandbox", "allow-scripts");
  frame.srcdoc = html;
  handOver = {input, result};
  document.getElementById("slot").appendChild(frame);
};
window.addEventListener("message", async (event) => {
  if (event.data === "pwned") { window.pwned += 1; return; }
  if (!frame || event.source !== frame.contentWindow) return;
  const message = event.data;
  window.received.push(message.method || "response");
  if (message.method === "ui/initialize") {
    toView({id: message.id, result: {protocolVersion: "2026-01-26", hostInfo: {name: "forge-test-host", version: "1"},
      hostCapabilities: {serverTools: {}}, hostContext: {theme: "light", displayMode: "inline", locale: "en-GB"}}});
  } else if (message.method === "ui/notifications/initialized") {
    toView({method: "ui/notifications/tool-input", params: {arguments: handOver.input}});
    toView({method: "ui/notifications/tool-result", params: handOver.result});
  } else if (message.method === "tools/call") {
    window.calls.push(message.params.name);
    const result = await window.forgeCallTool(message.params.name, message.params.arguments || {});
    toView({id: message.id, result});
  } else if (message.method === "ui/notifications/size-changed") {
    frame.style.height = `${Math.min(message.params.height, 2000)}px`;
  } else if (message.id !== undefined) {
    toView({id: message.id, error: {code: -32601, message: "not in this host"}});
  }
});
</script></body></html>"""


def with_csp(html: str) -> str:
    head = html.index("<head>") + len("<head>")
    return f'{html[:head]}<meta http-equiv="Content-Security-Policy" content="{CSP}">{html[head:]}'


def browser_or_skip() -> str:
    pytest.importorskip("playwright.async_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no chromium to run the view in")
    return chromium


async def test_the_view_shows_a_live_job_in_a_browser_host_and_hostile_text_as_text(home, assets, roots, tmp_path):
    chromium = browser_or_skip()
    from playwright.async_api import async_playwright

    dataset = home / "hostile.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    dataset.write_text("".join(json.dumps({"instruction": f"Say {HOSTILE} {n}", "input": "",
                                           "output": f"{HOSTILE} is {n}."}) + "\n" for n in range(40)),
                       encoding="utf-8")
    shots = Path(os.environ.get("FORGE_UI_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    server = create_server()
    try:
        async with apps_client(server) as client, async_playwright() as playwright:
            html = with_csp((await client.read_resource(VIEW_URI)).contents[0].text)
            browser = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = await browser.new_page(viewport={"width": 800, "height": 1000})

                followed = []  # (job id, status) of each reply the view was handed

                async def forward(name: str, arguments: dict) -> dict:
                    result = await client.call_tool(name, arguments)
                    if not result.is_error:
                        followed.append((arguments.get("job_id"), result.structured_content["job"]["status"]))
                    return result.model_dump(mode="json", by_alias=True, exclude_none=True)

                await page.expose_function("forgeCallTool", forward)
                await page.set_content(HOST_PAGE)

                async def show(tool: str, arguments: dict) -> dict:
                    result = await client.call_tool(tool, arguments)
                    await page.evaluate("([html, input, result]) => window.showView(html, input, result)",
                                        [html, arguments, result.model_dump(mode="json", by_alias=True,
                                                                            exclude_none=True)])
                    return result.structured_content

                # a job id that is no job (and is markup): the error, as text
                await show("forge_job_status", {"job_id": HOSTILE_ID})
                view = page.frame_locator("#view")
                await view.locator("#error-code").filter(has_text="job_not_found").wait_for(timeout=60_000)
                refused = (await view.locator("#error-message").text_content(),
                           await view.locator("img").count())

                # a training job, followed live from its handle until it ends
                train_args = {"base_model": assets["model_dir"], "dataset": str(dataset),
                              "hyperparameters": {"max_steps": 12}}
                train = await show("forge_train", train_args)
                await view.locator("#status").filter(has_text="succeeded").wait_for(timeout=600_000)
                first = await page.evaluate("window.calls.length")
                trained = await call_ok(client, VIEW_TOOL, {"job_id": train["job_id"]})
                polyline = await view.locator("polyline.loss").get_attribute("points")
                drawn = {"points": len(polyline.split()), "bar": await view.locator("#bar-fill").get_attribute("style"),
                         "step": await view.locator("#step").text_content(),
                         "job": await view.locator("#job-id").text_content()}
                await page.screenshot(path=str(shots / "mcp-app-train.png"), full_page=True)

                # its evaluation: the answers table holds the dataset's text
                await wait_job(client, train["job_id"])
                evaluate = await show("forge_evaluate", {"run": train["job_id"]})
                await view.locator("#evaluation-box").wait_for(state="visible", timeout=600_000)
                await view.locator("#status").filter(has_text="succeeded").wait_for(timeout=600_000)
                await view.locator("#answers-box").wait_for(state="visible", timeout=60_000)
                answers = await view.locator("#answers tbody td").all_text_contents()
                models = await view.locator("#evaluation tbody tr").evaluate_all(
                    "rows => rows.map(r => r.getAttribute('data-model'))")
                elements = await view.locator("body").evaluate(
                    "body => ({img: body.querySelectorAll('img').length, scripts: document.scripts.length})")
                await page.screenshot(path=str(shots / "mcp-app.png"), full_page=True)
                host = await page.evaluate("({pwned: window.pwned, calls: window.calls, received: window.received})")
            finally:
                await browser.close()
    finally:
        stop_runner(server.runner)
    assert refused == (f"no job with id {HOSTILE_ID!r}", 0)
    assert drawn["job"] == train["job_id"] and drawn["step"] == "12/12" and "width: 100%" in drawn["bar"]
    assert drawn["points"] == len(trained["curves"]["loss"]) == 12 and first >= 1
    for job_id in (train["job_id"], evaluate["job_id"]):  # polled while it ran; not once it had ended
        statuses = [status for followed_id, status in followed if followed_id == job_id]
        assert statuses[-1] == "succeeded" and not set(statuses[:-1]) & set(TERMINAL), statuses
    assert models == ["base", "fine-tuned"] and evaluate["kind"] == "evaluate"
    assert any(HOSTILE in text for text in answers), answers[:4]  # shown, as the characters it is made of
    assert elements == {"img": 0, "scripts": 1} and host["pwned"] == 0
    assert set(host["calls"]) == {VIEW_TOOL}  # the view asks for nothing but its own tool
    assert host["received"][:2] == ["ui/initialize", "ui/notifications/initialized"]
    assert "ui/notifications/size-changed" in host["received"]
    assert (shots / "mcp-app.png").stat().st_size > 10_000
