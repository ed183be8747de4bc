"""The envoy's identity on disk (key, certificate, fleet CA), and when to renew it.

    STATE_DIR/envoy.key        the private key (0600), made on this host, never sent anywhere
    STATE_DIR/envoy.pem        its certificate, signed by the fleet CA
    STATE_DIR/ca.pem           the fleet CA (verifies gateways)
    STATE_DIR/envoy.next.key   a new pair on its way in: present only for the instant of an
    STATE_DIR/envoy.next.pem   install, or after a crash during one
    STATE_DIR/identity.lock    flock held by writers (join, renewal); readers never take it

**The pair.** A key and its certificate are two files, and no rename replaces two files at
once; a crash between two renames must not leave a certificate beside a key it does not belong
to (every connection would fail, and only a new join would fix it). So a new pair is installed
like a tiny journal (``install``, under ``identity.lock``):

1. write ``envoy.next.key``, then ``envoy.next.pem`` (each to a temp name, fsynced, renamed);
2. rename ``envoy.next.key`` over ``envoy.key``, then ``envoy.next.pem`` over ``envoy.pem``.

A reader (``load``) takes the first of these pairs whose certificate carries the key's public
key: (``envoy.next.key``, ``envoy.next.pem``), (``envoy.key``, ``envoy.next.pem``),
(``envoy.key``, ``envoy.pem``). Whatever instant a crash hits, one of them is a matching pair,
and the newest one that is complete wins: before step 1 ends, the old pair; between the two
renames of step 2, the new key with ``envoy.next.pem``. Reading the files in the order the
writer consumes them (next key, next cert, key, cert) makes this hold for a reader racing a
live writer too. The next ``install`` first finishes what a crash left (``settle``).

Nothing here talks to the network; ``vigo.agent.join`` asks for the certificate.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from vigo.durable import atomic_write, exclusive_lock, fsync_path, replace_durably
from vigo.errors import AdmissionError
from vigo.timefmt import iso

KEY_FILE = "envoy.key"
CERT_FILE = "envoy.pem"
CA_FILE = "ca.pem"
NEXT_KEY_FILE = "envoy.next.key"
NEXT_CERT_FILE = "envoy.next.pem"
LOCK_FILE = "identity.lock"

#: Renew once less than this fraction of the certificate's lifetime (not_after - not_before)
#: is left. With the default 30-day certificate that is day 20: ten days in which an envoy
#: that is offline, or a server that is down, can still renew before anything lapses (far
#: longer than an outage the fleet is built to ride out), while a healthy envoy renews only
#: every 20 days (one signature and one row on the server each time). It is the point
#: cert-manager renews at by default, for the same reasons.
RENEW_WHEN_REMAINING_FRACTION = 1 / 3

#: A reader that races a writer re-reads this many times before calling the pair broken.
_READ_ATTEMPTS = 3


@dataclass(frozen=True)
class Identity:
    """A matching key and certificate, the fleet CA, and what the certificate says."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    serial: int
    not_before: float  # unix seconds
    not_after: float  # unix seconds
    subject: str  # the certificate's CommonName: the envoy id the CA wrote

    @property
    def lifetime_s(self) -> float:
        return self.not_after - self.not_before

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.not_after

    def renew_after(self) -> float:
        """When renewal becomes due (see ``renewal_due``)."""
        return self.not_after - self.lifetime_s * RENEW_WHEN_REMAINING_FRACTION

    def renewal_due(self, now: float | None = None) -> bool:
        return renewal_due(self.not_before, self.not_after, time.time() if now is None else now)


def renewal_due(not_before: float, not_after: float, now: float) -> bool:
    """Whether a certificate valid from ``not_before`` to ``not_after`` should be renewed at
    ``now``: less than ``RENEW_WHEN_REMAINING_FRACTION`` of its lifetime left (also true once
    expired, and for a certificate whose dates make no sense)."""
    lifetime = not_after - not_before
    if lifetime <= 0:
        return True
    return not_after - now < lifetime * RENEW_WHEN_REMAINING_FRACTION


def joined(state_dir: Path) -> bool:
    """Whether the state dir holds an identity at all (a certificate and the CA)."""
    return (state_dir / CA_FILE).is_file() and (
        (state_dir / CERT_FILE).is_file() or (state_dir / NEXT_CERT_FILE).is_file()
    )


def load(state_dir: Path) -> Identity:
    """The newest complete key/certificate pair in ``state_dir`` (see the module doc).

    AdmissionError when there is none: not joined (files missing), or no key matches any
    certificate (a damaged state dir: only a new join helps, and the message says so)."""
    ca_path = state_dir / CA_FILE
    if not ca_path.is_file() or not joined(state_dir) or not _any_key(state_dir):
        missing = [name for name in (CA_FILE, CERT_FILE, KEY_FILE) if not (state_dir / name).is_file()]
        raise AdmissionError(
            f"not joined: {state_dir} has no {', '.join(missing) or 'identity'}; run `vigo-envoy join "
            f"--server HOST:PORT --token TOKEN --state-dir {state_dir}` first"
        )
    try:
        ca_pem = ca_path.read_bytes()
        for attempt in range(_READ_ATTEMPTS):
            files = {name: _read(state_dir / name) for name in (NEXT_KEY_FILE, NEXT_CERT_FILE, KEY_FILE, CERT_FILE)}
            for key_name, cert_name in _CANDIDATES:
                found = _pair(ca_pem, files[key_name], files[cert_name])
                if found is not None:
                    return found
            if attempt + 1 < _READ_ATTEMPTS:
                time.sleep(0.05)  # a writer between two renames of a second install: look again
    except OSError as exc:
        raise AdmissionError(f"cannot read this envoy's credentials in {state_dir}: {exc.strerror or exc}") from exc
    raise AdmissionError(
        f"this envoy's key ({state_dir / KEY_FILE}) does not belong to its certificate "
        f"({state_dir / CERT_FILE}), or one of them does not parse; the state dir is damaged: run "
        f"`vigo-envoy join --server HOST:PORT --token TOKEN --state-dir {state_dir}` with a new token"
    )


