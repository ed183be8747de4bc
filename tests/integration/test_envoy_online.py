"""The envoy's online path against a real gateway: `vigo-envoy join` and `vigo-envoy run --once`
as real processes, talking TLS to ``vigo.server.gateway.GatewayServer`` (plain asyncio, in a
background thread's event loop) whose backend calls a real ``Partition`` (real SQLite in
tmp_path) directly. No Ray: the full dev server is exercised elsewhere.

Every partition call (the gateway's and the test's) runs on the gateway's loop thread, so the
partition sees one caller at a time, as it does inside the primary actor.
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import EXAMPLE_STACK, SECRET, build_bundle, run_cli, write_traits_dir
from tests.serverharness import InProcessBackend, stack_files
from vigo.agent.cache import Cache
from vigo.agent.enrolment import tls_client_context
from vigo.agent.identity import CA_FILE, CERT_FILE, KEY_FILE
from vigo.agent.join import check_gateway_cert
from vigo.agent.transport import EnvoyClient, parse_server
from vigo.errors import AdmissionError, ConfigError
from vigo.server.admissions import FleetCA
from vigo.server.gateway import GatewayServer
from vigo.server.partition import Partition

pytestmark = pytest.mark.integration


class Server:
    """A partition and a gateway serving it on 127.0.0.1, on a background event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)
        self.thread.start()
        self.partition: Partition = self.call(self._open(data_dir))
        # One backend (and its lock) for the gateway and for the test's own admin calls: the
        # partition is single-writer, as the primary actor makes it.
        self.backend = InProcessBackend(self.partition)
        self.gateway: GatewayServer | None = None
        self.port = 0

    async def _open(self, data_dir: Path) -> Partition:
        return Partition(data_dir)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def admin(self, op: str, args: dict[str, Any] | None = None) -> Any:
        return self.backend._locked(self.partition.admin, op, args or {})

    def start(self, *, material: dict[str, Any] | None = None) -> None:
        """Start the gateway (on the same port as before, after a stop)."""
        async def go() -> GatewayServer:
            mat = self.partition.gateway_material()
            mat.update(material or {})
            gw = GatewayServer(
                self.backend, ca_pem=mat["ca_pem"], cert_pem=mat["cert_pem"],
                key_pem=mat["key_pem"], cfg=self.partition.cfg.gateway, host="127.0.0.1", port=self.port,
                admin_token=lambda: "t", revocations=mat["revocations"],
            )
            await gw.start()
            return gw
        self.gateway = self.call(go())
        self.port = self.gateway.port

    def stop(self) -> None:
        if self.gateway is not None:
            self.call(self.gateway.stop())
            self.gateway = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.stop()

        async def shut() -> None:
            self.partition.close()
        self.call(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    # -- setup helpers

    def push_stack(self, stack_dir: Path, overrides: dict[str, bytes] | None = None) -> dict[str, Any]:
        files = {**stack_files(stack_dir), **(overrides or {})}
        return self.admin("stack.push", {"files": files})

    def token(self, uses: int = 1) -> str:
        return self.admin("token.create", {"uses": uses})["token"]

    def show(self, envoy_id: str, runs: int = 50) -> dict[str, Any]:
        return self.admin("envoys.show", {"envoy_id": envoy_id, "runs": runs})


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server")
    try:
        srv.admin("secrets.set", {"name": "api_token", "value": SECRET})
        srv.push_stack(EXAMPLE_STACK)
        srv.start()
        yield srv
    finally:
        srv.close()


@pytest.fixture
def envoy_dirs(tmp_path: Path) -> dict[str, Path]:
    return {
        "state": tmp_path / "envoy-state",
        "root": tmp_path / "root",
        "traits": write_traits_dir(tmp_path / "traits.d"),
    }


def join(server: Server, dirs: dict[str, Path], token: str, *extra: object):
    return run_cli("vigo-envoy", "join", "--server", server.address, "--token", token,
                   "--state-dir", dirs["state"], "--traits-dir", dirs["traits"], *extra)


def run_once(dirs: dict[str, Path], *extra: object):
    return run_cli("vigo-envoy", "run", "--once", "--json", "--state-dir", dirs["state"],
                   "--root", dirs["root"], "--traits-dir", dirs["traits"], *extra)


def report_of(proc) -> dict[str, Any]:
    assert proc.returncode in (0, 2), f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout)


