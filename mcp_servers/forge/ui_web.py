"""The live view as a web page: ``/ui`` on ``forge-mcp --transport http``, or ``forge ui`` on its own.

One page (static HTML, JS and CSS packaged with Forge, the chart library included: nothing is fetched
at run time) polls a small read-only JSON API every second. Only GET and HEAD are served; the page
changes nothing. Behind the same rules as /mcp: the Host header must be one the server was told to
answer to, and when FORGE_MCP_TOKEN is set (required off loopback) every request carries it, as an
``Authorization: Bearer`` header, or the ``forge_ui`` cookie the page sets when first opened with
``?token=…``. Every string from a dataset, a model or a job is put on the page as text, never as HTML.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from forge.errors import Codes, ForgeError
from mcp_servers.forge import ui_data
from mcp_servers.lib.errors import JobCodes
from mcp_servers.lib.store import JobStore

log = logging.getLogger("forge.ui")
STATIC = Path(__file__).with_name("ui_static")
# The only files served: name → (path under ui_static, content type). Nothing else under any name.
FILES = {
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "app.css": ("app.css", "text/css; charset=utf-8"),
    "uPlot.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uPlot.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
}
COOKIE = "forge_ui"
HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                 b"img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                 b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]

StoreSource = Callable[[], JobStore | None]


def store_in(home: Path) -> StoreSource:
    """The job store of ``home`` once it exists; the page never creates one."""
    opened: list[JobStore] = []
    lock = threading.Lock()

    def source() -> JobStore | None:
        with lock:  # two first requests at once open one store, not two
            if not opened and (home / "forge.db").is_file():
                opened.append(JobStore(home / "forge.db"))
        return opened[0] if opened else None

    return source


def _split_host(host: str) -> tuple[str, str | None]:
    if host.startswith("["):  # [::1]:8765
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    name, sep, port = host.rpartition(":")
    return (name, port) if sep else (host, None)


def host_allowed(host: str, allowed: list[str]) -> bool:
    """The Host header against the names the server answers to (``name``, or ``name:*`` for any port)."""
    name, port = _split_host(host)
    return any(host == pattern or (pattern.endswith(":*") and port is not None and name == pattern[:-2])
               for pattern in allowed)


def finite(value):
    """JSON has no NaN or Infinity: a non-finite number is sent as null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def with_ui(app, ui: UiApp):
    """``app`` with the view mounted at ``ui.prefix``; everything else still goes to ``app``."""

    async def routed(scope, receive, send):
        if scope["type"] == "http" and (scope["path"] == ui.prefix or scope["path"].startswith(ui.prefix + "/")):
            return await ui(scope, receive, send)
        return await app(scope, receive, send)

    return routed


