"""Envoy certificate renewal and lapse, against a real gateway over a real partition
(tests/serverharness.py: TLS on 127.0.0.1, SQLite in tmp_path, no Ray) and the real CLI.

Lifetimes are chosen so nothing sleeps: a certificate issued for 90 s is backdated by the CA's
clock-skew allowance (5 min), so its lifetime is 390 s with 90 s left: less than a third, so
the first run renews at once. The renewed one is issued for an hour (3900 s, 3600 s left: not
due), so the run after it does not renew again. An expired certificate is made by the fleet CA
with a ``now`` in the past.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from tests.helpers import EXAMPLE_STACK, SECRET, cli, run_cli, write_traits_dir
from tests.serverharness import RunningGateway, running_gateway, stack_files
from vigo.agent import identity, runner
from vigo.agent import once as client_mod
from vigo.agent.cache import Cache
from vigo.agent.cli import main as cli_main
from vigo.agent.config import EnvoyConfig
from vigo.agent.daemon import CacheThread
from vigo.agent.enrolment import make_envoy_key_and_csr, tls_client_context
from vigo.agent.link import Link
from vigo.agent.runner import RunOptions
from vigo.agent.transport import EnvoyClient
from vigo.errors import ServerError
from vigo.server.admissions import cert_serial

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SHORT_S = 90  # due for renewal at once (see the module doc)
LONG_S = 3600  # not due


# --- harness ------------------------------------------------------------------------------------


def admin(gw: RunningGateway, op: str, args: dict[str, Any] | None = None) -> Any:
    answer = gw.call(gw.backend.admin(op, args or {}))
    assert "error" not in answer, answer
    return answer["ok"]


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path / "server") as server:
        admin(server, "secrets.set", {"name": "api_token", "value": SECRET})
        admin(server, "stack.push", {"files": stack_files(EXAMPLE_STACK)})
        # Record the (envoy id, certificate serial) of every mutual-TLS connection the gateway accepts.
        seen: list[tuple[str, int]] = []
        identify = server.server._identify

        def spy(writer):
            found = identify(writer)
            if found[0] is not None:
                seen.append((found[0], found[1]))
            return found

        server.server._identify = spy
        server.seen = seen  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    return {"state": tmp_path / "envoy-state", "root": tmp_path / "root",
            "traits": write_traits_dir(tmp_path / "traits.d")}


def lifetime(gw: RunningGateway, seconds: float) -> None:
    """The lifetime the partition gives the next certificates it signs (bypasses server.yaml's
    60 s minimum on purpose)."""
    gw.partition.cfg.admissions.envoy_cert_lifetime_s = seconds


def join(gw: RunningGateway, dirs: dict[str, Path]) -> str:
    token = admin(gw, "token.create", {"uses": 1})["token"]
    proc = run_cli("vigo-envoy", "join", "--server", gw.address, "--token", token, "--state-dir", dirs["state"],
                   "--traits-dir", dirs["traits"])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def run_once(dirs: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    return run_cli("vigo-envoy", "run", "--once", "--json", "--state-dir", dirs["state"], "--root", dirs["root"],
                   "--traits-dir", dirs["traits"])


def report_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode in (0, 2), f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout)


def status(dirs: dict[str, Path], *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("vigo-envoy", "status", *extra, "--state-dir", dirs["state"], check=True)


def certs(gw: RunningGateway, envoy_id: str) -> list[tuple]:
    """The certs table's rows for the envoy: (serial hex, issued_at, not_after, revoked_at)."""
    return gw.backend._locked(lambda: gw.partition.store.query(
        "SELECT serial, issued_at, not_after, revoked_at FROM certs WHERE envoy_id = ? ORDER BY issued_at, serial",
        (envoy_id,)))


def file_serial(dirs: dict[str, Path]) -> int:
    return cert_serial((dirs["state"] / identity.CERT_FILE).read_bytes())


def client_context(dirs: dict[str, Path]):
    ident = identity.load(dirs["state"])
    return tls_client_context(ident.ca_pem, ident.cert_pem, ident.key_pem)


def queued(dirs: dict[str, Path]) -> list[dict[str, Any]]:
    with Cache(dirs["state"], readonly=True) as cache:
        return cache.pending(limit=1000)


