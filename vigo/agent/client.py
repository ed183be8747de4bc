"""The envoy's online path: join a fleet, check in, flush the results queue.

    EnvoyClient       one gateway connection: TLS, then frames (protocol.FrameConnection).
                      Every way the network can fail becomes ``UnavailableError``; an error the
                      gateway answers stays a ``ServerError`` with its code.
    join_fleet        first contact. TLS *without* verification (the envoy does not know the CA
                      yet), ``join``, then trust on first use, checked: the certificate the
                      gateway presented on that very connection must be signed by the CA it
                      sent (and that CA must have the pinned fingerprint, if one was given).
                      Only then are key, certificate, CA, servers and bundle key stored.
    run_once          one online run: checkin (first gateway that answers, mutual TLS) →
                      accept a newer bundle → converge (fresh or cached bundle) → queue →
                      flush in bounded batches → renew the certificate if due. No gateway
                      reachable: converge from the cache with ``offline=True``, keep the
                      reports queued, say so in one line.
    try_renew         certificate renewal over the authenticated connection, once less than a
                      third of the certificate's lifetime is left (``vigo.agent.identity``):
                      a fresh key, ``renew``, the answer checked, the pair installed crash-safe.
                      Never fails the caller's run: a failed renewal is logged and tried again
                      on the next run (the current certificate is still valid).

Decisions:

* A gateway whose checkin answer carries a term lower than one this envoy has already seen is
  stale (a deposed primary behind it): its answer and bundle are ignored, the next gateway in
  the list is tried, and with none left the run is offline. Reports are not sent to it.
* ``revoked`` is not "unreachable": the fleet said this envoy must stop. The run converges
  nothing, exits 1 with a clear message, and remembers it (meta ``revoked``) so later runs
  refuse at once, also while no server is reachable, until ``vigo-envoy join`` with a new
  token. The cached bundle is *not* enforced any more: an operator revokes a host to stop
  managing it (decommissioned, repurposed, compromised), and a host that keeps converging
  would fight whoever took it over. Queued reports stay queued.
* A certificate that expired (by this host's clock before connecting, or answered ``expired``
  by a gateway) is a lapse, not an outage: the run converges from the cache as offline runs
  do, the reports stay queued, and one line says to re-join with a new token. Nothing is tried
  on the network with it.
* Reports queued under another envoy id (runs from before joining, or before a re-join) are
  sent under the current id with ``queued_as`` naming the old one: the server's id is the one
  it knows this host by, and it refuses reports that name another envoy.

This module is imported by the envoy: standard library, msgpack and cryptography only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from vigo.agent import identity, runner, traits
from vigo.agent.backoff import FLUSH_RETRY_BASE_S, FLUSH_RETRY_CAP_S, Backoff, flush_pause
from vigo.agent.cache import Cache
from vigo.agent.enrolment import make_envoy_key_and_csr, tls_client_context
from vigo.errors import (
    AdmissionError,
    BundleError,
    BundleRefusedError,
    ConfigError,
    ProtocolError,
    RevokedError,
    ServerError,
    UnavailableError,
)
from vigo.policy import bundle as bundle_mod
from vigo.protocol import FrameConnection, encode

log = logging.getLogger("vigo.agent.client")

#: Files in the state directory written by ``join`` (and by renewals: ``vigo.agent.identity``).
KEY_FILE = identity.KEY_FILE
CERT_FILE = identity.CERT_FILE
CA_FILE = identity.CA_FILE
#: Seconds allowed for TCP connect plus the TLS handshake, per gateway.
CONNECT_TIMEOUT_S = 5.0
#: Seconds to wait for the answer to one request (a healthy gateway answers in milliseconds;
#: the run schedule must not wait on a gateway that accepted the connection and went quiet).
REQUEST_TIMEOUT_S = 20.0
#: Bounds of one ``results`` message.
FLUSH_MAX_REPORTS = 50
FLUSH_MAX_BYTES = 1024 * 1024
#: Seconds to look for the error frame a gateway sent just before it closed on us.
_CLOSING_ERROR_WAIT_S = 0.5
#: The TLS alert a TLS stack sends when it refuses a client certificate as expired (vigo's
#: gateway answers an ``expired`` frame instead; this covers anything else in between).
_ALERT_CERT_EXPIRED = "SSLV3_ALERT_CERTIFICATE_EXPIRED"
#: Codes that say one report (not the connection or the server) is unacceptable.
_REPORT_REFUSALS = frozenset({"bad_body", "forbidden", "frame_too_large"})

_HEX64 = re.compile(r"[0-9a-f]{64}")


# --- addresses and certificates ----------------------------------------------------------------


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


def normalise_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits (colons and spaces dropped)."""
    value = re.sub(r"[\s:]", "", text).lower()
    if not _HEX64.fullmatch(value):
        raise ConfigError(
            f"CA fingerprint must be the SHA-256 of the CA certificate: 64 hex digits "
            f"(colons allowed), got {text!r}"
        )
    return value


