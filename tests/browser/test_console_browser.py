"""The console in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): log in with the cluster token, open every page, follow a status link, open an envoy,
page through a 10,000-envoy fleet. Screenshots go to test-artifacts/browser/ (or
$VIGO_TEST_ARTIFACTS/browser/). The browser trusts exactly the console's key (its SPKI digest),
nothing else: a console that presented another certificate would fail the test."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import ssl
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(900),
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed "
                                                         "(apt-get install chromium chromium-driver; .ci/run does it)"),
]
ARTIFACTS = Path(os.environ.get("VIGO_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "test-artifacts") / "browser"


def spki_sha256(url: str) -> str:
    """base64 sha256 of the key the server at ``url`` presents (what Chromium pins by)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    parts = urlsplit(url)
    pem = ssl.get_server_certificate((parts.hostname, parts.port))
    spki = x509.load_pem_x509_certificate(pem.encode()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def browser(url: str, profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                f"--user-data-dir={profile}", f"--ignore-certificate-errors-spki-list={spki_sha256(url)}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


def shot(driver: webdriver.Chrome, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def log_in(driver: webdriver.Chrome, base: str, token: str, path: str = "/") -> None:
    driver.get(base + path)
    assert "/login" in driver.current_url, driver.current_url
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    # A click does not wait for the navigation it starts: wait for the page the login leads to.
    WebDriverWait(driver, 30).until(lambda d: urlsplit(d.current_url).path != "/login"
                                    or d.find_elements(By.ID, "login-error"))
    assert urlsplit(driver.current_url).path == path, (driver.current_url, driver.find_element(By.TAG_NAME, "main").text)


# --- the console as deployed by `server start --dev`, with real envoys ------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from tests.consolefleet import console_fleet

    with console_fleet(tmp_path_factory.mktemp("browser")) as f:
        yield f


@pytest.fixture(scope="module")
def driver(fleet, tmp_path_factory):
    d = browser(fleet["console"], tmp_path_factory.mktemp("chromium"))
    yield d
    d.quit()


def test_log_in_open_every_page_and_follow_a_status_link(fleet, driver):
    from vigo.raytoken import load_token

    base = fleet["console"].rstrip("/")
    driver.get(base + "/login")
    driver.find_element(By.ID, "token").send_keys("not-the-token")
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "login-error"))
    assert "not the cluster token" in driver.find_element(By.ID, "login-error").text
    shot(driver, "00-login-refused")

    log_in(driver, base, load_token(), "/")
    assert "Read at" in driver.find_element(By.ID, "banner").text
    assert driver.find_element(By.CSS_SELECTOR, "#count-converged .count").text == "2"
    shot(driver, "01-overview")

    driver.find_element(By.ID, "count-converged").click()  # the count is a link to its list
    WebDriverWait(driver, 30).until(lambda d: "status=converged" in d.current_url)
    rows = driver.find_elements(By.CSS_SELECTOR, "table.envoys tbody tr")
    assert len(rows) == 2 and all("converged" in r.text for r in rows)
    shot(driver, "02-envoys-converged")

    rows[0].find_element(By.TAG_NAME, "a").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "envoy-status"))
    assert driver.find_element(By.ID, "envoy-status").text == "converged"
    assert "expires" in driver.find_element(By.ID, "cert").text
    assert fleet["secret"] not in driver.page_source
    shot(driver, "03-envoy")

    driver.get(base + "/topology")
    assert driver.find_element(By.ID, "primary").text.startswith("primary-p0 at term")
    assert fleet["secret"] not in driver.page_source
    shot(driver, "04-topology")
    driver.get(base + "/stack")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Stack" and "api_token" in driver.page_source
    assert fleet["secret"] not in driver.page_source
    shot(driver, "05-stack")

    driver.find_element(By.CSS_SELECTOR, "form.logout button").click()
    WebDriverWait(driver, 30).until(lambda d: urlsplit(d.current_url).path == "/login")
    driver.get(base + "/envoys")
    assert "/login" in driver.current_url  # the session ended with the logout


def test_the_stylesheet_loads_under_the_content_security_policy(fleet, driver):
    """The page is styled (the CSP lets the console's own stylesheet through) and no inline
    style or script is needed: the browser reports no CSP violation."""
    base = fleet["console"].rstrip("/")
    driver.get(base + "/login")
    colour = driver.find_element(By.TAG_NAME, "header").value_of_css_property("background-color")
    assert colour not in ("rgba(0, 0, 0, 0)", "transparent"), colour
    errors = [e for e in driver.get_log("browser") if "Content Security Policy" in e.get("message", "")]
    assert errors == []


# --- 10,000 envoys: paging stays on the server ---------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    import json

    from tests.consoleharness import TOKEN, running_console

    with running_console(tmp_path_factory.mktemp("big")) as c:
        now = time.time()
        with c.partition.store.write() as db:
            for i in range(10_000):
                db.execute("INSERT INTO envoys(id, hostname, joined_at, last_seen, interval_s, serial, last_run) "
                           "VALUES (?,?,?,?,?,?,?)",
                           (uuid.uuid4().hex, f"host-{i:05d}", now, now, 30.0, 0,
                            json.dumps({"run_id": "r", "started_at": now, "serial": 0,
                                        "counts": {"ok": 3, "failed": int(i % 100 == 0)}})))
        yield c, TOKEN


def test_page_through_ten_thousand_envoys(big, tmp_path_factory):
    console, token = big
    d = browser(console.url, tmp_path_factory.mktemp("chromium-big"))
    try:
        log_in(d, console.url, token, "/envoys")
        assert d.find_element(By.ID, "page-of").text == "Page 1 of 200"
        first = d.find_elements(By.CSS_SELECTOR, "table.envoys tbody tr")
        assert len(first) == 50 and "host-00000" in first[0].text
        d.find_element(By.ID, "next").click()
        WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "page-of").text == "Page 2 of 200")
        assert "host-00050" in d.find_element(By.CSS_SELECTOR, "table.envoys tbody tr").text
        d.find_element(By.LINK_TEXT, "Last").click()
        WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "page-of").text == "Page 200 of 200")
        assert "host-09999" in d.find_elements(By.CSS_SELECTOR, "table.envoys tbody tr")[-1].text
        shot(d, "10-envoys-last-page-of-10000")
        d.get(console.url + "/")
        d.find_element(By.ID, "count-failed").click()
        WebDriverWait(d, 30).until(lambda d: "status=failed" in d.current_url)
        assert d.find_element(By.ID, "page-of").text == "Page 1 of 2"  # 100 failed, 50 a page
        shot(d, "11-envoys-failed-of-10000")
    finally:
        d.quit()
