"""End to end on a real local Ray: `vigocli server start --dev`, real TLS, subprocess envoys.

One dev server for the module (on its own ports and Ray temp dir, so it never touches another
Ray on the machine), stopped with `vigocli server stop` at the end.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest

from tests.devserver import dev_server, run
from vigo import protocol

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with dev_server(tmp_path_factory.mktemp("server")) as info:
        yield info


def vigocli(server, *args, check: int | None = 0, stdin: str | None = None):
    return run("vigocli", *args, env=server["env"], check=check, stdin=stdin)


def token(server, *extra) -> str:
    return json.loads(vigocli(server, "token", "create", "--json", *extra).stdout)["token"]


def join(server, state: Path, tok: str, check: int | None = 0):
    return run("vigo-envoy", "join", "--server", server["gateway"], "--token", tok, "--state-dir", state,
               "--json", check=check)


def run_once(state: Path, root: Path, traits: Path, check: int | None = 0) -> dict:
    proc = run("vigo-envoy", "run", "--once", "--state-dir", state, "--root", root, "--traits-dir", traits,
               "--json", check=check)
    return json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr, "code": proc.returncode}


def envoys(server) -> dict[str, dict]:
    return {e["id"]: e for e in json.loads(vigocli(server, "envoys", "list", "--json").stdout)}


@pytest.fixture(scope="module")
def fleet(server, tmp_path_factory):
    """Two envoys joined with one two-use token, each converged once."""
    base = tmp_path_factory.mktemp("fleet")
    tok = token(server, "--uses", "2")
    out = []
    for name in ("a", "b"):
        state, root, traits = base / name / "state", base / name / "root", base / name / "traits.d"
        traits.mkdir(parents=True)
        (traits / "roles.yaml").write_text("roles: [web]\n")
        envoy_id = json.loads(join(server, state, tok).stdout)["envoy_id"]
        report = run_once(state, root, traits)
        out.append({"id": envoy_id, "state": state, "root": root, "traits": traits, "report": report})
    return {"envoys": out, "token": tok}


def test_two_envoys_join_and_converge(server, fleet):
    listed = envoys(server)
    for e in fleet["envoys"]:
        assert e["report"]["counts"]["failed"] == 0, e["report"]
        assert (e["root"] / "etc/vigo-demo/motd").exists()
        assert listed[e["id"]]["status"] == "converged", listed[e["id"]]
        shown = json.loads(vigocli(server, "envoys", "show", e["id"], "--json").stdout)
        assert shown["run_count"] >= 1
        assert any(r["run_id"] == e["report"]["run_id"] for r in shown["runs"])
        assert any(res["id"] == "file:/etc/vigo-demo/motd" for res in shown["runs"][0]["resources"])
    human = vigocli(server, "envoys", "list").stdout
    assert "converged" in human and "HOSTNAME" in human


def test_used_up_bad_and_expired_tokens_are_refused(server, fleet, tmp_path):
    used = join(server, tmp_path / "c", fleet["token"], check=1)
    assert "no uses left" in used.stderr
    bad = join(server, tmp_path / "d", "vigo_not-a-real-token", check=1)
    assert "join token not recognised" in bad.stderr
    short = token(server, "--ttl", "1")
    time.sleep(1.5)
    expired = join(server, tmp_path / "e", short, check=1)
    assert "expired" in expired.stderr
    assert "Traceback" not in used.stderr + bad.stderr + expired.stderr


def test_second_push_reaches_envoys_on_next_run(server, fleet, tmp_path):
    stack = tmp_path / "stack"
    shutil.copytree(server["stack_dir"], stack)
    tpl = stack / "templates" / "motd.j2"
    tpl.write_text(tpl.read_text() + "second push\n")
    pushed = json.loads(vigocli(server, "stack", "push", stack, "--json").stdout)
    for e in fleet["envoys"]:
        report = run_once(e["state"], e["root"], e["traits"])
        assert report["serial"] == pushed["serial"]
        assert "second push" in (e["root"] / "etc/vigo-demo/motd").read_text()


def test_same_report_twice_is_stored_once(server, fleet):
    e = fleet["envoys"][0]
    before = json.loads(vigocli(server, "envoys", "show", e["id"], "--json").stdout)["run_count"]
    from vigo.agent.runner import open_cache
    from vigo.agent.transport import EnvoyClient  # noqa: F401  (the envoy's own client)

    cache = open_cache(e["state"])
    try:
        servers, ca = cache.meta("servers"), (e["state"] / "ca.pem").read_bytes()
        cert, key = (e["state"] / "envoy.pem").read_bytes(), (e["state"] / "envoy.key").read_bytes()
    finally:
        cache.close()
    report = {"run_id": "dup-" + e["id"][:8], "envoy_id": e["id"], "started_at": time.time(),
              "counts": {"ok": 1, "changed": 0, "failed": 0, "skipped": 0}, "resources": []}

    async def send_twice():
        from vigo.agent.enrolment import tls_client_context

        host, port = servers[0].rsplit(":", 1)
        acks = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(host, int(port), ssl=tls_client_context(ca, cert, key),
                                                           server_hostname=host)
            async with protocol.FrameConnection(reader, writer) as conn:
                reply = await conn.request("results", {"envoy_id": e["id"], "reports": [report]})
                acks.append(reply.body["acked"])
        return acks

    acks = asyncio.run(send_twice())
    assert acks == [[report["run_id"]], [report["run_id"]]]
    after = json.loads(vigocli(server, "envoys", "show", e["id"], "--json").stdout)["run_count"]
    assert after == before + 1


def test_garbage_connections_do_not_stop_the_gateway(server, fleet):
    host, port = server["gateway"].rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    async def attack():
        answers = []
        for payload in (struct.pack(">I", 100 * 1024 * 1024), b"\x00\x00\x00\x05garbage", b"\x00\x00"):
            reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
            writer.write(payload)
            await writer.drain()
            if payload != b"\x00\x00":
                frame = await protocol.read_frame(reader, idle_timeout_s=10, frame_timeout_s=10)
                answers.append(frame.body["code"])
            writer.close()
        plain = socket.create_connection((host, int(port)))  # no TLS at all
        plain.sendall(b"hello\r\n")
        plain.close()
        return answers

    assert asyncio.run(attack()) == ["frame_too_large", "bad_msgpack"]
    e = fleet["envoys"][1]
    report = run_once(e["state"], e["root"], e["traits"])
    assert report["counts"]["failed"] == 0 and report.get("server")


def test_revoked_envoy_is_refused(server, fleet):
    e = fleet["envoys"][1]
    vigocli(server, "envoys", "revoke", e["id"][:10])
    listed = envoys(server)
    assert listed[e["id"]]["status"] == "revoked"
    proc = run("vigo-envoy", "run", "--once", "--state-dir", e["state"], "--root", e["root"],
               "--traits-dir", e["traits"], "--json", check=None)
    assert "revoked" in (proc.stderr + proc.stdout).lower()
    shown = json.loads(vigocli(server, "envoys", "show", e["id"], "--json").stdout)
    assert shown["revoked_at"] is not None


def test_status_and_admin_errors(server):
    status = json.loads(vigocli(server, "server", "status", "--json").stdout)
    assert status["partition"] == "p0" and status["term"] == 1 and status["gateways"]
    missing = vigocli(server, "envoys", "show", "no-such-envoy", check=1)
    assert "no envoy with id" in missing.stderr and "Traceback" not in missing.stderr
    wrong = run("vigocli", "server", "status", env={**server["env"], "RAY_AUTH_TOKEN": "wrong"}, check=None)
    assert wrong.returncode == 4 and "token" in wrong.stderr
    secret = vigocli(server, "secrets", "set", "db_password", stdin="s3cret-value\n")
    assert "db_password" in secret.stdout
    assert "s3cret" not in vigocli(server, "secrets", "list").stdout
