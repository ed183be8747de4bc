"""The envoy's connection to one gateway: address, TLS, frames, timeouts.

    parse_server       ``HOST:PORT`` / ``[v6]:PORT``, checked before anything dials.
    tune_socket        TCP keepalive and TCP_USER_TIMEOUT on the connection's socket: a gateway
                       whose host vanished is noticed by the kernel within DEAD_LINK_S, idle or
                       not (docs/envoy.md, "A dead link").
    EnvoyClient        one connection: TLS (the caller's context: mutual TLS pinned to the fleet
                       CA once joined), then frames (``protocol.FrameConnection``). Every way the
                       network can fail becomes ``UnavailableError`` (a ``TransportError``); an
                       error the gateway answers stays a ``ServerError`` with its code. A gateway that refuses the
                       certificate as expired (an ``expired`` frame, or a TLS alert from anything
                       in between) is ``ServerError("expired")``: a lapse, not an outage.

What is said over the connection (check-in, flush, renewal) is ``vigo.agent.session``.

This module is imported by the envoy: standard library, msgpack and cryptography only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
from typing import Any

from vigo.errors import (
    ConfigError,
    ProtocolError,
    ServerError,
    TransportError,
    UnavailableError,
    error_from_code,
)
from vigo.protocol import FrameConnection, encode

log = logging.getLogger("vigo.agent.transport")

#: Seconds allowed for TCP connect plus the TLS handshake, per gateway.
CONNECT_TIMEOUT_S = 5.0
#: Seconds to wait for the answer to one request (a healthy gateway answers in milliseconds;
#: the run schedule must not wait on a gateway that accepted the connection and went quiet).
REQUEST_TIMEOUT_S = 20.0
#: TCP keepalive on an idle connection: the first probe after this many idle seconds, then one
#: every TCP_KEEPALIVE_INTERVAL_S; a probe is a bare ACK the peer's kernel answers (no TLS, no
#: gateway work), so even a large fleet's probes cost the gateway hosts little.
TCP_KEEPALIVE_IDLE_S = 1
TCP_KEEPALIVE_INTERVAL_S = 1
TCP_KEEPALIVE_PROBES = 3
#: TCP_USER_TIMEOUT: the kernel drops the connection once data (a request, or keepalive probes)
#: has gone unacknowledged this long. Idle, a link to a vanished host ends within this of the
#: last acknowledgement; a request sent after the host vanished (a run's check-in) starts its
#: own count, so the link ends at most DEAD_LINK_S after the host vanished. 3 s rides out
#: several retransmissions (an isolated lost packet is not a dead link); a false alarm costs one
#: reconnect to another gateway.
TCP_USER_TIMEOUT_S = 3
DEAD_LINK_S = 2 * TCP_USER_TIMEOUT_S
#: Seconds to look for the error frame a gateway sent just before it closed on us.
_CLOSING_ERROR_WAIT_S = 0.5
#: The TLS alert a TLS stack sends when it refuses a client certificate as expired (vigo's
#: gateway answers an ``expired`` frame instead; this covers anything else in between).
_ALERT_CERT_EXPIRED = "SSLV3_ALERT_CERTIFICATE_EXPIRED"


def parse_server(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); ConfigError otherwise."""
    text = address.strip()
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<port>\d+)|(?P<host>[^:\[\]\s]+):(?P<port2>\d+)", text)
    if match is None:
        raise ConfigError(f"server address must be HOST:PORT (or [IPv6]:PORT), got {address!r}")
    host = match["v6"] or match["host"]
    port = int(match["port"] or match["port2"])
    if not 0 < port < 65536:
        raise ConfigError(f"server port must be 1..65535, got {port} in {address!r}")
    return host, port


def tune_socket(sock: socket.socket | None) -> bool:
    """Keepalive and TCP_USER_TIMEOUT on a connected TCP socket (Linux names; elsewhere only
    what the platform has). Returns whether the dead-link bound applies (every option set)."""
    if sock is None:
        return False
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", TCP_KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", TCP_KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", TCP_KEEPALIVE_PROBES), ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_S * 1000)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    complete = len(options) == 5
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:  # a socket that is not TCP (tests' pipes), or an old kernel
            log.debug("cannot set socket option %s on the gateway connection: %s", option, exc)
            complete = False
    return complete


