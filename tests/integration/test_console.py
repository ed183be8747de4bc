"""The console as deployed: `vigocli server start --dev` runs it (an actor, TLS from the fleet
CA), `vigocli console` finds it and prints a one-time login link, and it shows the fleet the
gateway answers for, never a secret, never without a session."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from http.cookiejar import Cookie, CookieJar

import pytest

from tests.consolefleet import console_fleet, login_link, opener

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PAGES = ["/", "/envoys", "/topology", "/stack"]
APIS = ["/api/overview", "/api/envoys", "/api/topology", "/api/stack"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with console_fleet(tmp_path_factory.mktemp("console")) as f:
        yield f


def fetch(fleet, path: str, jar: CookieJar | None = None):
    handlers = [urllib.request.HTTPCookieProcessor(jar)] if jar is not None else []
    try:
        with opener(fleet["ca_pem"], *handlers).open(fleet["console"].rstrip("/") + path, timeout=30) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


@pytest.fixture(scope="module")
def session(fleet):
    link = login_link(fleet)
    assert link["url"] == fleet["console"] and link["login_link"].startswith(fleet["console"] + "login/once/")
    jar = CookieJar()
    status, headers, _ = fetch(fleet, link["login_link"].removeprefix(fleet["console"].rstrip("/")), jar)
    assert status == 303 and headers["Location"] == "/"
    return jar


def test_dev_server_prints_the_console_and_it_serves_tls_from_the_fleet_ca(fleet):
    assert fleet["console"].startswith("https://127.0.0.1:")
    status, headers, body = fetch(fleet, "/login")  # verified against DATA_DIR/tls/ca.pem, hostname checked
    assert status == 200 and "cluster token" in body and "default-src 'none'" in headers["Content-Security-Policy"]


@pytest.mark.parametrize("path", PAGES + APIS)
def test_nothing_without_a_session_and_a_forged_cookie_is_refused(fleet, path):
    assert fetch(fleet, path)[0] == (401 if path.startswith("/api/") else 303)
    jar = CookieJar()
    jar.set_cookie(Cookie(0, "__Host-vigo_console", "A" * 43, None, False, "127.0.0.1", False, False, "/", True, True,
                          None, False, None, None, {}))
    assert fetch(fleet, path, jar)[0] == (401 if path.startswith("/api/") else 303)


def test_a_login_link_works_once(fleet, session):
    link = login_link(fleet)["login_link"].removeprefix(fleet["console"].rstrip("/"))
    assert fetch(fleet, link, CookieJar())[0] == 303
    assert fetch(fleet, link, CookieJar())[0] == 403


def test_pages_show_the_fleet_the_gateway_answers_for(fleet, session):
    overview = json.loads(fetch(fleet, "/api/overview", session)[2])
    counts = {s["status"]: s["count"] for s in overview["statuses"]}
    assert overview["envoys"] == 2 and counts["converged"] == 2
    assert overview["read"]["source"].startswith("gateway-") and overview["primary"] == "primary-p0"
    listing = json.loads(fetch(fleet, "/api/envoys?status=converged", session)[2])
    assert sorted(r["id"] for r in listing["rows"]) == sorted(fleet["envoys"])
    one = json.loads(fetch(fleet, f"/api/envoys/{fleet['envoys'][0]}", session)[2])["envoy"]
    assert one["status"] == "converged" and one["cert_expires_at"] and one["runs"][0]["resources"]
    assert "failed" not in {r["status"] for r in one["runs"][0]["resources"]}
    topology = json.loads(fetch(fleet, "/api/topology", session)[2])
    assert topology["primary"] == "primary-p0" and topology["archive"]["url"].startswith("file://")
    assert [g["state"] for g in topology["gateways"]] == ["serving"]
    for path in PAGES:
        status, headers, html = fetch(fleet, path, session)
        assert status == 200 and "Read at" in html and headers["Content-Security-Policy"]


def test_no_page_or_json_shows_a_secret(fleet, session):
    paths = PAGES + APIS + [f"/envoys/{e}" for e in fleet["envoys"]] + [f"/api/envoys/{e}" for e in fleet["envoys"]]
    for path in paths:
        status, _, body = fetch(fleet, path, session)
        assert status == 200 and fleet["secret"] not in body, path