def csr_for(key_pem: bytes, name: str = "envoy") -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def make_expired(gw: RunningGateway, dirs: dict[str, Path], envoy_id: str) -> float:
    """Replace the envoy's certificate by one for the same key that expired an hour ago."""
    state = dirs["state"]
    issued = gw.partition.ca.sign_envoy_csr(csr_for((state / identity.KEY_FILE).read_bytes()), envoy_id,
                                            now=time.time() - 2 * 3600, lifetime_s=3600)
    (state / identity.CERT_FILE).write_bytes(issued.cert_pem)
    assert identity.load(state).expired()
    return issued.not_after


def request(gw: RunningGateway, ctx, type_: str, body: dict[str, Any]) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with await EnvoyClient.connect([gw.address], ctx) as client:
            return await client.request(type_, body)
    return asyncio.run(go())


def refusal(gw: RunningGateway, ctx, type_: str, body: dict[str, Any]) -> ServerError:
    with pytest.raises(ServerError) as info:
        request(gw, ctx, type_, body)
    return info.value


# --- renewal ------------------------------------------------------------------------------------


def test_run_once_renews_when_a_third_is_left_and_the_next_run_presents_the_new_pair(gw, dirs, caplog):
    lifetime(gw, SHORT_S)
    envoy_id = join(gw, dirs)
    joined = identity.load(dirs["state"])
    assert joined.renewal_due() and not joined.expired()
    old_key = (dirs["state"] / identity.KEY_FILE).read_bytes()
    [(old_serial, _, old_not_after, _)] = certs(gw, envoy_id)
    assert int(old_serial, 16) == joined.serial

    lifetime(gw, LONG_S)
    with caplog.at_level(logging.INFO, logger="vigo.server.partition"):
        first = report_of(run_once(dirs))
    assert first["server"] == gw.address and first["offline"] is False and first["flushed"] == 1
    assert gw.seen == [(envoy_id, joined.serial)]  # this run still presented the joined certificate

    rows = certs(gw, envoy_id)
    assert len(rows) == 2 and rows[0][0] == old_serial
    new_serial, _, new_not_after, revoked_at = rows[1]
    assert new_not_after > old_not_after + LONG_S / 2 and revoked_at is None and rows[0][3] is None
    renewed = identity.load(dirs["state"])
    assert renewed.serial == int(new_serial, 16) == file_serial(dirs)
    assert renewed.not_after == new_not_after and renewed.subject == envoy_id and not renewed.renewal_due()
    assert (dirs["state"] / identity.KEY_FILE).read_bytes() != old_key  # a new key, not a re-signed one
    assert stat.S_IMODE((dirs["state"] / identity.KEY_FILE).stat().st_mode) == 0o600
    assert not (dirs["state"] / identity.NEXT_KEY_FILE).exists() and not (dirs["state"] / identity.NEXT_CERT_FILE).exists()

    # One log line on the server, with the envoy id and the new expiry; no key material.
    lines = [r.getMessage() for r in caplog.records if "renewed its certificate" in r.getMessage()]
    assert len(lines) == 1 and envoy_id in lines[0] and time.strftime("%Y-%m-%dT%H:", time.gmtime(new_not_after)) in lines[0]
    assert not any("BEGIN" in r.getMessage() or "PRIVATE" in r.getMessage() for r in caplog.records)

    # The next run presents the new certificate, and does not renew again.
    second = report_of(run_once(dirs))
    assert second["offline"] is False and second["flushed"] == 1
    assert gw.seen[-1] == (envoy_id, renewed.serial)
    assert len(certs(gw, envoy_id)) == 2

    info = json.loads(status(dirs, "--json").stdout)["certificate"]
    assert info["serial"] == new_serial and info["expired"] is False and info["not_after"] == new_not_after
    text = status(dirs).stdout
    assert "certificate" in text and f"valid until {time.strftime('%Y-%m-%d', time.gmtime(new_not_after))}" in text


def test_the_old_certificate_stays_valid_after_a_renewal(gw, dirs):
    """A renewal whose answer never arrived leaves the envoy with its old pair: that pair must
    still work (no revocation of the old certificate)."""
    lifetime(gw, SHORT_S)
    envoy_id = join(gw, dirs)
    old_ctx = client_context(dirs)
    lifetime(gw, LONG_S)
    report_of(run_once(dirs))
    assert len(certs(gw, envoy_id)) == 2
    answer = request(gw, old_ctx, "ping", {})
    assert answer == {}
    body = {"envoy_id": envoy_id, "traits": {}, "bundle_version": None, "serial": 0, "term": 0, "queue_depth": 0,
            "oldest_queued_at": None, "last_run": None}
    assert request(gw, old_ctx, "checkin", body)["term"] == 1


