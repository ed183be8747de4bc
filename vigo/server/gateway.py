"""The gateway's TCP+TLS server: plain asyncio, no Ray (the actor in vigo/actors/gateway.py
gives it a backend that calls the primary).

Per connection: the TLS handshake verifies a client certificate when one is presented (envoys
after admission); a revoked or expired one is refused at once, with an error frame. Then frames
are read one at a time; each request is checked against what the connection may send
(``protocol.check_allowed``), and answered. Framing errors get an error frame and the
connection is closed; message errors get an error frame and the connection stays open. Nothing
a client sends can stop the server from serving everyone else.

Envoy requests (join, checkin, results, renew) go through the **batcher**: many envoys'
requests ride in one call to the primary (one transaction there). The batcher's queue is
bounded: past ``queue_max`` waiting requests, new ones are answered ``overloaded`` with a
retry-after rather than letting memory grow.

Every ``checkin_ok`` carries ``gateways``, the gateways serving now (HOST:PORT), when the
actor has told this server the list (``gateways``, refreshed from control's topology): envoys
learn every gateway from it (docs/envoy.md, "Gateways").
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import hmac
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vigo import protocol
from vigo.config import GatewayConfig
from vigo.errors import AdmissionError, ProtocolError
from vigo.server.admissions import (
    RevocationSet,
    cert_key_sha256,
    cert_serial,
    cert_validity,
    envoy_id_from_cert,
    tls_server_context,
)
from vigo.timefmt import iso

log = logging.getLogger("vigo.server.gateway")

#: How often the gateway refreshes its copy of the revocation list from the primary, seconds.
REVOCATION_REFRESH_S = 2.0
#: Per-connection TLS read buffer, bytes: half a TLS record (see ``start``).
TLS_READ_BUFFER_BYTES = 8 * 1024
#: Idle limit for connections without an envoy certificate (joins, admin), seconds.
ANONYMOUS_IDLE_TIMEOUT_S = 30.0
#: Batches that may be in flight to the primary at once (pipelining hides call latency).
MAX_BATCHES_IN_FLIGHT = 2
#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME (the ssl module has no name for it): see ``__init__``.
_VERIFY_NO_CHECK_TIME = 0x200000


class Backend(Protocol):
    async def handle_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]: ...
    async def admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]: ...
    async def bundle_bytes(self, serial: int) -> bytes: ...
    async def revocations(self) -> list[dict[str, Any]]: ...


@dataclass(eq=False)  # hashed by identity: connections live in a set
class _Conn:
    writer: asyncio.StreamWriter
    envoy_id: str | None
    serial: int | None
    #: (not_before, not_after) of the envoy certificate, unix seconds; None without one.
    validity: tuple[float, float] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, type: str, id: int, body: dict[str, Any], max_bytes: int) -> None:
        async with self.lock:
            await protocol.write_frame(self.writer, type, id, body, max_bytes=max_bytes)


@dataclass
class GatewayStats:
    connections: int = 0
    connections_total: int = 0
    requests: int = 0
    batches: int = 0
    batch_items: int = 0
    overloaded: int = 0
    protocol_errors: int = 0
    started_at: float = field(default_factory=time.time)
    #: Error frames sent, by code (what envoys were told, including retry-afters).
    errors: dict[str, int] = field(default_factory=dict)
    #: Results batches committed whose acknowledgement was dropped (test hook, see below).
    acks_dropped: int = 0


class GatewayServer:
    def __init__(
        self,
        backend: Backend,
        *,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        cfg: GatewayConfig,
        host: str,
        port: int,
        admin_token: Callable[[], str | None],
        revocations: list[dict[str, Any]] | None = None,
        on_stack_pushed: Callable[[], Awaitable[None]] | None = None,
        drop_results_acks: int = 0,
    ) -> None:
        self.backend = backend
        self.cfg = cfg
        self.host, self.port = host, port
        self.ssl = tls_server_context(cert_pem, key_pem, ca_pem, require_client_cert=False)
        # Envoy certificate *times* are checked here (``_serve``), not by the handshake. An
        # expired certificate that fails the handshake ends the connection with a TLS alert that
        # asyncio never sends (it drops the transport first): the envoy would see a bare EOF,
        # indistinguishable from a crash, and this gateway would log nothing naming the envoy.
        # Checked after the handshake, the envoy gets an `expired` error frame and the log gets
        # its id. The chain, the CA and the key usage are still verified by OpenSSL; the CA
        # never issues a certificate outliving itself, so a current leaf means a current CA.
        self.ssl.verify_flags |= _VERIFY_NO_CHECK_TIME
        self.admin_token = admin_token
        self.revoked = RevocationSet.from_list(revocations or [])
        self.on_stack_pushed = on_stack_pushed
        self.stats = GatewayStats()
        self._conns: set[_Conn] = set()
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future]] = asyncio.Queue()
        self._bundle_cache: tuple[int, asyncio.Future] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._in_flight = asyncio.Semaphore(MAX_BATCHES_IN_FLIGHT)
        self._background: set[asyncio.Future] = set()
        #: The gateways serving now, HOST:PORT, as the actor last read them from control (None:
        #: not known yet; check-in answers then carry no list and envoys keep theirs).
        self.gateways: list[str] | None = None
        #: TEST HOOK, 0 (off) in production: this many `results` requests have their batch
        #: committed by the primary and then the connection dropped *before* the ack is written,
        #: as a network failure at exactly that instant would (the envoy must resend; the
        #: server must count the resent batch once). Set by tests through the constructor or
        #: this attribute; counted in stats.acks_dropped.
        self.drop_results_acks = drop_results_acks

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        # CPython's asyncio gives every TLS connection a 256 KiB read buffer
        # (asyncio.sslproto.SSLProtocol.max_size): 10,000 idle envoys would hold 2.5 GiB of
        # empty buffers. A smaller buffer costs only extra read calls on big frames (a 16 KiB
        # TLS record is read in two); idle memory per connection drops from ~290 KB to under
        # 50 KB (measured: benchmarks/checkin_load.py). This process serves only the gateway,
        # so the class-wide setting touches nothing else.
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER_BYTES
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.ssl, ssl_handshake_timeout=self.cfg.frame_timeout_s,
            backlog=4096, limit=64 * 1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks = [asyncio.create_task(self._batch_loop()), asyncio.create_task(self._revocation_loop())]
        log.info("gateway listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.writer.close()
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        while not self._queue.empty():  # requests that never reached the primary get an answer
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_result({"error": {"code": "unavailable", "reason": "the gateway is stopping"}})
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    # --- connections --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Conn(writer, *self._identify(writer))
        self.stats.connections_total += 1
        try:
            if len(self._conns) >= self.cfg.max_connections:
                await self._fail(conn, 0, "overloaded", f"gateway at its limit of {self.cfg.max_connections} connections",
                                 retry_after_s=self.cfg.retry_after_s)
                return
            if conn.envoy_id is not None and self.revoked.is_revoked(conn.envoy_id, conn.serial):
                await self._fail(conn, 0, "revoked", f"envoy {conn.envoy_id} certificate {conn.serial:x} is revoked")
                log.info("refused revoked envoy %s from %s", conn.envoy_id, peer)
                return
            if conn.envoy_id is not None and not await self._current(conn, peer):
                return
            self._conns.add(conn)
            self.stats.connections = len(self._conns)
            await self._frames(reader, conn)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.debug("connection from %s ended: %s", peer, exc)
        except Exception:
            log.exception("connection from %s failed", peer)
        finally:
            self._conns.discard(conn)
            self.stats.connections = len(self._conns)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    def _identify(self, writer: asyncio.StreamWriter) -> tuple[str | None, int | None, tuple[float, float] | None]:
        """The envoy id, certificate serial and validity of a verified client certificate, if any."""
        der = _peer_der(writer)
        if not der:
            return None, None, None
        try:
            return envoy_id_from_cert(der), cert_serial(der), cert_validity(der)
        except AdmissionError:
            return None, None, None

    async def _current(self, conn: _Conn, peer: Any) -> bool:
        """Whether the envoy certificate is within its validity by this gateway's clock; if
        not, the connection is refused with one error frame (``expired`` / ``unauthenticated``)."""
        not_before, not_after = conn.validity or (float("inf"), float("-inf"))
        now = time.time()
        if now > not_after:
            log.info("refused envoy %s from %s: certificate %x expired at %s", conn.envoy_id, peer, conn.serial,
                     iso(not_after))
            await self._fail(conn, 0, "expired",
                             f"envoy {conn.envoy_id} certificate {conn.serial:x} expired at {iso(not_after)} "
                             f"(gateway clock {iso(now)})")
            return False
        if now < not_before:
            log.info("refused envoy %s from %s: certificate %x not valid before %s", conn.envoy_id, peer,
                     conn.serial, iso(not_before))
            await self._fail(conn, 0, "unauthenticated",
                             f"envoy {conn.envoy_id} certificate {conn.serial:x} is not valid before "
                             f"{iso(not_before)} (gateway clock {iso(now)}): check the clocks")
            return False
        return True

    async def _frames(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        while True:
            # Without an envoy certificate a connection is a join or an admin command: it has
            # no reason to idle, and idle anonymous sockets must not crowd out the fleet.
            idle = self.cfg.idle_timeout_s if conn.envoy_id else min(self.cfg.idle_timeout_s, ANONYMOUS_IDLE_TIMEOUT_S)
            try:
                frame = await protocol.read_frame(
                    reader, max_bytes=self.cfg.max_frame_bytes, idle_timeout_s=idle,
                    frame_timeout_s=self.cfg.frame_timeout_s)
            except ProtocolError as exc:
                self.stats.protocol_errors += 1
                if exc.code not in protocol.CLOSING_CODES and hasattr(exc, "frame_id"):
                    self._count_error(exc.code)
                    await conn.send("error", exc.frame_id, protocol.error_body(exc.code, exc.reason),
                                    self.cfg.max_frame_bytes)
                    continue
                await self._fail(conn, 0, exc.code, exc.reason)
                return
            if frame is None:
                return
            self.stats.requests += 1
            try:
                protocol.check_allowed(frame.type, envoy_certificate=conn.envoy_id is not None)
                reply_type, body = await self._answer(frame, conn)
            except ProtocolError as exc:
                if exc.code in protocol.CLOSING_CODES:
                    await self._fail(conn, frame.id, exc.code, exc.reason)
                    return
                self._count_error(exc.code)
                await conn.send("error", frame.id, protocol.error_body(
                    exc.code, exc.reason, retry_after_s=self._retry(exc)), self.cfg.max_frame_bytes)
                continue
            except Exception as exc:  # the primary or control failed: say so, keep the connection
                log.warning("%s request failed behind the gateway: %s", frame.type, exc)
                self._count_error("unavailable")
                await conn.send("error", frame.id, protocol.error_body(
                    "unavailable", f"the server could not answer {frame.type} now ({type(exc).__name__}); retry later",
                    retry_after_s=self.cfg.retry_after_s), self.cfg.max_frame_bytes)
                continue
            if frame.type == "results" and self.drop_results_acks > 0:
                self.drop_results_acks -= 1
                self.stats.acks_dropped += 1
                log.warning("test hook: dropping the connection after committing a results batch, before its ack")
                conn.writer.transport.abort()
                return
            try:
                await conn.send(reply_type, frame.id, body, self.cfg.max_frame_bytes)
            except ProtocolError as exc:  # the reply itself does not fit a frame
                self._count_error("internal")
                await conn.send("error", frame.id, protocol.error_body(
                    "internal", f"the {reply_type} reply cannot be sent: {exc.reason}"), self.cfg.max_frame_bytes)

    def _count_error(self, code: str) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1

    def _retry(self, exc: ProtocolError) -> float | None:
        """The retry-after an error frame carries: the configured one for `overloaded`."""
        if exc.code == "overloaded":
            return self.cfg.retry_after_s
        return getattr(exc, "retry_after_s", None)

    async def _fail(self, conn: _Conn, id: int, code: str, reason: str, retry_after_s: float | None = None) -> None:
        self._count_error(code)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                conn.send("error", id, protocol.error_body(code, reason, retry_after_s=retry_after_s), self.cfg.max_frame_bytes), 5)

    # --- answers ------------------------------------------------------------------------

    async def _answer(self, frame: protocol.Frame, conn: _Conn) -> tuple[str, dict[str, Any]]:
        if frame.type == "ping":
            return "pong", {}
        if frame.type == "admin":
            return "admin_ok", {"result": await self._admin(frame.body)}
        item: dict[str, Any] = {"type": frame.type, "envoy_id": conn.envoy_id, "body": frame.body}
        if frame.type == "renew":
            # The primary refuses a renewal that keeps the key, and logs which serial it replaces.
            der = _peer_der(conn.writer)
            item["cert_key_sha256"] = cert_key_sha256(der) if der else None
            item["cert_serial"] = format(conn.serial, "x") if conn.serial is not None else None
        answer = await self._submit(item)
        if "error" in answer:
            err = answer["error"]
            if err["code"] == "revoked" and conn.envoy_id:
                self.revoked.revoke(conn.envoy_id)
            raise ProtocolError(err["code"], err["reason"])  # the primary's answer, passed on as is
        body = answer["ok"]
        if frame.type == "checkin":
            serial = body.pop("bundle_serial", None)
            body["bundle"] = await self._bundle(serial) if serial is not None else None
            body.setdefault("bundle_version", None)
            if self.gateways:
                body["gateways"] = list(self.gateways)
        return protocol.REPLIES[frame.type], body

    async def _admin(self, body: dict[str, Any]) -> Any:
        expected = self.admin_token()
        if not expected:
            raise ProtocolError("unauthenticated", "this cluster has no Ray auth token; vigo admin needs token authentication (see docs)")
        if not hmac.compare_digest(str(body["token"]).encode(), expected.encode()):
            raise ProtocolError("bad_token", "admin token does not match the Ray cluster token")
        answer = await self.backend.admin(body["op"], body.get("args") or {})
        if "error" in answer:
            raise ProtocolError(answer["error"]["code"], answer["error"]["reason"])
        if body["op"] == "envoys.revoke":
            self.revoked = RevocationSet.from_list(answer["ok"]["revocations"])
            self._drop_revoked()
        if body["op"] == "stack.push":
            self._spawn(self.notify_all("bundle_changed"))  # the push's answer never waits on envoys
            if self.on_stack_pushed is not None:
                self._spawn(self.on_stack_pushed())
        return answer["ok"]

    async def _bundle(self, serial: int) -> bytes:
        """The bundle for ``serial``, fetched from the primary once however many check-ins ask
        at the same moment (after a push, the whole fleet does)."""
        if self._bundle_cache is None or self._bundle_cache[0] != serial:
            future = asyncio.ensure_future(self.backend.bundle_bytes(serial))
            self._bundle_cache = (serial, future)
        future = self._bundle_cache[1]
        try:
            return await asyncio.shield(future)
        except Exception:
            if self._bundle_cache is not None and self._bundle_cache[1] is future:
                self._bundle_cache = None  # the next check-in tries again
            raise

    async def notify_all(self, reason: str) -> int:
        """Tell every connected envoy to converge now (persistent connections only)."""
        async def one(conn: _Conn) -> bool:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.send("notify", 0, {"reason": reason}, self.cfg.max_frame_bytes), 2)
                return True
            return False

        results = await asyncio.gather(*(one(c) for c in list(self._conns) if c.envoy_id is not None))
        return sum(results)

    def _drop_revoked(self) -> None:
        for conn in list(self._conns):
            if conn.envoy_id is not None and self.revoked.is_revoked(conn.envoy_id, conn.serial):
                conn.writer.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        """Run in the background, holding a reference until done (asyncio keeps only weak ones)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- batching -----------------------------------------------------------------------

    async def _submit(self, item: dict[str, Any]) -> dict[str, Any]:
        if self._queue.qsize() >= self.cfg.queue_max:
            self.stats.overloaded += 1
            raise ProtocolError("overloaded", f"gateway has {self._queue.qsize()} requests waiting (limit {self.cfg.queue_max})")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _batch_loop(self) -> None:
        wait_s = self.cfg.batch_wait_ms / 1000
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + wait_s
            while len(batch) < self.cfg.batch_max:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(self._queue.get_nowait() if not self._queue.empty() else
                                 await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            await self._in_flight.acquire()
            self._spawn(self._send_batch(batch))

    async def _send_batch(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        try:
            self.stats.batches += 1
            self.stats.batch_items += len(batch)
            try:
                answers = await self.backend.handle_batch([item for item, _ in batch])
            except Exception as exc:
                log.warning("batch of %d failed at the primary: %s", len(batch), exc)
                # The exception text may carry a remote traceback: keep it in the log only.
                answers = [{"error": {"code": "unavailable",
                                      "reason": f"the partition's primary failed ({type(exc).__name__}); retry later"}}] * len(batch)
            for (_, future), answer in zip(batch, answers, strict=False):
                if not future.done():
                    future.set_result(answer)
        finally:
            self._in_flight.release()

    async def _revocation_loop(self) -> None:
        while True:
            await asyncio.sleep(REVOCATION_REFRESH_S)
            try:
                self.revoked = RevocationSet.from_list(await self.backend.revocations())
                self._drop_revoked()
            except Exception as exc:
                log.warning("cannot refresh revocations: %s", exc)

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "endpoint": f"{self.host}:{self.port}",
            "connections": s.connections,
            "connections_total": s.connections_total,
            "requests": s.requests,
            "batches": s.batches,
            "mean_batch": round(s.batch_items / s.batches, 2) if s.batches else 0,
            "queue": self._queue.qsize(),
            "overloaded": s.overloaded,
            "protocol_errors": s.protocol_errors,
            "errors": dict(s.errors),
            "revoked": len(self.revoked),
        }


def _peer_der(writer: asyncio.StreamWriter) -> bytes | None:
    """The client certificate the TLS layer verified (DER), if one was presented."""
    obj = writer.get_extra_info("ssl_object")
    return obj.getpeercert(binary_form=True) if obj is not None else None