class UiApp:
    """The ASGI app under ``prefix`` (``/ui``)."""

    def __init__(self, stores: StoreSource, token: str | None, allowed_hosts: list[str], prefix: str = "/ui",
                 root_redirect: bool = False):
        self.stores, self.token, self.allowed_hosts, self.prefix = stores, token, allowed_hosts, prefix
        self.root_redirect = root_redirect  # served on its own (forge ui): / leads to the view

    @property
    def pass_value(self) -> str:
        """What the cookie holds: derived from the token, never the token itself (which opens /mcp too, and a
        cookie goes to every port of the host)."""
        return hmac.new(self.token.encode("utf-8"), b"forge ui cookie", hashlib.sha256).hexdigest()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        try:
            await self._serve(scope, send)
        except Exception:  # a defect of ours: one JSON error, the traceback in the server's log only
            log.exception("the view failed on %s", scope.get("path", "")[:200])
            await _send(send, 500, {"error": {"code": Codes.INTERNAL, "message": "the view failed",
                                              "hint": "see the server's log"}})

    async def _serve(self, scope, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        path = scope["path"]
        if not host_allowed(headers.get("host", ""), self.allowed_hosts):
            return await _send(send, 421, {"error": "this server does not answer to that Host"})
        if scope["method"] not in ("GET", "HEAD"):
            return await _send(send, 405, {"error": "the view is read-only: GET only"}, [(b"allow", b"GET, HEAD")])
        query = _query(scope.get("query_string", b""))
        given = query.get("token")
        if self.token and not self._authorized(headers, given):
            return await _send(send, 401, {"error": "missing or wrong token (FORGE_MCP_TOKEN)",
                                           "hint": "open the page as /ui/?token=<FORGE_MCP_TOKEN>"},
                               [(b"www-authenticate", b"Bearer")])
        if given is not None:  # out of the URL; with a token, a cookie for the page's own requests instead
            extra = [(b"location", f"{self.prefix}/".encode())]
            if self.token:
                extra.append((b"set-cookie", f"{COOKIE}={self.pass_value}; Path={self.prefix}; HttpOnly; "
                                             "SameSite=Strict".encode()))
            return await _send_raw(send, 303, b"", "text/plain", extra)
        if self.root_redirect and path == "/":
            return await _send_raw(send, 307, b"", "text/plain", [(b"location", f"{self.prefix}/".encode())])
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            return await _send(send, 404, {"error": "no such page"})
        rest = path[len(self.prefix):]
        if rest in ("", "/"):
            if rest == "":
                return await _send_raw(send, 307, b"", "text/plain", [(b"location", f"{self.prefix}/".encode())])
            return await _send_raw(send, 200, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")
        if rest.startswith("/static/"):
            return await self._static(send, rest.removeprefix("/static/"))
        if rest.startswith("/api/"):
            return await self._api(send, rest.removeprefix("/api/"), query, headers.get("if-none-match"))
        return await _send(send, 404, {"error": "no such page"})

    def _authorized(self, headers: dict, given: str | None) -> bool:
        """The token as a bearer header or in the URL, or the cookie the page was given (compared as bytes, in
        constant time)."""
        token = self.token.encode("utf-8")
        offered = [(headers.get("authorization", "").removeprefix("Bearer ").encode("latin-1"), token)]
        if given is not None:
            offered.append((given.encode("utf-8", errors="surrogateescape"), token))
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                offered.append((value.encode("latin-1"), self.pass_value.encode()))
        return any(hmac.compare_digest(got, expected) for got, expected in offered)

    async def _static(self, send, name: str):
        if name not in FILES:
            return await _send(send, 404, {"error": "no such file"})
        relative, content_type = FILES[name]
        path = STATIC / relative
        if not path.is_file():
            return await _send(send, 404, {"error": f"{relative} is not installed",
                                           "hint": "run make install (it fetches the chart library with npm)"})
        return await _send_raw(send, 200, path.read_bytes(), content_type)

    async def _api(self, send, what: str, query: dict, seen: str | None = None):
        """The JSON of one view; ``seen`` is the ETag of the page's last copy: when nothing changed, a bodyless
        304 (the page then does no work at all)."""
        import anyio

        try:
            body = await anyio.to_thread.run_sync(lambda: self._answer(what, query))
        except ForgeError as err:
            if err.code == Codes.INTERNAL:
                raise
            status = 404 if err.code in (JobCodes.JOB_NOT_FOUND, Codes.SEAL_NOT_FOUND, Codes.FILE_NOT_FOUND) else 400
            return await _send(send, status, {"error": err.to_dict()})
        if body is None:
            return await _send(send, 404, {"error": "no such API"})
        data = _json(body)
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        if seen == etag:
            return await _send_raw(send, 304, b"", "application/json", [(b"etag", etag.encode())])
        return await _send_raw(send, 200, data, "application/json", [(b"etag", etag.encode())])

    def _answer(self, what: str, query: dict):
        store = self.stores()
        if what == "jobs":
            return {"jobs": ui_data.job_list(store)}
        if what.startswith("jobs/") and what.count("/") == 1:
            return ui_data.job_view(store, _job_id(what.removeprefix("jobs/")))
        if what == "compare":
            ids = [_job_id(i) for i in query.get("ids", "").split(",") if i][:8]
            return {"runs": ui_data.compare(store, ids)}
        if what == "seals":
            return {"seals": ui_data.seals()}
        return None


def _query(raw: bytes) -> dict[str, str]:
    """A query string's first value per name, percent-decoded as UTF-8 ('+' stays '+': a token may hold one)."""
    out: dict[str, str] = {}
    for part in raw.decode("latin-1").split("&"):
        name, _, value = part.partition("=")
        out.setdefault(unquote(name), unquote(value, errors="surrogateescape"))
    return out


def _job_id(value: str) -> str:
    if len(value) > 64:
        raise ForgeError(Codes.INVALID_ARGUMENT, f"a job id has at most 64 characters (got {len(value)})",
                         "pass an id as the job list shows it")
    return value


def _json(body) -> bytes:
    return json.dumps(finite(body), default=str, allow_nan=False).encode("utf-8")


async def _send(send, status: int, body: dict, extra: list | None = None):
    await _send_raw(send, status, _json(body), "application/json", extra)


async def _send_raw(send, status: int, body: bytes, content_type: str, extra: list | None = None):
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
               *HEADERS, *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