def test_expired_rows_are_dropped_at_the_next_renewal(gw, dirs):
    lifetime(gw, SHORT_S)
    envoy_id = join(gw, dirs)
    report_of(run_once(dirs))  # renewed with a 90 s certificate again: due again at once
    report_of(run_once(dirs))
    assert len(certs(gw, envoy_id)) == 3
    # Pretend the first two expired; the next renewal drops their rows, keeps the live ones.
    gw.backend._locked(lambda: gw.partition.store.db.execute(
        "UPDATE certs SET not_after = ? WHERE serial IN (SELECT serial FROM certs WHERE envoy_id = ? "
        "ORDER BY issued_at LIMIT 2)", (time.time() - 10, envoy_id)))
    report_of(run_once(dirs))
    rows = certs(gw, envoy_id)
    assert len(rows) == 2 and all(row[2] > time.time() for row in rows)


def test_renew_refusals(gw, dirs):
    lifetime(gw, SHORT_S)
    envoy_id = join(gw, dirs)
    state = dirs["state"]
    ctx = client_context(dirs)
    _key, fresh_csr = make_envoy_key_and_csr("h")

    # Without a client certificate: unauthenticated (and nothing is signed).
    anonymous = tls_client_context((state / identity.CA_FILE).read_bytes())
    error = refusal(gw, anonymous, "renew", {"envoy_id": envoy_id, "csr_pem": fresh_csr})
    assert error.code == "unauthenticated" and "mutual TLS" in error.reason
    # The same key again: renewal must rotate the key.
    same_key = csr_for((state / identity.KEY_FILE).read_bytes())
    error = refusal(gw, ctx, "renew", {"envoy_id": envoy_id, "csr_pem": same_key})
    assert error.code == "conflict" and "new key" in error.reason
    # Another envoy's id: forbidden. A CSR that is not one: bad_body.
    error = refusal(gw, ctx, "renew", {"envoy_id": "someone-else", "csr_pem": fresh_csr})
    assert error.code == "forbidden"
    error = refusal(gw, ctx, "renew", {"envoy_id": envoy_id, "csr_pem": b"not a csr"})
    assert error.code == "bad_body" and "certificate request" in error.reason
    assert len(certs(gw, envoy_id)) == 1

    # A revoked envoy cannot renew: through the wire (the gateway may refuse the connection
    # already, or pass the renew to the partition) and at the partition itself.
    admin(gw, "envoys.revoke", {"envoy_id": envoy_id})
    error = refusal(gw, ctx, "renew", {"envoy_id": envoy_id, "csr_pem": fresh_csr})
    assert error.code == "revoked"
    [answer] = gw.backend._locked(gw.partition.handle_batch, [
        {"type": "renew", "envoy_id": envoy_id, "body": {"envoy_id": envoy_id, "csr_pem": fresh_csr}}])
    assert answer["error"]["code"] == "revoked"
    rows = certs(gw, envoy_id)
    assert len(rows) == 1 and rows[0][3] is not None

    # And `run --once` says revoked (exit 1), renewing nothing.
    proc = run_once(dirs)
    assert proc.returncode == 1 and "was revoked by the fleet" in proc.stderr
    assert len(certs(gw, envoy_id)) == 1


def test_a_bad_renewal_answer_never_replaces_a_working_pair(gw, dirs, monkeypatch, caplog):
    """The envoy checks what it gets: a certificate for another key is refused, the old pair
    stays, and the run goes on online."""
    lifetime(gw, SHORT_S)
    envoy_id = join(gw, dirs)
    before = identity.load(dirs["state"])
    _other_key, other_csr = make_envoy_key_and_csr("other")
    wrong = gw.partition.ca.sign_envoy_csr(other_csr, envoy_id).cert_pem

    async def bad_renew(self, envoy_id: str, csr_pem: bytes) -> dict[str, Any]:
        return {"certificate_pem": wrong, "not_after": time.time() + 3600}

    monkeypatch.setattr(EnvoyClient, "renew", bad_renew)
    with caplog.at_level(logging.WARNING, logger="vigo.agent.join"):
        result = asyncio.run(client_mod.run_once(RunOptions(state_dir=dirs["state"], root=dirs["root"],
                                                              traits_dir=dirs["traits"])))
    assert result["server"] == gw.address and result["report"]["offline"] is False
    assert any("certificate renewal via" in r.getMessage() and "does not carry this envoy's key" in r.getMessage()
               for r in caplog.records)
    after = identity.load(dirs["state"])
    assert (after.serial, after.key_pem) == (before.serial, before.key_pem)