def check_gateway_cert(
    peer_der: bytes | None,
    ca_pem: bytes,
    *,
    server: str,
    expected_fingerprint: str | None = None,
) -> str:
    """Check what a gateway sent at join: the certificate it presented (DER) must be issued and
    signed by ``ca_pem``, and the CA's SHA-256 must be ``expected_fingerprint`` when given.
    Returns the CA fingerprint; AdmissionError saying which check failed otherwise."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise AdmissionError(f"refusing server {server}: the CA it sent is not a PEM certificate ({exc})") from exc
    fingerprint = ca.fingerprint(hashes.SHA256()).hex()
    if not peer_der:
        raise AdmissionError(f"refusing server {server}: it presented no TLS certificate")
    try:
        leaf = x509.load_der_x509_certificate(peer_der)
    except ValueError as exc:
        raise AdmissionError(f"refusing server {server}: its TLS certificate does not parse ({exc})") from exc
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        detail = str(exc) or "the signature does not verify with the CA's key"
        raise AdmissionError(
            f"refusing server {server}: its certificate does not chain to the CA it sent "
            f"(certificate issuer {leaf.issuer.rfc4514_string()!r}, CA {ca.subject.rfc4514_string()!r}: "
            f"{detail})"
        ) from exc
    if not _is_ca(ca):
        raise AdmissionError(f"refusing server {server}: the certificate it sent as its CA is not a CA certificate")
    if expected_fingerprint is not None:
        want = normalise_fingerprint(expected_fingerprint)
        if want != fingerprint:
            raise AdmissionError(
                f"refusing server {server}: CA fingerprint mismatch: expected {want}, got {fingerprint}"
            )
    return fingerprint


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _names_host(cert_der: bytes, host: str) -> bool:
    """Whether the certificate's SANs name ``host`` (exact DNS name or IP address)."""
    try:
        sans = x509.load_der_x509_certificate(cert_der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".") in {n.lower().rstrip(".") for n in sans.get_values_for_type(x509.DNSName)}
    return ip in sans.get_values_for_type(x509.IPAddress)


