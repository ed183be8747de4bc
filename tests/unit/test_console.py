"""The web console on a real aiohttp server over real TLS (a certificate from a real fleet CA),
reading a real partition: login and sessions, headers, refusals, and what pages show."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
from http.cookiejar import Cookie, CookieJar

import pytest

from tests.consoleharness import TOKEN, running_console
from vigo.console import COOKIE, CSP
from vigo.console.sessions import LINK_TTL_S, MAX_FAILURES

PAGES = ["/", "/envoys", "/topology", "/stack", "/envoys/0123abcd"]
APIS = ["/api/overview", "/api/envoys", "/api/topology", "/api/stack", "/api/envoys/0123abcd"]
SECRET = "s3cr3t-value-never-shown-4f1c"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def clock():
    return Clock()


@pytest.fixture(scope="module")
def console(tmp_path_factory, clock):
    with running_console(tmp_path_factory.mktemp("console"), clock=clock, ttl_s=600.0) as c:
        _seed(c.partition)
        yield c


def _seed(partition) -> None:
    """Two envoys, one with a hostile hostname, runs with per-resource outcomes (one offline),
    and a secret the stack uses."""
    partition.admin("secrets.set", {"name": "api_token", "value": SECRET})
    now = time.time()
    with partition.store.write() as db:
        for envoy_id, host, offline_runs in (("0123abcd" + "0" * 24, "web-1", 0),
                                             ("9876fedc" + "0" * 24, "<script>alert(1)</script>", 1)):
            db.execute("INSERT INTO envoys(id, hostname, joined_at, traits, last_seen, interval_s, serial, "
                       "bundle_version, queue_depth, offline_runs, last_run) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (envoy_id, host, now - 100, json.dumps({"os": {"name": "debian"}, "hostname": host}),
                        now, 30.0, 1, "v1", 0, offline_runs, json.dumps({"run_id": "r2", "started_at": now, "offline": False,
                                                              "serial": 1, "counts": {"failed": 1}})))
            db.execute("INSERT INTO certs(serial, envoy_id, issued_at, not_after) VALUES (?,?,?,?)",
                       (envoy_id[:6] + "c1", envoy_id, now - 100, now + 30 * 86400))
    from vigo.server.fleet import store_reports

    with partition.store.write() as db:
        store_reports(db, "0123abcd" + "0" * 24, [
            {"run_id": "r1", "started_at": now - 60, "offline": True, "serial": 1, "counts": {"ok": 1},
             "resources": [{"id": "file:/etc/motd", "type": "file", "policy": "base", "status": "ok",
                            "message": "in place"}]},
            {"run_id": "r2", "started_at": now - 1, "serial": 1, "counts": {"failed": 1, "changed": 1},
             "resources": [{"id": "file:/etc/app.conf", "type": "file", "policy": "web", "status": "changed",
                            "message": "content changed", "diff": "-token=***\n+token=***"},
                           {"id": "exec:reload", "type": "exec", "policy": "web", "status": "failed",
                            "message": "exit 3"}]}], now=now)


def login(console, jar: CookieJar | None = None) -> CookieJar:
    jar = jar if jar is not None else CookieJar()
    with pytest.raises(urllib.error.HTTPError) as answer:  # 303: urllib here never follows redirects
        console.opener(jar).open(console.url + "/login",
                                 data=urllib.parse.urlencode({"token": TOKEN, "next": "/envoys"}).encode())
    assert answer.value.code == 303 and answer.value.headers["Location"] == "/envoys"
    return jar


def get(console, path: str, jar: CookieJar | None = None, headers: dict | None = None):
    """(status, headers, body) of GET ``path``."""
    import urllib.request

    request = urllib.request.Request(console.url + path, headers=headers or {})
    try:
        with console.opener(jar).open(request) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


# --- login ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES + APIS)
def test_nothing_is_served_without_a_session(console, path):
    status, headers, body = get(console, path)
    if path.startswith("/api/"):
        assert status == 401 and "log in first" in json.loads(body)["error"]["reason"]
    else:
        assert status == 303 and headers["Location"] == "/login?" + urllib.parse.urlencode({"next": path})
    assert headers["Content-Security-Policy"] == CSP


def test_the_session_cookie_is_locked_down(console):
    jar = login(console)
    (cookie,) = list(jar)
    assert cookie.name == COOKIE == "__Host-vigo_console" and cookie.secure and cookie.path == "/"
    assert cookie.has_nonstandard_attr("HttpOnly") and cookie.get_nonstandard_attr("SameSite") == "Strict"
    assert cookie.expires is not None and 590 <= cookie.expires - time.time() <= 610
    assert len(cookie.value) >= 40


def test_a_forged_cookie_is_refused(console):
    jar = CookieJar()
    jar.set_cookie(Cookie(0, COOKIE, "forged-session-id-" + "x" * 30, None, False, "127.0.0.1", False, False, "/",
                          True, True, None, False, None, None, {"HttpOnly": None}))
    assert get(console, "/api/overview", jar)[0] == 401
    assert get(console, "/", jar)[0] == 303


def test_an_expired_session_is_refused(console, clock):
    jar = login(console)
    assert get(console, "/api/overview", jar)[0] == 200
    clock.now += 601  # past the session's lifetime (the cookie's Max-Age is the same)
    try:
        assert get(console, "/api/overview", jar)[0] == 401
    finally:
        clock.now -= 601
    assert get(console, "/api/overview", jar)[0] == 401  # dropped for good, not merely hidden


def test_a_wrong_token_is_refused_and_repeated_failures_are_throttled(console, clock):
    def attempt(token: str) -> int:
        try:
            console.opener().open(console.url + "/login", data=urllib.parse.urlencode({"token": token}).encode())
        except urllib.error.HTTPError as exc:
            return exc.code
        return 200

    assert attempt("not-the-token") == 401
    for _ in range(MAX_FAILURES - 1):
        attempt("not-the-token")
    assert attempt(TOKEN) == 429  # even the right one, until the window passes
    clock.now += 61
    try:
        assert attempt(TOKEN) == 303
    finally:
        clock.now -= 61


def test_the_bearer_token_opens_the_json_only(console):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert get(console, "/api/overview", headers=auth)[0] == 200
    assert get(console, "/", headers=auth)[0] == 303  # pages need the login (a cookie)
    assert get(console, "/api/overview", headers={"Authorization": "Bearer wrong"})[0] == 401


def test_a_one_time_link_logs_in_once(console, clock):
    import urllib.request

    def link() -> str:
        request = urllib.request.Request(console.url + "/api/login-link", method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        return json.loads(console.opener().open(request).read())["path"]

    with pytest.raises(urllib.error.HTTPError) as refused:
        console.opener().open(urllib.request.Request(console.url + "/api/login-link", method="POST"))
    assert refused.value.code == 401
    path = link()
    jar = CookieJar()
    status, headers, _ = get(console, path, jar)
    assert status == 303 and headers["Location"] == "/" and len(list(jar)) == 1
    assert get(console, "/api/overview", jar)[0] == 200
    assert get(console, path)[0] == 403  # spent
    stale = link()
    clock.now += LINK_TTL_S + 1
    try:
        assert get(console, stale)[0] == 403
    finally:
        clock.now -= LINK_TTL_S + 1


def test_posts_from_another_origin_and_open_redirects_are_refused(console):
    import urllib.request

    request = urllib.request.Request(console.url + "/login", data=urllib.parse.urlencode({"token": TOKEN}).encode(),
                                     headers={"Origin": "https://evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        console.opener().open(request)
    assert refused.value.code == 403
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        with pytest.raises(urllib.error.HTTPError) as answer:
            console.opener().open(console.url + "/login", data=urllib.parse.urlencode(
                {"token": TOKEN, "next": target}).encode())
        assert answer.value.code == 303 and answer.value.headers["Location"] == "/"


# --- pages and their JSON -------------------------------------------------------------------


@pytest.fixture(scope="module")
def jar(console):
    return login(console)


@pytest.mark.parametrize("path", PAGES + APIS + ["/login", "/static/console.css", "/nowhere"])
def test_every_answer_carries_the_security_headers(console, jar, path):
    status, headers, _ = get(console, path, jar)
    assert status in (200, 404)
    assert headers["Content-Security-Policy"] == CSP
    assert "script-src" not in CSP and "'unsafe-inline'" not in CSP and "default-src 'none'" in CSP
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-store"


def test_overview_counts_in_precedence_order_link_to_their_lists(console, jar):
    code, _, body = get(console, "/api/overview", jar)
    assert code == 200
    data = json.loads(body)
    assert [s["status"] for s in data["statuses"]] == ["revoked", "offline", "enforcing-from-cache", "failed",
                                                       "pending", "converged"]
    counts = {s["status"]: s["count"] for s in data["statuses"]}
    assert counts["failed"] == 1 and counts["enforcing-from-cache"] == 1 and data["envoys"] == 2
    assert data["statuses"][3]["href"] == "/envoys?status=failed"
    assert data["read"]["source"] == "gateway-test" and abs(data["read"]["read_at"] - time.time()) < 60
    html = get(console, "/", jar)[2]
    assert 'href="/envoys?status=failed"' in html and "from <strong>gateway-test</strong>" in html


def test_envoys_page_filters_and_pages_on_the_server(console, jar):
    data = json.loads(get(console, "/api/envoys?status=failed&per_page=1", jar)[2])
    assert (data["total"], data["pages"], [r["hostname"] for r in data["rows"]]) == (1, 1, ["web-1"])
    data = json.loads(get(console, "/api/envoys?hostname=script&sort=hostname&order=desc", jar)[2])
    assert [r["status"] for r in data["rows"]] == ["enforcing-from-cache"]
    html = get(console, "/envoys?per_page=1", jar)[2]
    assert "Page 1 of 2" in html and 'href="/envoys?sort=hostname&amp;order=asc&amp;per_page=1&amp;page=2"' in html


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/api/envoys?page=0", 400, "page must be a whole number in 1..4611686018427387904, got 0"),
    ("/api/envoys?page=abc", 400, "page must be a whole number in 1..4611686018427387904, got 'abc'"),
    ("/api/envoys?page=-1", 400, "got '-1'"),
    ("/api/envoys?page=99", 404, "page 99 is past the last page (1) of 2 envoys"),
    ("/api/envoys?per_page=501", 400, "per_page must be a whole number in 1..500, got 501"),
    ("/api/envoys?page=1&page=2", 400, "query parameter page is given more than once"),
    ("/api/envoys?colour=red", 400, "unknown query parameter 'colour'; this page takes: page, per_page"),
    ("/api/envoys?status=down", 400, "status must be one of revoked, offline"),
    ("/api/envoys?hostname=" + "x" * 201, 400, "query parameter hostname is 201 characters long; at most 200"),
    ("/api/envoys?hostname=" + "x" * 3000, 414, "the console reads at most 2048"),
    ("/api/envoys/ffffffff", 404, "no envoy with id (or id prefix) 'ffffffff'"),
    ("/api/envoys/bad%20id", 400, "an envoy id is 1..64 letters, digits"),
    ("/api/envoys/0123abcd?runs=101", 400, "runs must be a whole number in 0..100, got 101"),
    ("/api/overview?x=1", 400, "unknown query parameter 'x'; this page takes: none"),
])
def test_bad_input_gets_a_specific_4xx(console, jar, path, status, message):
    got, _, body = get(console, path, jar)
    assert got == status and message in json.loads(body)["error"]["reason"], body
    page_status, _, html = get(console, path.removeprefix("/api").replace("/overview", "/"), jar)
    assert page_status == status and "<h1>" in html  # the page says it too, as HTML


def test_one_envoy_shows_traits_cert_runs_and_offline_runs(console, jar):
    data = json.loads(get(console, "/api/envoys/0123abcd", jar)[2])
    assert data["envoy"]["hostname"] == "web-1" and data["envoy"]["traits"]["os"]["name"] == "debian"
    assert data["envoy"]["cert_expires_at"] > time.time() + 29 * 86400 and data["envoy"]["renewals"] == 0
    runs = data["envoy"]["runs"]
    assert [r["run_id"] for r in runs] == ["r2", "r1"] and runs[1]["offline"]
    assert [x["status"] for x in runs[0]["resources"]] == ["changed", "failed"]
    html = get(console, "/envoys/0123abcd", jar)[2]
    assert "offline run (cached bundle)" in html and "exec:reload" in html and "exit 3" in html


def test_markup_from_the_fleet_is_escaped(console, jar):
    for path in ("/envoys", "/envoys/9876fedc"):
        html = get(console, path, jar)[2]
        assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_no_page_shows_a_secret_value(console, jar):
    console.partition.admin("stack.push", {"files": _example_stack()})
    bodies = [get(console, p, jar)[2] for p in PAGES + APIS + ["/api/envoys/9876fedc", "/envoys/9876fedc"]]
    assert all(bodies)
    assert not [p for p, b in zip(PAGES + APIS, bodies, strict=False) if SECRET in b]
    assert "api_token" in get(console, "/stack", jar)[2]  # the name is shown, never the value


def _example_stack() -> dict[str, bytes]:
    from pathlib import Path

    import vigo.examples

    root = Path(vigo.examples.__file__).parent / "stack"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