# --- lapse --------------------------------------------------------------------------------------


def test_an_expired_certificate_runs_offline_says_rejoin_and_status_shows_it(gw, dirs):
    envoy_id = join(gw, dirs)
    report_of(run_once(dirs))
    not_after = make_expired(gw, dirs, envoy_id)
    connections = len(gw.seen)

    proc = run_once(dirs)
    report = report_of(proc)
    assert proc.returncode == 0 and report["offline"] is True and report["server"] is None
    assert report["flushed"] == 0 and [r["run_id"] for r in queued(dirs)] == [report["run_id"]]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after))
    lines = [line for line in proc.stderr.splitlines() if "certificate expired" in line]
    assert len(lines) == 1, proc.stderr
    assert f"certificate expired at {stamp} while this envoy was offline; re-join with `vigo-envoy join " \
           f"--server {gw.address} --token TOKEN" in lines[0] and "(a new token)" in lines[0]
    assert "no gateway answered" not in proc.stderr and "Traceback" not in proc.stderr
    assert len(gw.seen) == connections  # nothing was tried on the network with it

    text = status(dirs).stdout
    assert f"expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(not_after))}" in text
    assert "re-join with `vigo-envoy join" in text
    assert json.loads(status(dirs, "--json").stdout)["certificate"]["expired"] is True

    # A new join brings it back; the queued offline report is delivered.
    new_id = join(gw, dirs)
    back = report_of(run_once(dirs))
    assert back["offline"] is False and back["flushed"] == 2 and back["envoy_id"] == new_id


def test_a_gateway_refusing_the_certificate_as_expired_is_a_lapse_too(gw, dirs, monkeypatch, caplog, capsys):
    """This host's clock says the certificate is valid, the gateway's says it expired: the
    gateway answers `expired` (and logs the envoy id), the run is offline with the re-join line,
    and status shows the refusal."""
    envoy_id = join(gw, dirs)
    report_of(run_once(dirs))  # a bundle in the cache to enforce
    make_expired(gw, dirs, envoy_id)
    ctx = client_context(dirs)
    body = {"envoy_id": envoy_id, "traits": {}, "bundle_version": None, "serial": 0, "term": 0, "queue_depth": 0,
            "oldest_queued_at": None, "last_run": None}
    with caplog.at_level(logging.INFO, logger="vigo.server.gateway"):
        error = refusal(gw, ctx, "checkin", body)
    assert error.code == "expired" and f"envoy {envoy_id} certificate" in error.reason and "expired at" in error.reason
    assert any(f"refused envoy {envoy_id}" in r.getMessage() and "expired" in r.getMessage() for r in caplog.records)
    assert gw.server.status()["errors"].get("expired") == 1

    # The envoy's clock is behind: its own check passes, the gateway refuses.
    monkeypatch.setattr(identity.Identity, "expired", lambda self, now=None: False)
    with caplog.at_level(logging.WARNING, logger="vigo.agent.once"):
        result = asyncio.run(client_mod.run_once(RunOptions(state_dir=dirs["state"], root=dirs["root"],
                                                              traits_dir=dirs["traits"])))
    assert result["server"] is None and result["report"]["offline"] is True and result["queued"] == 1
    assert result["report"]["run_id"] == queued(dirs)[0]["run_id"]
    lapsed = [r.getMessage() for r in caplog.records if "re-join with `vigo-envoy join" in r.getMessage()]
    assert len(lapsed) == 1 and f"certificate refused as expired by {gw.address}" in lapsed[0]
    assert not any("no gateway answered" in r.getMessage() for r in caplog.records)
    info = json.loads(status(dirs, "--json").stdout)["certificate"]
    assert info["refused"]["server"] == gw.address and info["refused"]["serial"] == format(cert_serial(
        (dirs["state"] / identity.CERT_FILE).read_bytes()), "x")
    # `status` with this host's (patched) clock: valid, but refused.
    assert cli_main(["status", "--state-dir", str(dirs["state"])]) == 0
    text = capsys.readouterr().out
    assert f"refused as expired by {gw.address}" in text and "check this host's and the gateway's clocks" in text


# --- the daemon ---------------------------------------------------------------------------------