def _expired_alert(exc: BaseException | None) -> bool:
    """Whether a connection failure was a TLS "certificate expired" alert from the peer."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLError) and exc.reason == _ALERT_CERT_EXPIRED:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _anonymous_context() -> ssl.SSLContext:
    """For ``join`` only: encrypted, not yet authenticated (checked after join_ok instead)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- one gateway connection --------------------------------------------------------------------


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

    async def _closing_error(self) -> ServerError | None:
        """An error frame the gateway sent for the whole connection before closing it (a revoked
        certificate is told so at once), if one arrived; our request may have raced with it."""
        try:
            async with asyncio.timeout(_CLOSING_ERROR_WAIT_S):
                while True:
                    frame = await self.conn.receive()
                    if frame is None:
                        return None
                    if frame.type == "error":
                        cls = UnavailableError if frame.body["code"] in ("overloaded", "unavailable") else ServerError
                        return cls(frame.body["code"], frame.body["reason"],
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


# --- join ----------------------------------------------------------------------------------------


async def join_fleet(
    state_dir: Path,
    servers: list[str],
    token: str,
    *,
    ca_fingerprint: str | None = None,
    traits_dir: Path | None = None,
) -> dict[str, Any]:
    """Enrol this host with the first reachable gateway; store its identity on success only."""
    for server in servers:
        parse_server(server)  # a typo is a usage error, before any key is made
    if ca_fingerprint is not None:
        ca_fingerprint = normalise_fingerprint(ca_fingerprint)
    host_traits = traits.collect(traits_dir)
    hostname = str(host_traits.get("hostname") or socket.gethostname())
    key_pem, csr_pem = make_envoy_key_and_csr(hostname)
    with runner.run_lock(state_dir):
        async with await EnvoyClient.connect(servers, _anonymous_context()) as client:
            try:
                answer = await client.join(token, csr_pem, hostname, host_traits)
            except ServerError as exc:
                if exc.code == "bad_token":
                    raise AdmissionError(f"server {client.server} refused the join token: {exc.reason}") from exc
                raise
            server, peer = client.server, client.peer_cert_der
        fingerprint = check_gateway_cert(peer, answer["ca_pem"], server=server, expected_fingerprint=ca_fingerprint)
        host, _port = parse_server(server)
        if peer and not _names_host(peer, host):
            log.warning("the gateway certificate of %s does not name %r: later runs will not verify it; "
                        "join with the name or address the certificate was issued for", server, host)
        identity.install(state_dir, key_pem, answer["certificate_pem"], ca_pem=answer["ca_pem"])
        with runner.open_cache(state_dir) as cache:
            old_id, old_key = cache.envoy_id, cache.meta("trusted_key")
            new_key = bytes(answer["signing_key_pem"])
            values: dict[str, Any] = {
                "envoy_id": answer["envoy_id"],
                "servers": list(servers),
                "trusted_key": new_key,
                "highest_term": max(int(cache.meta("highest_term", 0) or 0), int(answer["term"])),
                "ca_fingerprint": fingerprint,
                "joined_at": time.time(),
                "revoked": None,
            }
            if old_key is not None and bytes(old_key) != new_key:
                # Serials count per signing key: the fleet's bundles start again at 1.
                log.warning("bundle signing key replaced by the fleet's; the highest accepted serial starts over")
                values["highest_serial"] = 0
            cache.update_meta(values)
            if "highest_serial" in values:
                cache.drop_bundles()
    if old_id and old_id != answer["envoy_id"]:
        log.info("envoy id %s replaced by the fleet's id %s", old_id, answer["envoy_id"])
    log.info("joined via %s as envoy %s (CA %s, term %d)", server, answer["envoy_id"], fingerprint[:16], answer["term"])
    return {
        "envoy_id": answer["envoy_id"],
        "server": server,
        "servers": list(servers),
        "ca_fingerprint": fingerprint,
        "term": answer["term"],
        "state_dir": str(state_dir),
    }


# --- run ------------------------------------------------------------------------------------------


def _lapsed_text(state_dir: Path, servers: list[str], not_after: float, refused: str | None = None) -> str:
    """The one line an envoy whose certificate lapsed prints (and logs) on every run."""
    how = (f"{refused}" if refused else
           f"certificate expired at {_iso(not_after)} while this envoy was offline")
    server_flags = " ".join(f"--server {s}" for s in servers) or "--server HOST:PORT"
    return (f"{how}; re-join with `vigo-envoy join {server_flags} --token TOKEN --state-dir {state_dir}` "
            "(a new token); enforcing the cached bundle meanwhile, reports stay queued")


def _refused_text(server: str, reason: str, not_after: float) -> str:
    return (f"certificate refused as expired by {server} ({reason}), though by this host's clock it is valid "
            f"until {_iso(not_after)}: check both clocks")


async def run_once(opts: runner.RunOptions) -> dict[str, Any]:
    """One online run; returns ``{"report", "server", "flushed", "queued"}``.

    Raises VigoError when no run can happen: not joined, revoked, no bundle at all.
    """
    state_dir = opts.state_dir
    with runner.run_lock(state_dir), runner.open_cache(state_dir, queue_max_bytes=opts.queue_max_bytes) as cache:
        ident = identity.load(state_dir)
        servers = list(cache.meta("servers", []) or [])
        if not servers:
            raise AdmissionError(
                f"not joined: the cache in {state_dir} names no server; run `vigo-envoy join --server "
                f"HOST:PORT --token TOKEN --state-dir {state_dir}` first")
        revoked = cache.meta("revoked")
        if revoked:
            raise RevokedError(_revoked_text(cache.envoy_id, revoked))
        trusted = runner._trusted_key(cache, None)
        host_traits = traits.collect(opts.traits_dir)

        client, failures, lapsed = await _checkin(cache, servers, ident, host_traits, trusted, state_dir=state_dir)
        try:
            current = cache.bundle_in_force(trusted)
            report = None
            if current is not None:
                report = runner.converge_and_queue(cache, current, opts, offline=client is None,
                                                   host_traits=host_traits)
            if report is not None:
                runner.note_enforcement(cache, offline=client is None, at=report["started_at"])
            flushed = 0
            if client is not None:
                try:
                    flushed = await flush(client, cache)
                    record_flush(cache, client.server, flushed)
                except ServerError as exc:  # the run happened; what was not acknowledged stays queued
                    log.warning("flush to %s stopped (%s): %s; the rest stays queued", client.server, exc.code,
                                exc.reason)
                # Last, on the same connection: converging never waits for it.
                await try_renew(client, state_dir, cache.envoy_id)
            queued = cache.queue_stats().runs
        finally:
            if client is not None:
                await client.close()
        if client is None and not lapsed:  # a lapse was said in its own line already
            log.warning("offline: no gateway answered (%s); %s, %d report(s) queued", "; ".join(failures),
                        "converged from the cached bundle" if report is not None else "no cached bundle either",
                        queued)
        if report is None:
            why = ("the server has no stack pushed yet" if client is not None
                   else "this envoy's certificate lapsed" if lapsed else "no gateway reachable")
            raise BundleError(f"no bundle to enforce: {why} and the cache in {state_dir} holds none")
        return {"report": report, "server": client.server if client else None, "flushed": flushed, "queued": queued}


async def _checkin(cache: Cache, servers: list[str], ident: identity.Identity, host_traits: dict[str, Any],
                   trusted: Any, *, state_dir: Path) -> tuple[EnvoyClient | None, list[str], bool]:
    """Check in with the first gateway that gives a current answer; accept its bundle. Returns
    the open client (for the flush), or None (this run is offline), why each gateway failed,
    and whether the certificate lapsed (said in one line here: re-join)."""
    if ident.expired():
        log.error("%s", _lapsed_text(state_dir, servers, ident.not_after))
        return None, [f"certificate expired at {_iso(ident.not_after)}"], True
    failures: list[str] = []
    refused: str | None = None
    ctx = tls_client_context(ident.ca_pem, ident.cert_pem, ident.key_pem)
    body = checkin_body(cache, host_traits)
    for server in servers:
        try:
            client = await EnvoyClient.open(server, ctx)
        except UnavailableError as exc:
            log.info("gateway %s unreachable: %s", server, exc.reason)
            failures.append(exc.reason)
            continue
        except ServerError as exc:  # a TLS "certificate expired" alert
            refused = note_refused_cert(cache, server, exc.reason, ident)
            failures.append(f"{server}: {exc.reason}")
            continue
        try:
            answer = await client.checkin(body)
        except ProtocolError as exc:  # our own body does not encode: no gateway will take it
            await client.close()
            log.error("cannot send the checkin: %s", exc)
            return None, [f"checkin not sendable: {exc}"], False
        except ServerError as exc:
            await client.close()
            if exc.code == "revoked":
                record = {"at": time.time(), "server": server, "reason": exc.reason}
                cache.set_meta("revoked", record)
                raise RevokedError(_revoked_text(cache.envoy_id, record)) from exc
            if exc.code == "expired":  # by the gateway's clock; another gateway may still differ
                refused = note_refused_cert(cache, server, exc.reason, ident)
                failures.append(f"{server}: {exc.reason}")
                continue
            level = logging.INFO if isinstance(exc, UnavailableError) else logging.ERROR
            log.log(level, "gateway %s refused the checkin (%s): %s", server, exc.code, exc.reason)
            failures.append(f"{server} refused the checkin ({exc.code}): {exc.reason}")
            continue
        stale, _accepted = take_checkin_answer(cache, server, answer, trusted)
        if stale is not None:
            failures.append(stale)
            await client.close()
            continue
        return client, failures, False
    if refused is not None:
        log.error("%s", _lapsed_text(state_dir, servers, ident.not_after, refused))
        return None, failures, True
    return None, failures, False


def note_refused_cert(cache: Cache, server: str, reason: str, ident: identity.Identity) -> str:
    """Remember that a gateway refused this certificate as expired (meta ``cert_refused``, for
    `vigo-envoy status`); returns the line that says so."""
    cache.set_meta("cert_refused", {"at": time.time(), "server": server, "reason": reason,
                                    "serial": format(ident.serial, "x")})
    return _refused_text(server, reason, ident.not_after)


async def try_renew(client: EnvoyClient, state_dir: Path, envoy_id: str, *, now: float | None = None) -> float | None:
    """Renew this envoy's certificate over ``client`` if it is due (``identity.renewal_due``):
    a fresh key and CSR, ``renew``, the answer checked (fleet CA, this envoy id, this key), the
    new pair installed crash-safe. Returns the new expiry, or None (not due, or failed: logged;
    the current certificate is still valid and the next run tries again). Never raises but for
    cancellation. Blocking work (key generation, fsync) runs in a thread."""
    try:
        current = await asyncio.to_thread(identity.load, state_dir)
    except AdmissionError as exc:
        log.warning("no certificate renewal: %s", exc)
        return None
    if not current.renewal_due(now):
        return None
    try:
        key_pem, csr_pem = await asyncio.to_thread(make_envoy_key_and_csr, envoy_id)
        answer = await client.renew(envoy_id, csr_pem)
        new = await asyncio.to_thread(_install_renewed, state_dir, key_pem, answer["certificate_pem"],
                                      current.ca_pem, envoy_id)
    except (ServerError, ProtocolError, AdmissionError, OSError, ValueError) as exc:
        log.warning("certificate renewal via %s failed (%s): %s; the current certificate stays in use (valid until "
                    "%s) and a later run tries again", client.server, getattr(exc, "code", type(exc).__name__),
                    getattr(exc, "reason", exc), _iso(current.not_after))
        return None
    except Exception:  # a bug: logged with its traceback, and still never the run's end
        log.exception("certificate renewal via %s failed unexpectedly; the current certificate stays in use",
                      client.server)
        return None
    log.info("certificate renewed via %s: serial %x valid until %s (the previous one, serial %x, stays valid "
             "until %s)", client.server, new.serial, _iso(new.not_after), current.serial, _iso(current.not_after))
    return new.not_after


def _install_renewed(state_dir: Path, key_pem: bytes, cert_pem: bytes, ca_pem: bytes,
                     envoy_id: str) -> identity.Identity:
    """Check what the server sent (it replaces a working pair only if it is right), install it."""
    identity.check_issued(identity.pair(key_pem, bytes(cert_pem), ca_pem), ca_pem, envoy_id)
    return identity.install(state_dir, key_pem, bytes(cert_pem))


def checkin_body(cache: Cache, host_traits: dict[str, Any]) -> dict[str, Any]:
    """What a check-in tells the server: traits, the bundle in force, the queue."""
    stats = cache.queue_stats()
    info = cache.bundle_info("current")
    return {
        "envoy_id": cache.envoy_id,
        "traits": host_traits,
        "bundle_version": info["version"] if info else None,
        "serial": int(cache.meta("highest_serial", 0) or 0),
        "term": int(cache.meta("highest_term", 0) or 0),
        "queue_depth": stats.runs,
        "oldest_queued_at": stats.oldest_started_at,
        "last_run": cache.meta("last_run"),
        "offline_runs": stats.offline_runs,
    }


def take_checkin_answer(cache: Cache, server: str, answer: dict[str, Any],
                        trusted: Any) -> tuple[str | None, bool]:
    """Believe a checkin answer, or not: ``(why it is stale, None if current; whether a newer
    bundle was accepted)``. A current answer updates the schedule and term in the cache and its
    bundle (if any) is verified and accepted unless it would roll policy back."""
    high_term = int(cache.meta("highest_term", 0) or 0)
    if answer["term"] < high_term:
        log.warning("gateway %s answered with term %d but this envoy has seen term %d: a stale "
                    "server; its answer is ignored", server, answer["term"], high_term)
        return f"{server} is stale (term {answer['term']} < {high_term})", False
    cache.update_meta({
        "highest_term": max(high_term, answer["term"]),
        "interval_s": answer["interval_s"],
        "splay_s": answer["splay_s"],
        "last_checkin_at": time.time(),
        "last_server": server,
    })
    accepted = False
    if answer.get("bundle") is not None:
        accepted = _accept(cache, answer["bundle"], trusted, server)
    return None, accepted


def _accept(cache: Cache, data: bytes, trusted: Any, server: str) -> bool:
    """Verify and cache a bundle from a gateway; a refusal keeps the last good one in force.
    True when it is newer than the one in force (and now replaces it)."""
    try:
        incoming = bundle_mod.decode(data, trusted, origin=f"bundle from {server}")
        return cache.accept_bundle(incoming)
    except BundleRefusedError as exc:
        log.error("%s; keeping the bundle in force", exc)
    except BundleError as exc:
        log.error("refusing the bundle from %s: %s; keeping the bundle in force", server, exc)
    return False


async def flush(client: EnvoyClient, cache: Cache) -> int:
    """Send queued reports oldest first in bounded batches; delete what was acknowledged.
    Returns how many were acknowledged. Stops when the queue is empty or a batch acks nothing."""
    envoy_id = cache.envoy_id
    total = 0
    while True:
        batch = cache.pending(limit=FLUSH_MAX_REPORTS, max_bytes=FLUSH_MAX_BYTES)
        if not batch:
            return total
        reports = [_as_sent(report, envoy_id) for report in batch]
        set_aside = 0
        try:
            acked = await client.send_results(envoy_id, reports)
        except (ServerError, ProtocolError) as exc:
            if isinstance(exc, UnavailableError) or exc.code not in _REPORT_REFUSALS:
                raise

            async def quarantine(run_id: str, reason: str) -> None:
                cache.quarantine_run(run_id, reason)

            acked, set_aside = await _send_one_by_one(client, envoy_id, reports, quarantine)
        removed = cache.ack(acked)
        total += removed
        log.info("flushed %d report(s) to %s (%d acknowledged)", len(reports), client.server, removed)
        if removed == 0 and set_aside == 0:
            return total


async def _send_one_by_one(client: EnvoyClient, envoy_id: str, reports: list[dict[str, Any]],
                           quarantine: Callable[[str, str], Awaitable[None]]) -> tuple[list[str], int]:
    """A batch was refused for its content: send each report alone, and move aside the ones
    refused alone (kept in the quarantine, never sent again) so they cannot block the queue.
    ``quarantine(run_id, reason)`` does the moving, wherever the caller keeps its cache.
    Returns the acknowledged ids and how many reports were set aside (both are progress)."""
    acked: list[str] = []
    set_aside = 0
    for report in reports:
        run_id = str(report["run_id"])
        try:
            acked += await client.send_results(envoy_id, [report])
        except (ServerError, ProtocolError) as exc:
            if isinstance(exc, UnavailableError) or exc.code not in _REPORT_REFUSALS:
                raise
            reason = f"refused by {client.server}: {exc.code}: {exc.reason}"
            log.error("report %s %s; moved to the quarantine", run_id, reason)
            await quarantine(run_id, reason)
            set_aside += 1
    return acked, set_aside


def record_flush(cache: Cache, server: str, acked: int) -> None:
    """Remember the last flush that ended without an error (meta ``last_flush``)."""
    cache.set_meta("last_flush", {"at": time.time(), "server": server, "acked": acked,
                                  "queued": cache.queue_stats().runs})


# --- the paced flush (daemon, and the benchmarks' in-process envoys) ---------------------------

#: ``await call(fn)`` runs ``fn(cache)`` wherever the caller keeps its cache (the daemon: on
#: the one thread that owns it) and returns the result.
CacheCall = Callable[[Callable[[Cache], Any]], Awaitable[Any]]


@dataclass
class FlushStats:
    """What one paced flush did."""

    acked: int = 0
    batches: int = 0
    retried: int = 0  # answers with retry_after_s that were honoured
    waited_s: float = 0.0  # time spent pausing and honouring retry-after
    drained: bool = False  # the queue was empty when it ended
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


async def flush_paced(
    client: EnvoyClient,
    call: CacheCall,
    *,
    rng: random.Random,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FlushStats:
    """Send the queue oldest first, paced by the rule in ``vigo.agent.backoff`` (one batch in
    flight, a pause after each batch derived from the server's answer time and the batch's
    size, ``retry_after_s`` honoured with jitter on top); delete only acknowledged run ids.

    Returns when the queue is empty, when ``stop`` is set, or when a batch acknowledged
    nothing. Raises UnavailableError when the connection is gone (the caller reconnects) and
    ServerError for a refusal that is not about one report's content.
    """
    stats = FlushStats()
    envoy_id = await call(lambda c: c.envoy_id)
    retry = Backoff(FLUSH_RETRY_BASE_S, FLUSH_RETRY_CAP_S, rng=rng, clock=clock)
    while stop is None or not stop.is_set():
        batch = await call(lambda c: c.pending(limit=FLUSH_MAX_REPORTS, max_bytes=FLUSH_MAX_BYTES))
        if not batch:
            stats.drained = True
            return stats
        reports = [_as_sent(report, envoy_id) for report in batch]
        log.info("sending %d queued report(s) to %s", len(reports), client.server)
        started = clock()
        set_aside = 0
        try:
            acked = await client.send_results(envoy_id, reports)
        except UnavailableError as exc:
            stats.errors[exc.code] += 1
            if exc.retry_after_s is None:
                raise  # no answer at all: the connection is gone or useless
            wait = retry.delay(exc.retry_after_s)
            stats.retried += 1
            stats.waited_s += wait
            log.info("%s answered %s for a batch of %d report(s): retrying in %.2f s (asked %.2f s)",
                     client.server, exc.code, len(reports), wait, exc.retry_after_s)
            await _nap(wait, stop)
            continue
        except (ServerError, ProtocolError) as exc:
            stats.errors[exc.code] += 1
            if exc.code not in _REPORT_REFUSALS:
                raise
            async def quarantine(run_id: str, reason: str) -> None:
                await call(lambda c: c.quarantine_run(run_id, reason))

            acked, set_aside = await _send_one_by_one(client, envoy_id, reports, quarantine)
        answer_s = clock() - started
        retry.reset()
        acked_ids = list(acked)
        removed = await call(lambda c, ids=acked_ids: c.ack(ids))
        stats.acked += removed
        stats.batches += 1
        log.info("flushed %d report(s) to %s in %.3f s (%d acknowledged)", len(reports), client.server,
                 answer_s, removed)
        if removed == 0 and set_aside == 0:
            return stats
        pause = flush_pause(answer_s, len(reports), FLUSH_MAX_REPORTS)
        if pause > 0:
            stats.waited_s += pause
            await _nap(pause, stop)
    return stats


async def _nap(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep, waking early when ``stop`` is set."""
    if seconds <= 0:
        return
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


def _as_sent(report: dict[str, Any], envoy_id: str) -> dict[str, Any]:
    queued_as = report.get("envoy_id")
    if queued_as in (None, "", envoy_id):
        return report
    return {**report, "envoy_id": envoy_id, "queued_as": queued_as}


def _revoked_text(envoy_id: str, record: dict[str, Any]) -> str:
    return (
        f"this envoy ({envoy_id}) was revoked by the fleet (server {record.get('server')} at "
        f"{_iso(record.get('at'))}: {record.get('reason')}); nothing was converged and the cached bundle "
        "is no longer enforced. Run `vigo-envoy join` with a new token to be managed again"
    )


def _iso(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

