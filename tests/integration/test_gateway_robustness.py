"""Bad input at the gateway: every malformed frame gets a specific error, the connection is
closed where the stream can no longer be trusted, and everyone else keeps being served.

Real TLS on loopback, the production gateway and partition code (no Ray: see serverharness).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading

import msgpack
import pytest

from tests.serverharness import ADMIN_TOKEN, running_gateway
from vigo import protocol
from vigo.errors import ServerError
from vigo.protocol import frames

pytestmark = pytest.mark.integration


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _open(gw):
    return await asyncio.open_connection("127.0.0.1", gw.port, ssl=_client_ctx())


async def _raw_exchange(gw, data: bytes, *, read_timeout: float = 10.0):
    """Send raw bytes after the TLS handshake; return the first frame the gateway answers
    and whether it then closed the connection."""
    reader, writer = await _open(gw)
    writer.write(data)
    await writer.drain()
    frame = await protocol.read_frame(reader, idle_timeout_s=read_timeout, frame_timeout_s=read_timeout)
    rest = await asyncio.wait_for(reader.read(), read_timeout)
    writer.close()
    return frame, rest == b""


async def _ping(gw) -> float:
    reader, writer = await _open(gw)
    async with protocol.FrameConnection(reader, writer) as conn:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reply = await conn.request("ping", {})
        assert reply.type == "pong"
        return loop.time() - t0


@pytest.fixture
def gw(tmp_path):
    with running_gateway(tmp_path / "server", frame_timeout_s=3.0) as gateway:
        yield gateway


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (struct.pack(">I", 100 * 1024 * 1024) + b"x" * 10, "frame_too_large"),
        (struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1", "bad_msgpack"),
        (struct.pack(">I", 3) + msgpack.packb([1, 2]), "bad_envelope"),
        (frames._HEADER.pack(len(m := msgpack.packb({"v": 9, "t": "ping", "id": 1, "b": {}}))) + m, "unknown_version"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "frame_too_large"),
    ],
)
def test_malformed_frames_get_an_error_frame_then_close(gw, payload, code):
    frame, closed = asyncio.run(_raw_exchange(gw, payload))
    assert frame.type == "error" and frame.body["code"] == code, frame
    assert closed
    assert asyncio.run(_ping(gw)) >= 0  # and the gateway still serves


def test_half_frame_times_out_with_what_arrived(gw):
    frame, closed = asyncio.run(_raw_exchange(gw, struct.pack(">I", 1000) + b"\x80" * 10))
    assert frame.body["code"] == "timeout" and "10 of 1000 payload bytes" in frame.body["reason"]
    assert closed


def test_client_that_leaves_mid_frame_is_counted_and_forgotten(gw):
    async def scenario():
        _reader, writer = await _open(gw)
        writer.write(struct.pack(">I", 1000) + b"\x80" * 10)
        await writer.drain()
        writer.close()  # EOF in the middle of a frame
        for _ in range(100):
            if gw.server.stats.protocol_errors:
                break
            await asyncio.sleep(0.05)
        errors = gw.server.stats.protocol_errors
        await _ping(gw)
        for _ in range(100):  # the server side of the closed connections winds down
            if gw.server.status()["connections"] == 0:
                break
            await asyncio.sleep(0.05)
        return errors, gw.server.status()["connections"]

    errors, connections = asyncio.run(scenario())
    assert errors == 1
    assert connections == 0  # nothing of the half-sent frame is kept


def test_unknown_type_closes_but_bad_body_keeps_the_connection(gw):
    async def scenario():
        reader, writer = await _open(gw)
        writer.write(frames._HEADER.pack(len(m := msgpack.packb({"v": 1, "t": "join", "id": 8, "b": {"token": 3}}))) + m)
        await writer.drain()
        bad_body = await protocol.read_frame(reader)
        async with protocol.FrameConnection(reader, writer) as conn:
            pong = await conn.request("ping", {})
        unknown, closed = await _raw_exchange(
            gw, frames._HEADER.pack(len(m := msgpack.packb({"v": 1, "t": "teleport", "id": 7, "b": {}}))) + m)
        return bad_body, pong, unknown, closed

    bad_body, pong, unknown, closed = asyncio.run(scenario())
    assert (bad_body.id, bad_body.body["code"]) == (8, "bad_body") and "token" in bad_body.body["reason"]
    assert pong.type == "pong"
    assert unknown.body["code"] == "unknown_type" and "teleport" in unknown.body["reason"] and closed


def test_envoy_messages_need_a_certificate_and_admin_needs_the_token(gw):
    async def scenario():
        reader, writer = await _open(gw)
        async with protocol.FrameConnection(reader, writer) as conn:
            errors = []
            for type_, body in (
                ("checkin", {"envoy_id": "x", "traits": {}, "bundle_version": None, "serial": 0, "term": 0,
                             "queue_depth": 0, "oldest_queued_at": None, "last_run": None}),
                ("admin", {"token": "wrong", "op": "status", "args": {}}),
                ("join", {"token": "vigo_nope", "csr_pem": b"x", "hostname": "h"}),
            ):
                try:
                    await conn.request(type_, body)
                except ServerError as exc:
                    errors.append((exc.code, exc.reason))
            status = await conn.request("admin", {"token": ADMIN_TOKEN, "op": "status", "args": {}})
            return errors, status

    errors, status = asyncio.run(scenario())
    assert errors[0][0] == "unauthenticated" and "join first" in errors[0][1]
    assert errors[1][0] == "bad_token"
    assert errors[2] == ("bad_token", "join token not recognised")
    assert status.body["result"]["partition"] == "p0"


def test_slow_and_silent_clients_do_not_hold_up_others(gw):
    """Thirty connections stall (TCP only, no TLS handshake; or a half frame); while every one
    of them is still open, a well-behaved client completes twenty requests."""

    async def scenario():
        silent = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(15)]
        halves = []
        for _ in range(15):
            reader, writer = await _open(gw)
            writer.write(struct.pack(">I", 500) + b"\x80")
            await writer.drain()
            halves.append((reader, writer))
        served = [await _ping(gw) for _ in range(20)]
        still_open = sum(1 for r, _ in halves if not r.at_eof())
        for s in silent:
            s.close()
        for _, w in halves:
            w.close()
        return served, still_open

    served, still_open = asyncio.run(scenario())
    assert len(served) == 20
    assert still_open == 15  # the stalled ones had not even timed out yet


def test_overload_answers_retry_after(tmp_path):
    with running_gateway(tmp_path / "s", queue_max=1, batch_max=1, batch_wait_ms=0) as gateway:
        async def scenario():
            conns = []
            for _ in range(6):
                reader, writer = await _open(gateway)
                conns.append(protocol.FrameConnection(reader, writer))
            # A primary that is busy: the two batches in flight cannot finish, the batcher holds
            # a third, one request waits in the queue, and the rest must be shed, not queued.
            gateway.backend.lock.acquire()
            threading.Timer(2.0, gateway.backend.lock.release).start()
            results = await asyncio.gather(
                *(c.request("join", {"token": "vigo_x", "csr_pem": b"x", "hostname": "h"}) for c in conns),
                return_exceptions=True)
            for c in conns:
                c.close()
            return results

        results = asyncio.run(scenario())
    codes = sorted(getattr(r, "code", "ok") for r in results)
    assert "overloaded" in codes  # shed, not queued without bound
    overloaded = next(r for r in results if getattr(r, "code", "") == "overloaded")
    assert overloaded.retry_after_s and overloaded.retry_after_s > 0
