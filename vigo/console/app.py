"""The console's web server: aiohttp over TLS, jinja2 templates with autoescaping, read-only.

    browser ──HTTPS (fleet CA certificate)──▶ ConsoleServer ──Source.admin(op, args)──▶ a gateway
                                                 │                                      ▶ the primary
                                                 └─ views.py (pages as data) ─▶ templates/ | JSON

Every page has its JSON at ``/api/...`` (docs/console.md lists the URLs). Nothing is served
without a login: a browser exchanges the Ray cluster token for a session cookie (``/login``)
or opens a one-time link from `vigocli console`; a script sends the token as a bearer header
to ``/api/...``. The cookie is ``__Host-`` prefixed, HttpOnly, Secure, SameSite=Strict, and
expires with its session. Every answer carries a strict Content-Security-Policy (no script at
all, styles and images only from the console itself), and the console has no write but the
login itself: POSTs must come from its own origin.

The data comes from a ``Source`` (the console actor gives one that asks a gateway; tests give
one over a partition in the same process). Its answers are admin-operation answers,
``{"ok": ...}`` or ``{"error": {"code", "reason"}}``: the same operations vigocli runs.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import jinja2
from aiohttp import web

from vigo import __version__
from vigo.console import views
from vigo.console.sessions import Sessions
from vigo.errors import ConsoleRefusal as Refused
from vigo.timefmt import iso

log = logging.getLogger("vigo.console")

COOKIE = "__Host-vigo_console"
#: The one policy for every answer: no script, no frame, no plugin; styles and images from the
#: console only; forms post back to it. (docs/console.md explains each directive.)
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on its own
    # form posts, and the login's same-origin check needs the real origin.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: Largest login form body, bytes (a token is about 64 characters).
MAX_BODY_BYTES = 4096
#: Error codes of admin answers -> HTTP status.
HTTP_OF_CODE = {"bad_body": 400, "not_found": 404, "conflict": 409, "unavailable": 503, "overloaded": 503}
#: How long a page waits for its data before saying the server did not answer, seconds.
READ_TIMEOUT_S = 20.0
#: Pages that need no login.
PUBLIC = ("/login", "/login/once/", "/static/", "/api/login-link")


class Source(Protocol):
    """Where the console reads the fleet."""

    async def admin(self, op: str, args: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """An admin operation's answer ({"ok"} or {"error"}) and who answered it (a gateway's name)."""

    async def gateways(self) -> list[dict[str, Any]]:
        """Each gateway's own status (name, state, advertise, connections, counters)."""


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("vigo.console", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = lambda ts: iso(ts) if ts else "never"
    env.filters["ago"] = _ago
    env.filters["pos"] = lambda p: f"{p[0]} / {int(p[1]):08x} / {p[2]}" if p else "none"
    env.filters["json"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    return env


def _ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    delta = (now or time.time()) - ts
    if delta < 0:
        return "just now" if delta > -5 else "in " + _span(-delta)
    return _span(delta) + " ago"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


class ConsoleServer:
    """The aiohttp application and its TLS listener. ``start`` binds, ``stop`` lets go."""

    def __init__(self, source: Source, sessions: Sessions, *, host: str, port: int,
                 cert_pem: bytes | None = None, key_pem: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.sessions = sessions
        self.host = host
        self.port = port
        self.clock = clock
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self.templates = _templates()
        self.app = self.build()
        self.runner: web.AppRunner | None = None
        self.requests = 0

    # --- the application -----------------------------------------------------------------

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        r = app.router
        r.add_get("/login", self.login_form)
        r.add_post("/login", self.login)
        r.add_get("/login/once/{code}", self.login_once)
        r.add_post("/api/login-link", self.login_link)
        r.add_post("/logout", self.logout)
        r.add_static("/static/", Path(__file__).parent / "static", append_version=False)
        for path, handler in (("/", self.overview), ("/envoys", self.envoys), ("/envoys/{envoy_id}", self.envoy),
                              ("/topology", self.topology), ("/stack", self.stack)):
            r.add_get(path, self._page(handler))
            r.add_get("/api" + (path if path != "/" else "/overview"), self._json(handler))
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """Every request: size of the target, login, same-origin POSTs, headers on every answer."""
        self.requests += 1
        started = time.perf_counter()
        api = request.path.startswith("/api/")
        try:
            if len(request.raw_path) > views.MAX_TARGET_CHARS:
                raise Refused(414, f"the request target is {len(request.raw_path)} characters long; "
                                   f"the console reads at most {views.MAX_TARGET_CHARS}")
            if request.method == "POST":
                self._same_origin(request)
            if not request.path.startswith(PUBLIC) and not self._authenticated(request):
                if api or request.method != "GET":
                    raise Refused(401, "log in first: a session cookie from /login, or the cluster token "
                                       "as `Authorization: Bearer ...`")
                response = _redirect("/login?" + _q({"next": request.path_qs}))
            else:
                response = await handler(request)
        except Refused as exc:
            response = self._refusal(request, exc.status, exc.message, api)
        except web.HTTPException as exc:  # aiohttp's own: no such route, method not allowed, body too large
            response = self._refusal(request, exc.status, exc.reason, api)
        except Exception:  # a bug: logged with its traceback, the page says only that it failed
            log.exception("console request %s %s failed", request.method, request.path)
            response = self._refusal(request, 500, "the console failed on this request (see its log)", api)
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        # The server's own time for this answer (reading, rendering), as browsers' tools show it.
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
        return response

    def _refusal(self, request: web.Request, status: int, message: str, api: bool) -> web.Response:
        if api:
            return web.json_response({"error": {"status": status, "reason": message}}, status=status)
        html = self.templates.get_template("error.html").render(
            status=status, message=message, logged_in=self._authenticated(request), nav=None, banner=None,
            version=__version__)
        return web.Response(text=html, status=status, content_type="text/html")

    def _same_origin(self, request: web.Request) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"https://{request.host}":
            raise Refused(403, f"a POST from {origin[:80]} is refused: the console takes forms from its own "
                               "origin only")

    def _authenticated(self, request: web.Request) -> bool:
        if self.sessions.check(request.cookies.get(COOKIE)) is not None:
            return True
        auth = request.headers.get("Authorization", "")
        return request.path.startswith("/api/") and auth.startswith("Bearer ") and self.sessions.token_ok(auth[7:])

    # --- login ---------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        return self._html("login.html", status=200, error=None, next=_next(request.query.get("next")), nav=None,
                          banner=None, logged_in=False)

    async def login(self, request: web.Request) -> web.Response:
        client = request.remote or "?"
        if self.sessions.throttled(client):
            raise Refused(429, "too many failed logins from this address; wait a minute")
        form = await request.post()
        token, target = form.get("token"), _next(form.get("next"))
        if not isinstance(token, str) or not self.sessions.token_ok(token):
            self.sessions.failed(client)
            log.warning("console login refused from %s", client)
            return self._html("login.html", status=401, error="that is not the cluster token", next=target,
                              nav=None, banner=None, logged_in=False)
        log.info("console login from %s", client)
        return self._with_session(_redirect(target))

    async def login_once(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        if len(code) > 64 or self.sessions.throttled(request.remote or "?"):
            raise Refused(400, "that login link is not valid")
        session = self.sessions.redeem_link(code)
        if session is None:
            self.sessions.failed(request.remote or "?")
            raise Refused(403, "that login link is used, expired or unknown; run `vigocli console` for a new one")
        log.info("console login by one-time link from %s", request.remote)
        return self._with_session(_redirect("/"), session)

    async def login_link(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not (auth.startswith("Bearer ") and self.sessions.token_ok(auth[7:])):
            raise Refused(401, "a login link needs the cluster token as `Authorization: Bearer ...`")
        code, expires = self.sessions.issue_link()
        return web.json_response({"path": f"/login/once/{code}", "expires_at": expires})

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.end(request.cookies.get(COOKIE))
        response = _redirect("/login")
        response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return response

    def _with_session(self, response: web.Response, session: Any = None) -> web.Response:
        session = session or self.sessions.create()
        response.set_cookie(COOKIE, session.id, max_age=int(session.expires_at - session.created_at), path="/",
                            secure=True, httponly=True, samesite="Strict")
        return response

    # --- pages -----------------------------------------------------------------------------

    def _page(self, handler: Callable[[web.Request], Awaitable[tuple[str, dict[str, Any]]]]):
        async def serve(request: web.Request) -> web.Response:
            name, data = await handler(request)
            return self._html(f"{name}.html", status=200, nav=name, logged_in=True, banner=data.pop("_banner"),
                              **data)
        return serve

    def _json(self, handler: Callable[[web.Request], Awaitable[tuple[str, dict[str, Any]]]]):
        async def serve(request: web.Request) -> web.Response:
            _name, data = await handler(request)
            data["read"] = data.pop("_banner")
            return web.json_response(data, dumps=lambda v: json.dumps(v, default=str))
        return serve

    def _html(self, template: str, status: int, **context: Any) -> web.Response:
        html = self.templates.get_template(template).render(version=__version__, **context)
        return web.Response(text=html, status=status, content_type="text/html")

    async def _read(self, op: str, args: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """One admin operation: (its result, the banner saying when and from whom), or Refused."""
        import asyncio

        try:
            answer, source = await asyncio.wait_for(self.source.admin(op, args or {}), READ_TIMEOUT_S)
        except TimeoutError as exc:
            raise Refused(504, f"the server did not answer {op} within {READ_TIMEOUT_S:.0f} s") from exc
        except Exception as exc:  # no gateway, no primary: the page says so instead of failing
            raise Refused(503, f"the server cannot be read now ({type(exc).__name__}: {str(exc)[:200]})") from exc
        if "error" in answer:
            err = answer["error"] or {}
            raise Refused(HTTP_OF_CODE.get(err.get("code"), 502), str(err.get("reason") or err)[:500])
        now = self.clock()
        return answer["ok"], {"read_at": now, "read_at_iso": iso(now), "source": source, "op": op}

    async def overview(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        views.parse_query(list(request.query.items()), ())
        status, banner = await self._read("status")
        if status.get("spanner"):
            raise Refused(501, "the console does not show spanner deployments yet; use `vigocli server status`")
        return "overview", {**views.overview(status), "_banner": banner}

    async def envoys(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        query = views.parse_query(list(request.query.items()), views.ENVOYS_QUERY)
        page, banner = await self._read("envoys.page", query)
        return "envoys", {**views.envoys(page, query), "_banner": banner}

    async def envoy(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        envoy_id = views.check_envoy_id(request.match_info["envoy_id"])
        query = views.parse_query(list(request.query.items()), views.ENVOY_QUERY)
        record, banner = await self._read("envoys.show", {"envoy_id": envoy_id,
                                                          "runs": query.get("runs", views.DEFAULT_RUNS)})
        return "envoy", {"envoy": views.envoy(record), "_banner": banner}

    async def topology(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        views.parse_query(list(request.query.items()), ())
        status, banner = await self._read("status")
        if status.get("spanner"):
            raise Refused(501, "the console does not show spanner deployments yet; use `vigocli spanner status`")
        try:
            gateways = await self.source.gateways()
        except Exception as exc:
            gateways = [{"name": "?", "state": f"unknown ({type(exc).__name__})"}]
        return "topology", {**views.topology(status, gateways), "_banner": banner}

    async def stack(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        views.parse_query(list(request.query.items()), ())
        show, banner = await self._read("stack.show")
        return "stack", {**views.stack(show), "_banner": banner}

    # --- serving -------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.cert_pem is None:
            return None
        from vigo.crypto.tls import load_cert_chain_pem

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_cert_chain_pem(ctx, self.cert_pem, self.key_pem)
        return ctx

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl_context(), reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("console serving on https://%s:%d/", self.host, self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _next(value: Any) -> str:
    """Where to go after the login: a path on the console only (never //host or a URL)."""
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//") and "\\" not in value \
            and len(value) <= views.MAX_TARGET_CHARS:
        return value
    return "/"


def _q(params: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode(params)