FAST = {"reconnect_base_s": 0.2, "reconnect_cap_s": 1.0, "keepalive_s": 5.0, "run_checkin_budget_s": 3.0}


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
    return value


def daemon(dirs: dict[str, Path], log: Path) -> subprocess.Popen[bytes]:
    config = dirs["state"].parent / "envoy.yaml"
    config.write_text(yaml.safe_dump(FAST))
    with log.open("ab") as out:
        return subprocess.Popen([cli("vigo-envoy"), "run", "--state-dir", str(dirs["state"]), "--root",
                                 str(dirs["root"]), "--traits-dir", str(dirs["traits"]), "--config", str(config),
                                 "--interval", "1", "--splay", "0"], stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_the_daemon_renews_on_its_connection_and_reconnects_with_the_new_pair(gw, dirs, tmp_path):
    lifetime(gw, SHORT_S)
    envoy_id = join(gw, dirs)
    joined = identity.load(dirs["state"])
    lifetime(gw, LONG_S)
    log = tmp_path / "daemon.log"
    proc = daemon(dirs, log)
    try:
        wait_for(lambda: len(certs(gw, envoy_id)) == 2, 30, "the daemon's renewal")
        renewed = wait_for(lambda: (i := identity.load(dirs["state"])).serial != joined.serial and i, 10,
                           "the renewed pair on disk")
        wait_for(lambda: "vigo.agent.runner: run " in log.read_text() and not queued(dirs), 30, "an online run")
    finally:
        stop(proc)
    assert "(offline)" not in log.read_text()
    assert gw.seen == [(envoy_id, joined.serial)]  # one persistent connection, with the old pair
    assert renewed.serial == int(certs(gw, envoy_id)[1][0], 16)
    assert "certificate renewed via" in log.read_text()

    proc = daemon(dirs, log)  # the next connection presents the new pair
    try:
        wait_for(lambda: len(gw.seen) == 2, 30, "the daemon's reconnect")
    finally:
        stop(proc)
    assert gw.seen[-1] == (envoy_id, renewed.serial) and len(certs(gw, envoy_id)) == 2


def test_the_daemon_with_a_lapsed_certificate_keeps_enforcing_and_says_rejoin(gw, dirs, tmp_path):
    envoy_id = join(gw, dirs)
    report_of(run_once(dirs))  # a bundle in the cache to enforce
    not_after = make_expired(gw, dirs, envoy_id)
    connections = len(gw.seen)
    log = tmp_path / "daemon.log"
    proc = daemon(dirs, log)
    try:
        wait_for(lambda: log.read_text().count("(offline)") >= 2, 30, "offline runs")
    finally:
        stop(proc)
    text = log.read_text()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after))
    assert text.count(f"certificate expired at {stamp} while this envoy was offline; re-join with") == 1
    assert len(gw.seen) == connections and len(queued(dirs)) >= 2


def test_the_daemon_connection_refused_as_expired_says_so_once(gw, dirs, monkeypatch, caplog):
    """The daemon's Link (in process, so this host's clock can be made to lag: the certificate
    looks valid here) meets a gateway that refuses the certificate as expired, again and again:
    one line, no connection, the refusal remembered for status."""
    envoy_id = join(gw, dirs)
    make_expired(gw, dirs, envoy_id)
    monkeypatch.setattr(identity.Identity, "expired", lambda self, now=None: False)

    async def go() -> Link:
        cache = CacheThread(lambda: runner.open_cache(dirs["state"]))
        await cache.open()
        link = Link(dirs["state"], cache, EnvoyConfig(reconnect_base_s=0.05, reconnect_cap_s=0.2), persist=False)
        task = asyncio.create_task(link.run())
        try:
            deadline = time.monotonic() + 20
            while gw.server.status()["errors"].get("expired", 0) < 4:
                assert time.monotonic() < deadline, "the link did not retry"
                await asyncio.sleep(0.05)
            assert not link.connected
        finally:
            await link.stop()
            await asyncio.gather(task, return_exceptions=True)
            await cache.close()
        return link

    with caplog.at_level(logging.WARNING, logger="vigo.agent.daemon"):
        link = asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if "not connecting" in r.getMessage()]
    assert len(lines) == 1 and f"certificate refused as expired by {gw.address}" in lines[0]
    assert "re-join with `vigo-envoy join" in lines[0] and link.counters.connects == 0
    with Cache(dirs["state"], readonly=True) as cache:
        assert cache.meta("cert_refused")["server"] == gw.address