def joined(server: Server, dirs: dict[str, Path]) -> str:
    proc = join(server, dirs, server.token())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def cache_meta(dirs: dict[str, Path], key: str) -> Any:
    with Cache(dirs["state"], readonly=True) as cache:
        return cache.meta(key)


def queued(dirs: dict[str, Path]) -> list[dict[str, Any]]:
    with Cache(dirs["state"], readonly=True) as cache:
        return cache.pending(limit=1000)


# --- join + run ---------------------------------------------------------------------------------


def test_join_then_run_once_converges_reports_and_follows_a_new_push(server: Server, envoy_dirs):
    fingerprint = server.partition.ca.fingerprint()
    proc = join(server, envoy_dirs, server.token(), "--ca-fingerprint", fingerprint.upper(), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    envoy_id = info["envoy_id"]
    assert info["ca_fingerprint"] == fingerprint and info["servers"] == [server.address]

    state = envoy_dirs["state"]
    assert stat.S_IMODE((state / KEY_FILE).stat().st_mode) == 0o600
    assert b"BEGIN CERTIFICATE" in (state / CERT_FILE).read_bytes()
    assert (state / CA_FILE).read_bytes() == server.partition.gateway_material()["ca_pem"]
    assert cache_meta(envoy_dirs, "envoy_id") == envoy_id  # the server's id replaced the local one
    assert cache_meta(envoy_dirs, "servers") == [server.address]
    assert [e["id"] for e in server.admin("envoys.list")] == [envoy_id]

    report = report_of(run_once(envoy_dirs))
    assert report["server"] == server.address and report["offline"] is False
    assert report["flushed"] == 1 and report["envoy_id"] == envoy_id and report["serial"] == 1
    motd = envoy_dirs["root"] / "etc/vigo-demo/motd"
    assert motd.is_file() and (envoy_dirs["root"] / "etc/vigo-demo/README").is_file()
    shown = server.show(envoy_id)
    assert shown["run_count"] == 1 and shown["runs"][0]["run_id"] == report["run_id"]
    assert shown["serial"] == 1 and shown["last_seen"] is not None  # the flushed run updated the record
    assert queued(envoy_dirs) == []
    assert cache_meta(envoy_dirs, "interval_s") == server.partition.cfg.checkin.interval_s

    # A second push (the motd template changed) reaches the envoy on its next run.
    server.push_stack(EXAMPLE_STACK, {"templates/motd.j2": b"second push for {{ traits.hostname }}\n"})
    second = report_of(run_once(envoy_dirs))
    assert second["serial"] == 2 and second["flushed"] == 1
    assert motd.read_text().startswith("second push for ")
    changed = {r["id"] for r in second["resources"] if r["status"] == "changed"}
    assert "file:/etc/vigo-demo/motd" in changed
    shown = server.show(envoy_id)
    assert shown["run_count"] == 2 and shown["serial"] == 2  # checked in with serial 1, ran 2

    # The status command shows the link to the server.
    status = json.loads(run_cli("vigo-envoy", "status", "--json", "--state-dir", state, check=True).stdout)
    assert status["servers"] == [server.address] and status["last_checkin_at"] and status["revoked"] is None


def test_reports_from_before_joining_are_delivered_under_the_fleet_id(server: Server, envoy_dirs, keypair):
    """An envoy used offline first (its own signing key, serial 4, a local envoy id) joins: the
    fleet's key and id replace the local ones, the fleet's serial-1 bundle is still accepted
    (serials count per signing key), and the queued local report reaches the server."""
    private, _public, _private_path, public_path = keypair
    bundle_file = envoy_dirs["state"].parent / "local.bundle"
    bundle_file.write_bytes(build_bundle(EXAMPLE_STACK, private, serial=4).encode())
    local = run_cli("vigo-envoy", "apply", "--json", "--bundle", bundle_file, "--trust", public_path,
                    "--state-dir", envoy_dirs["state"], "--root", envoy_dirs["root"], "--traits-dir", envoy_dirs["traits"])
    local_report = report_of(local)
    assert local_report["serial"] == 4

    envoy_id = joined(server, envoy_dirs)
    assert envoy_id != local_report["envoy_id"]
    report = report_of(run_once(envoy_dirs))
    assert report["serial"] == 1 and report["offline"] is False and report["flushed"] == 2
    shown = server.show(envoy_id)
    assert {r["run_id"] for r in shown["runs"]} == {local_report["run_id"], report["run_id"]}


def test_parse_server_and_light_imports():
    assert parse_server("127.0.0.1:7700") == ("127.0.0.1", 7700)
    assert parse_server("[::1]:7700") == ("::1", 7700)
    assert parse_server("gw.example.com:1") == ("gw.example.com", 1)
    for bad in ("gw", "gw:0", "gw:70000", ":7700", "::1:7700"):
        with pytest.raises(ConfigError):
            parse_server(bad)
    probe = ("import sys, vigo.agent.transport, vigo.agent.session, vigo.agent.join, vigo.agent.once, "
             "vigo.agent.link, vigo.agent.daemon, vigo.agent.cli\n"
             "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'vigo.server'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_run_before_join_says_so(tmp_path: Path):
    proc = run_cli("vigo-envoy", "run", "--once", "--state-dir", tmp_path / "never-joined")
    assert proc.returncode == 1
    assert "not joined" in proc.stderr and "vigo-envoy join" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- join refusals ------------------------------------------------------------------------------


def test_bad_token_prints_the_servers_reason(server: Server, envoy_dirs):
    proc = join(server, envoy_dirs, "vigo_not-a-real-token")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "refused the join token: join token not recognised" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (envoy_dirs["state"] / CERT_FILE).exists()
    assert server.admin("envoys.list") == []


def test_used_up_token_is_refused(server: Server, tmp_path: Path):
    token = server.token(uses=1)
    first = {"state": tmp_path / "a", "traits": tmp_path / "t"}
    second = {"state": tmp_path / "b", "traits": tmp_path / "t"}
    assert join(server, first, token).returncode == 0
    proc = join(server, second, token)
    assert proc.returncode == 1 and "no uses left" in proc.stderr and "Traceback" not in proc.stderr
    assert not (second["state"] / KEY_FILE).exists()
    assert len(server.admin("envoys.list")) == 1


def test_ca_fingerprint_mismatch_stores_nothing(server: Server, envoy_dirs):
    proc = join(server, envoy_dirs, server.token(), "--ca-fingerprint", "00" * 32)
    assert proc.returncode == 1
    assert "CA fingerprint mismatch: expected " + "00" * 32 in proc.stderr
    assert server.partition.ca.fingerprint() in proc.stderr
    for name in (KEY_FILE, CERT_FILE, CA_FILE):
        assert not (envoy_dirs["state"] / name).exists()


def test_gateway_whose_cert_does_not_chain_to_the_ca_it_sends_is_refused(server: Server, envoy_dirs):
    """A gateway presenting a certificate from another CA, but answering join with the real
    partition's CA: exactly what a man in the middle relaying to the real server looks like."""
    other = FleetCA.generate("impostor CA")
    key_pem, cert_pem = other.issue_server_cert(["localhost"], ["127.0.0.1"])
    server.stop()
    server.port = 0
    server.start(material={"ca_pem": other.cert_pem, "cert_pem": cert_pem, "key_pem": key_pem})
    proc = join(server, envoy_dirs, server.token())
    assert proc.returncode == 1
    assert f"refusing server {server.address}: its certificate does not chain to the CA it sent" in proc.stderr
    assert not (envoy_dirs["state"] / CERT_FILE).exists()


def test_chain_check_with_certificates_from_two_cas():
    ca_a, ca_b = FleetCA.generate("fleet A"), FleetCA.generate("fleet B")
    _key, cert_pem = ca_a.issue_server_cert(["localhost"], ["127.0.0.1"])
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    assert check_gateway_cert(der, ca_a.cert_pem, server="s:1") == ca_a.fingerprint()
    assert check_gateway_cert(der, ca_a.cert_pem, server="s:1", expected_fingerprint=ca_a.fingerprint()) == ca_a.fingerprint()
    with pytest.raises(AdmissionError, match="does not chain to the CA it sent"):
        check_gateway_cert(der, ca_b.cert_pem, server="s:1")
    # Same subject name, different key: the issuer matches, the signature does not.
    ca_c = FleetCA.generate("fleet A")
    with pytest.raises(AdmissionError, match="does not chain to the CA it sent"):
        check_gateway_cert(der, ca_c.cert_pem, server="s:1")
    with pytest.raises(AdmissionError, match="CA fingerprint mismatch"):
        check_gateway_cert(der, ca_a.cert_pem, server="s:1", expected_fingerprint=ca_b.fingerprint())
    with pytest.raises(AdmissionError, match="presented no TLS certificate"):
        check_gateway_cert(None, ca_a.cert_pem, server="s:1")


# --- offline, flush, exactly once ---------------------------------------------------------------


def test_server_down_runs_offline_then_flushes_everything_exactly_once(server: Server, envoy_dirs):
    envoy_id = joined(server, envoy_dirs)
    online = report_of(run_once(envoy_dirs))
    assert online["flushed"] == 1

    server.stop()
    offline_ids = []
    for _ in range(2):
        started = time.monotonic()
        proc = run_once(envoy_dirs)
        report = report_of(proc)
        assert time.monotonic() - started < 15  # the run never waits long on the network
        assert report["offline"] is True and report["server"] is None and report["flushed"] == 0
        assert "offline: no gateway answered" in proc.stderr
        offline_ids.append(report["run_id"])
    assert [r["run_id"] for r in queued(envoy_dirs)] == offline_ids
    with Cache(envoy_dirs["state"], readonly=True) as cache:
        assert cache.queue_stats().offline_runs == 2

    server.start()  # same port
    back = report_of(run_once(envoy_dirs))
    assert back["offline"] is False and back["flushed"] == 3
    assert queued(envoy_dirs) == []
    shown = server.show(envoy_id)
    assert shown["run_count"] == 4
    runs = {r["run_id"]: r for r in shown["runs"]}
    assert set(runs) == {online["run_id"], *offline_ids, back["run_id"]}
    assert {rid for rid, r in runs.items() if r["offline"]} == set(offline_ids)
    assert shown["offline_runs"] == 0  # counted at check-in, cleared as the offline reports arrived

    # A run with nothing left to send: still exactly one row per run.
    report_of(run_once(envoy_dirs))
    assert server.show(envoy_id)["run_count"] == 5


def test_the_same_report_sent_twice_is_stored_once(server: Server, envoy_dirs):
    envoy_id = joined(server, envoy_dirs)
    state = envoy_dirs["state"]
    ctx = tls_client_context((state / CA_FILE).read_bytes(), (state / CERT_FILE).read_bytes(),
                             (state / KEY_FILE).read_bytes())
    report = {"kind": "run", "run_id": uuid.uuid4().hex, "envoy_id": envoy_id, "started_at": time.time(),
              "finished_at": time.time(), "bundle_version": None, "serial": 0, "term": 1, "noop": False,
              "offline": False, "counts": {"ok": 1, "changed": 0, "failed": 0, "skipped": 0}}

    async def send_twice() -> tuple[list[str], list[str]]:
        async with await EnvoyClient.connect([server.address], ctx) as client:
            first = await client.send_results(envoy_id, [report])
            second = await client.send_results(envoy_id, [report])
            return first, second

    first, second = asyncio.run(send_twice())
    assert first == second == [report["run_id"]]  # acknowledged both times: the envoy may delete it
    assert server.show(envoy_id)["run_count"] == 1


def test_stale_server_is_not_believed(server: Server, envoy_dirs):
    joined(server, envoy_dirs)
    assert report_of(run_once(envoy_dirs))["serial"] == 1
    server.push_stack(EXAMPLE_STACK, {"templates/motd.j2": b"from a stale primary\n"})
    with Cache(envoy_dirs["state"]) as cache:
        cache.set_meta("highest_term", 99)  # this envoy has seen a newer primary than this one
    proc = run_once(envoy_dirs)
    report = report_of(proc)
    assert "stale server" in proc.stderr
    assert report["server"] is None and report["offline"] is True and report["flushed"] == 0
    assert report["serial"] == 1  # its newer bundle was not taken
    assert "stale primary" not in (envoy_dirs["root"] / "etc/vigo-demo/motd").read_text()
    assert [r["run_id"] for r in queued(envoy_dirs)] == [report["run_id"]]


# --- revocation ---------------------------------------------------------------------------------


def test_revoked_envoy_stops_and_says_so(server: Server, envoy_dirs):
    envoy_id = joined(server, envoy_dirs)
    report_of(run_once(envoy_dirs))
    server.admin("envoys.revoke", {"envoy_id": envoy_id})
    # Wait until the gateway itself knows (its refresh loop): then it refuses the connection
    # outright, before any request, which is the harder case for the client to report well.
    deadline = time.monotonic() + 10
    while not server.gateway.revoked.is_revoked(envoy_id):
        assert time.monotonic() < deadline, "gateway never picked up the revocation"
        time.sleep(0.1)
    motd = envoy_dirs["root"] / "etc/vigo-demo/motd"
    motd.write_text("edited by hand\n")

    proc = run_once(envoy_dirs)
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"this envoy ({envoy_id}) was revoked by the fleet" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert motd.read_text() == "edited by hand\n"  # nothing converged
    assert queued(envoy_dirs) == []

    # Remembered: refused at once even with no server to ask.
    server.stop()
    again = run_once(envoy_dirs)
    assert again.returncode == 1 and "was revoked by the fleet" in again.stderr
    assert motd.read_text() == "edited by hand\n"
    assert server.show(envoy_id)["run_count"] == 1

    # A new join makes it a managed host again (under a new id).
    server.start()
    new_id = joined(server, envoy_dirs)
    assert new_id != envoy_id
    after = report_of(run_once(envoy_dirs))
    assert after["envoy_id"] == new_id and after["flushed"] == 1
    assert motd.read_text() != "edited by hand\n"


def test_a_report_the_server_refuses_is_set_aside_and_the_rest_flows(server: Server, envoy_dirs):
    """One queued report too big for the server (over its per-report limit) must not block the
    queue: the batch is retried report by report, the refused one moves to the quarantine with
    the server's reason, and every other report is delivered."""
    from vigo.server.fleet import MAX_REPORT_BYTES

    envoy_id = joined(server, envoy_dirs)
    giant = {"kind": "run", "run_id": "giant-" + uuid.uuid4().hex, "envoy_id": envoy_id,
             "started_at": time.time() - 10, "counts": {"ok": 1, "changed": 0, "failed": 0, "skipped": 0},
             "resources": [{"id": "file:/x", "message": "x" * (MAX_REPORT_BYTES + 1024)}]}
    with Cache(envoy_dirs["state"]) as cache:
        cache.enqueue(giant)
    report = report_of(run_once(envoy_dirs))
    assert report["flushed"] == 1  # this run's own report went through
    assert queued(envoy_dirs) == []
    shown = server.show(envoy_id)
    assert {r["run_id"] for r in shown["runs"]} == {report["run_id"]}
    with Cache(envoy_dirs["state"], readonly=True) as cache:
        reasons = [q["reason"] for q in cache.quarantined()]
    assert any("bad_body" in r and "limit" in r for r in reasons), reasons