#: Pairs a reader tries, newest first (the order the writer makes them complete).
_CANDIDATES = ((NEXT_KEY_FILE, NEXT_CERT_FILE), (KEY_FILE, NEXT_CERT_FILE), (KEY_FILE, CERT_FILE))


def install(state_dir: Path, key_pem: bytes, cert_pem: bytes, *, ca_pem: bytes | None = None) -> Identity:
    """Make ``key_pem``/``cert_pem`` this envoy's pair (and ``ca_pem`` its CA, when given: a
    join). Checks the pair matches first (AdmissionError, nothing written, if not); safe
    against a crash at any instant (module doc). Returns the installed identity."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _writer_lock(state_dir):
        settle(state_dir)
        ca = bytes(ca_pem) if ca_pem is not None else (state_dir / CA_FILE).read_bytes()
        identity = _pair(ca, bytes(key_pem), bytes(cert_pem))
        if identity is None:
            raise AdmissionError("refusing to store a certificate that does not carry this envoy's new key")
        if ca_pem is not None:
            _write_atomic(state_dir / CA_FILE, ca, 0o644)
        _write_atomic(state_dir / NEXT_KEY_FILE, identity.key_pem, 0o600)
        _write_atomic(state_dir / NEXT_CERT_FILE, identity.cert_pem, 0o644)
        _commit(state_dir, with_key=True)
        return identity


def settle(state_dir: Path) -> None:
    """Finish an install a crash interrupted, or drop its leftovers. Call under the lock."""
    for tmp in state_dir.glob(".envoy.*.tmp"):  # a write a crash cut short (maybe a private key)
        tmp.unlink(missing_ok=True)
    next_key, next_cert = state_dir / NEXT_KEY_FILE, state_dir / NEXT_CERT_FILE
    if not next_cert.exists():
        next_key.unlink(missing_ok=True)  # step 1 never finished: the old pair stands
        return
    cert = _read(next_cert)
    if _pair(b"", _read(next_key), cert) is not None:  # step 1 done: do step 2
        _commit(state_dir, with_key=True)
    elif _pair(b"", _read(state_dir / KEY_FILE), cert) is not None:  # between the renames of step 2
        next_key.unlink(missing_ok=True)
        _commit(state_dir, with_key=False)
    else:  # a certificate for no key this host has: never usable
        next_cert.unlink(missing_ok=True)
        next_key.unlink(missing_ok=True)
        fsync_path(state_dir)


def _commit(state_dir: Path, *, with_key: bool) -> None:
    """Step 2: the key first, then the certificate (``load`` relies on that order), each
    rename durable before the next."""
    if with_key:
        replace_durably(state_dir / NEXT_KEY_FILE, state_dir / KEY_FILE)
    replace_durably(state_dir / NEXT_CERT_FILE, state_dir / CERT_FILE)


def pair(key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> Identity:
    """The identity of a key and its certificate; AdmissionError if they do not belong together."""
    found = _pair(ca_pem, key_pem, cert_pem)
    if found is None:
        raise AdmissionError("the certificate does not carry this envoy's key (or does not parse)")
    return found


def check_issued(identity: Identity, ca_pem: bytes, envoy_id: str, *, now: float | None = None) -> None:
    """AdmissionError unless ``identity``'s certificate was signed by the fleet CA for
    ``envoy_id`` and is valid now: what a renewal answer must be before it replaces a working
    pair."""
    cert = x509.load_pem_x509_certificate(identity.cert_pem)
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise AdmissionError(f"the renewed certificate is not signed by the fleet CA this envoy trusts: {exc}") from exc
    if identity.subject != envoy_id:
        raise AdmissionError(f"the renewed certificate names envoy {identity.subject!r}, not {envoy_id!r}")
    if identity.expired(now):
        raise AdmissionError(f"the renewed certificate is already expired (at {iso(identity.not_after)})")


# --- helpers ------------------------------------------------------------------------------


def _pair(ca_pem: bytes, key_pem: bytes | None, cert_pem: bytes | None) -> Identity | None:
    """The identity if ``key_pem`` is the private half of ``cert_pem``'s public key."""
    if not key_pem or not cert_pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
        if _spki(key.public_key()) != _spki(cert.public_key()):
            return None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return Identity(
        ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, serial=cert.serial_number,
        not_before=cert.not_valid_before_utc.timestamp(), not_after=cert.not_valid_after_utc.timestamp(),
        subject=str(names[0].value) if names else "",
    )


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _any_key(state_dir: Path) -> bool:
    return (state_dir / KEY_FILE).is_file() or (state_dir / NEXT_KEY_FILE).is_file()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _writer_lock(state_dir: Path) -> Iterator[None]:
    """Writers one at a time (a daemon's renewal and a `run --once` renewal, say). Held for
    file writes only (milliseconds), never across the network, so waiting for it is fine."""
    with exclusive_lock(state_dir / LOCK_FILE):
        yield


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Written to a temp file created with ``mode`` from its first byte, fsynced, renamed over,
    the directory fsynced; the temp name is one ``settle`` sweeps after a crash."""
    atomic_write(path, data, mode=mode, tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp"))
