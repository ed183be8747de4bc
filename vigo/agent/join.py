"""This envoy's certificate from its fleet: `vigo-envoy join` (first contact) and renewal.

    join_fleet          TLS *without* verification (the envoy does not know the CA yet),
                        ``join``, then the check: the certificate the gateway presented on that
                        very connection must be signed by the CA it sent (and that CA must have
                        the pinned fingerprint, if one was given). Only then are key,
                        certificate, CA, servers and bundle key stored.
    check_gateway_cert  that check, on its own (tests, and whoever wants to pin).
    try_renew           renewal over the authenticated connection once less than a third of the
                        certificate's lifetime is left (``vigo.agent.identity``): a fresh key,
                        ``renew``, the answer checked, the pair installed crash-safe. Never fails
                        the caller's run: a failed renewal is logged and tried again on the next
                        run (the current certificate is still valid). ``run --once`` renews after
                        its flush; the daemon in the background after each check-in.

Every connection after the join is mutual TLS against the CA stored here
(``vigo.agent.session``); the key and certificate files are ``vigo.agent.identity``.

This module is imported by the envoy: standard library, msgpack and cryptography only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from vigo.agent import identity, runner, traits
from vigo.agent.enrolment import make_envoy_key_and_csr
from vigo.agent.transport import EnvoyClient, parse_server
from vigo.crypto.tls import unverified_client_context
from vigo.errors import AdmissionError, ConfigError, ProtocolError, ServerError, TransportError
from vigo.timefmt import iso

log = logging.getLogger("vigo.agent.join")

_HEX64 = re.compile(r"[0-9a-f]{64}")


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
        # Encrypted, not yet authenticated: the envoy does not know the CA yet (checked after join_ok).
        async with await EnvoyClient.connect(servers, unverified_client_context()) as client:
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
                "gateways": None,  # a list learned from a fleet before this join is not this fleet's
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


# --- renewal --------------------------------------------------------------------------------------


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
    except (ServerError, TransportError, ProtocolError, AdmissionError, OSError, ValueError) as exc:
        log.warning("certificate renewal via %s failed (%s): %s; the current certificate stays in use (valid until "
                    "%s) and a later run tries again", client.server,
                    exc.code if isinstance(exc, (ServerError, TransportError, ProtocolError)) else type(exc).__name__,
                    getattr(exc, "reason", exc), iso(current.not_after))
        return None
    except Exception:  # a bug: logged with its traceback, and still never the run's end
        log.exception("certificate renewal via %s failed unexpectedly; the current certificate stays in use",
                      client.server)
        return None
    log.info("certificate renewed via %s: serial %x valid until %s (the previous one, serial %x, stays valid "
             "until %s)", client.server, new.serial, iso(new.not_after), current.serial, iso(current.not_after))
    return new.not_after


def _install_renewed(state_dir: Path, key_pem: bytes, cert_pem: bytes, ca_pem: bytes,
                     envoy_id: str) -> identity.Identity:
    """Check what the server sent (it replaces a working pair only if it is right), install it."""
    identity.check_issued(identity.pair(key_pem, bytes(cert_pem), ca_pem), ca_pem, envoy_id)
    return identity.install(state_dir, key_pem, bytes(cert_pem))