def _expired_alert(exc: BaseException | None) -> bool:
    """Whether a connection failure was a TLS "certificate expired" alert from the peer."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLError) and exc.reason == _ALERT_CERT_EXPIRED:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class EnvoyClient:
    """One connection to one gateway. Use ``open``/``connect``, then ``async with`` or ``close``."""

    def __init__(self, conn: FrameConnection, server: str, peer_cert_der: bytes | None) -> None:
        self.conn = conn
        self.server = server
        self.peer_cert_der = peer_cert_der

    @classmethod
    async def open(
        cls,
        server: str,
        ssl_context: ssl.SSLContext,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> EnvoyClient:
        """Connect to ``server`` (HOST:PORT); the host part is the name its certificate must bear
        when the context checks hostnames. UnavailableError for every connection failure."""
        host, port = parse_server(server)
        try:
            async with asyncio.timeout(connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl_context, server_hostname=host,
                    ssl_handshake_timeout=connect_timeout_s,
                )
        except TimeoutError:
            raise UnavailableError("unavailable", f"{server}: no TLS connection within {connect_timeout_s:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise UnavailableError(
                "unavailable", f"{server}: the gateway's certificate is not trusted ({exc.verify_message}); "
                "is this a gateway of the fleet this envoy joined?") from exc
        except ssl.SSLError as exc:
            if exc.reason == _ALERT_CERT_EXPIRED:
                raise ServerError("expired", f"{server} refused this envoy's certificate as expired "
                                             "(TLS alert)") from exc
            raise UnavailableError("unavailable", f"{server}: TLS handshake failed ({exc.reason or exc})") from exc
        except OSError as exc:
            raise UnavailableError("unavailable", f"{server}: {exc.strerror or exc}") from exc
        tune_socket(writer.get_extra_info("socket"))
        ssl_object = writer.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        conn = FrameConnection(reader, writer, request_timeout_s=request_timeout_s)
        return cls(conn, server, peer)

    @classmethod
    async def connect(
        cls,
        servers: list[str],
        ssl_context: ssl.SSLContext,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> EnvoyClient:
        """The first of ``servers`` that accepts a connection, tried in order."""
        failures = []
        for server in servers:
            try:
                return await cls.open(server, ssl_context, connect_timeout_s=connect_timeout_s,
                                      request_timeout_s=request_timeout_s)
            except UnavailableError as exc:
                log.info("gateway %s unreachable: %s", server, exc.reason)
                failures.append(exc.reason)
        raise UnavailableError("unavailable", "no gateway reachable: " + ("; ".join(failures) or "no servers configured"))

    async def close(self) -> None:
        self.conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.conn.wait_closed()

    async def __aenter__(self) -> EnvoyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- requests

    async def request(self, type: str, body: dict[str, Any]) -> dict[str, Any]:
        """The reply body. ServerError (with the gateway's code) for an error answer,
        UnavailableError when the connection fails, ProtocolError only for a body this side
        cannot encode."""
        encode(type, 0, body)  # a body the gateway would refuse fails here, as ours (ProtocolError)
        try:
            frame = await self.conn.request(type, body)
        except UnavailableError as exc:
            closing = await self._closing_error()
            if closing is not None:
                raise closing from exc
            if _expired_alert(exc):
                raise ServerError("expired", f"{self.server} refused this envoy's certificate as expired "
                                             "(TLS alert)") from exc
            raise UnavailableError(exc.code, f"{self.server}: {exc.reason}",
                                   retry_after_s=exc.retry_after_s) from exc
        except ServerError:
            raise
        except ProtocolError as exc:  # the stream from the gateway broke
            raise UnavailableError("unavailable", f"{self.server}: the gateway broke the protocol: {exc}") from exc
        except OSError as exc:
            closing = await self._closing_error()
            if closing is not None:
                raise closing from exc
            raise UnavailableError("unavailable", f"{self.server}: connection lost ({exc})") from exc
        return frame.body

    async def _closing_error(self) -> ServerError | TransportError | None:
        """An error frame the gateway sent for the whole connection before closing it (a revoked
        certificate is told so at once), if one arrived; our request may have raced with it."""
        try:
            async with asyncio.timeout(_CLOSING_ERROR_WAIT_S):
                while True:
                    frame = await self.conn.receive()
                    if frame is None:
                        return None
                    if frame.type == "error":
                        return error_from_code(frame.body["code"], frame.body["reason"],
                                               retry_after_s=frame.body.get("retry_after_s"))
        except Exception:  # timeout, or the stream broke: nothing more to learn
            return None

    async def join(self, token: str, csr_pem: bytes, hostname: str, host_traits: dict[str, Any]) -> dict[str, Any]:
        return await self.request("join", {"token": token, "csr_pem": csr_pem, "hostname": hostname,
                                           "traits": host_traits})

    async def checkin(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("checkin", body)

    async def renew(self, envoy_id: str, csr_pem: bytes) -> dict[str, Any]:
        return await self.request("renew", {"envoy_id": envoy_id, "csr_pem": csr_pem})

    async def send_results(self, envoy_id: str, reports: list[dict[str, Any]]) -> list[str]:
        """The run ids the gateway acknowledged (durably stored)."""
        answer = await self.request("results", {"envoy_id": envoy_id, "reports": reports})
        return [str(run_id) for run_id in answer["acked"]]
