"""Admission: the fleet CA, join tokens, revocation, and the gateway's TLS context.

An envoy joins once with a join token and a CSR; the fleet CA signs a short-lived client
certificate for it, and from then on every gateway connection is mutual TLS. All of it is pure:
records in, records out. The caller stores them (and decrements token uses atomically).

    join token ──check_token──▶ FleetCA.sign_envoy_csr ──▶ IssuedCert ──▶ envoy
    TLS peer cert ──envoy_id_from_cert / cert_serial──▶ RevocationSet.check
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import re
import secrets
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vigo.crypto.tls import load_ca_pem, load_cert_chain_pem
from vigo.errors import AdmissionError, ConfigError, RevokedError, TokenError, clipped_repr
from vigo.timefmt import iso

# Envoy certificates are short so a stolen one stops working on its own, without relying on
# every gateway having seen the revocation; envoys renew well before this runs out.
ENVOY_CERT_LIFETIME_S = 30 * 24 * 3600
# Gateway certificates are re-issued by an operator action (or a deploy), so a year is a
# compromise between rotation hygiene and not paging anyone.
SERVER_CERT_LIFETIME_S = 365 * 24 * 3600
# The CA is the trust root pinned on every envoy; replacing it means re-enrolling the fleet.
CA_LIFETIME_S = 10 * 365 * 24 * 3600
# Certificates start this much in the past, so an envoy whose clock is a little behind the
# server's does not reject its fresh certificate as "not yet valid".
CLOCK_SKEW_S = 5 * 60

# A join token is a bootstrap secret: valid for a day and for one host unless asked otherwise.
TOKEN_TTL_S = 24 * 3600
TOKEN_USES = 1
# Upper bounds an operator can ask for; beyond them a "token" is a standing credential.
TOKEN_TTL_MAX_S = 30 * 24 * 3600
TOKEN_USES_MAX = 10_000
# 256 bits of randomness: unguessable, so a plain SHA-256 is enough to store it (see hash_token).
TOKEN_BYTES = 32
TOKEN_PREFIX = "vigo_"  # lets secret scanners and humans recognise a leaked token
TOKEN_ID_BYTES = 4  # the short id operators see and revoke by; not a secret

ENVOY_URI_PREFIX = "vigo:envoy:"
ENVOY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # 64 = X.509 CommonName limit
MIN_RSA_BITS = 2048
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


# --- the fleet CA -------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: bytes
    serial: int
    not_after: float  # unix seconds


@dataclass
class FleetCA:
    """The CA that signs gateway and envoy certificates.

    Its key is ECDSA P-256: small certificates and fast handshakes, and every OpenSSL the ssl
    module links against verifies it. Ed25519 would be smaller still, but TLS stacks do not
    reliably accept Ed25519 certificate chains, and a CA that some envoy cannot verify is worse
    than a slightly bigger signature.
    """

    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    _key: ec.EllipticCurvePrivateKey = field(init=False, repr=False, compare=False)
    _cert: x509.Certificate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
            cert = x509.load_pem_x509_certificate(self.cert_pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise AdmissionError(
                f"cannot load fleet CA: expected an unencrypted PEM EC private key and its PEM "
                f"certificate: {exc}"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AdmissionError(
                f"cannot load fleet CA: expected an EC private key, got {type(key).__name__}"
            )
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise AdmissionError(
                "cannot load fleet CA: the private key does not match the certificate"
            )
        self._key = key
        self._cert = cert

    @classmethod
    def generate(
        cls, name: str = "vigo fleet CA", *, now: float | None = None,
        lifetime_s: int = CA_LIFETIME_S,
    ) -> FleetCA:
        now = time.time() if now is None else now
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name, "CA name")
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - CLOCK_SKEW_S))
            .not_valid_after(_utc(now + lifetime_s))
            # path_length=0: this CA signs leaf certificates only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(key_pem=key_pem, cert_pem=cert.public_bytes(serialization.Encoding.PEM))

    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, hex: what an operator pins when enrolling an envoy."""
        return self._cert.fingerprint(hashes.SHA256()).hex()

    def issue_server_cert(
        self, hostnames: list[str], ips: list[str], *, now: float | None = None,
        lifetime_s: int = SERVER_CERT_LIFETIME_S,
    ) -> tuple[bytes, bytes]:
        """A new gateway key and certificate, ``(key_pem, cert_pem)``, valid for exactly the
        given DNS names and IP addresses (pass ``localhost``/``127.0.0.1`` to include them)."""
        if not hostnames and not ips:
            raise AdmissionError(
                "cannot issue server certificate: expected at least one hostname or IP "
                "address, got none"
            )
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        for ip in ips:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError as exc:
                raise AdmissionError(
                    f"cannot issue server certificate: expected an IP address, got {clipped_repr(ip)}"
                ) from exc
        key = ec.generate_private_key(ec.SECP256R1())
        cn = hostnames[0] if hostnames else ips[0]
        cert = self._leaf(
            _name(cn, "server name"), key.public_key(), names, ExtendedKeyUsageOID.SERVER_AUTH,
            now=now, lifetime_s=lifetime_s,
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)

    def sign_envoy_csr(
        self, csr_pem: bytes, envoy_id: str, *, now: float | None = None,
        lifetime_s: int = ENVOY_CERT_LIFETIME_S,
    ) -> IssuedCert:
        """Sign an envoy's CSR as a client certificate for ``envoy_id``.

        Only the CSR's public key is used (after checking the CSR was signed with it). Its
        subject and extensions are ignored: the CA decides the name (CN and a SAN URI
        ``vigo:envoy:<id>``), the usage (client auth only) and that it is not a CA.
        """
        if not isinstance(envoy_id, str) or not ENVOY_ID_RE.fullmatch(envoy_id):
            raise AdmissionError(
                f"cannot issue envoy certificate: expected an envoy id of 1-64 letters, digits, "
                f"'.', '_' or '-' (starting with a letter or digit), got {clipped_repr(envoy_id)}"
            )
        csr = _load_csr(csr_pem)
        try:
            signed = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
            raise AdmissionError(
                f"cannot verify certificate request for {envoy_id!r}: {exc}"
            ) from exc
        if not signed:
            raise AdmissionError(
                f"certificate request for {envoy_id!r} is not signed by its own key "
                "(altered in transit, or built wrongly)"
            )
        _check_key(public_key, envoy_id)
        cert = self._leaf(
            _name(envoy_id, "envoy id"), public_key,
            [x509.UniformResourceIdentifier(ENVOY_URI_PREFIX + envoy_id)],
            ExtendedKeyUsageOID.CLIENT_AUTH, now=now, lifetime_s=lifetime_s,
        )
        return IssuedCert(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc.timestamp(),
        )

    def _leaf(
        self, subject: x509.Name, public_key: Any, names: list[x509.GeneralName],
        usage: x509.ObjectIdentifier, *, now: float | None, lifetime_s: int,
    ) -> x509.Certificate:
        now = time.time() if now is None else now
        # Never outlive the CA: a chain with an expired root fails anyway, and confusingly.
        not_after = min(_utc(now + lifetime_s), self._cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - CLOCK_SKEW_S))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    # RSA keys may do TLS 1.2 RSA key exchange; harmless to allow, needed for it.
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )


def envoy_id_from_cert(cert: bytes) -> str:
    """The envoy id a certificate (PEM or DER, e.g. ``getpeercert(binary_form=True)``) was
    issued for. Does not verify the chain: call it on a certificate the TLS layer verified."""
    parsed = _load_cert(cert)
    cns = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise AdmissionError(
            f"certificate serial {parsed.serial_number:x} is not a vigo envoy certificate: "
            f"expected one CommonName, got {len(cns)}"
        )
    envoy_id = str(cns[0].value)
    # The SAN URI must agree, so a certificate this CA issued for something else (a gateway
    # named like an envoy) never passes as that envoy.
    try:
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if ENVOY_URI_PREFIX + envoy_id not in uris:
        raise AdmissionError(
            f"certificate for {envoy_id!r} is not a vigo envoy certificate: expected SAN URI "
            f"{ENVOY_URI_PREFIX}{envoy_id}, got {uris or 'none'}"
        )
    return envoy_id


def cert_serial(cert: bytes) -> int:
    """The serial number of a PEM or DER certificate."""
    return _load_cert(cert).serial_number


def cert_validity(cert: bytes) -> tuple[float, float]:
    """``(not_before, not_after)`` of a PEM or DER certificate, unix seconds."""
    parsed = _load_cert(cert)
    return parsed.not_valid_before_utc.timestamp(), parsed.not_valid_after_utc.timestamp()


def cert_key_sha256(cert: bytes) -> str:
    """SHA-256 hex of a PEM or DER certificate's public key (DER SubjectPublicKeyInfo)."""
    return hashlib.sha256(_spki(_load_cert(cert).public_key())).hexdigest()


def csr_key_sha256(csr_pem: bytes) -> str:
    """SHA-256 hex of a PEM CSR's public key, comparable with ``cert_key_sha256``."""
    try:
        key = _load_csr(csr_pem).public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AdmissionError(f"cannot read the certificate request's public key: {exc}") from exc
    return hashlib.sha256(_spki(key)).hexdigest()


# --- join tokens --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRecord:
    """What the server stores for a join token: never the token itself, only its hash.

    ``uses_left`` is decremented by the caller with a compare-and-set in the store, so two
    envoys joining at once cannot both spend a token's last use.
    """

    id: str  # short, random, shown to operators; not secret
    hash: str  # sha256 hex of the token string
    created_at: float  # unix seconds
    expires_at: float  # unix seconds
    uses_left: int
    note: str = ""
    uses_allowed: int | None = None  # how many uses it was created with; defaults to uses_left

    def __post_init__(self) -> None:
        if self.uses_allowed is None:
            object.__setattr__(self, "uses_allowed", self.uses_left)

    def matches(self, token: str) -> bool:
        """True if ``token`` is the one this record was made for (constant-time compare)."""
        return hmac.compare_digest(hash_token(token), self.hash)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenRecord:
        return cls(**data)


def new_token() -> tuple[str, str]:
    """A fresh join token and its hash: ``("vigo_<43 url-safe chars>", "<sha256 hex>")``."""
    raw = secrets.token_bytes(TOKEN_BYTES)
    token = TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    return token, hash_token(token)


def hash_token(token: str) -> str:
    """SHA-256 hex of the token string.

    No salt and no slow hash on purpose: those defend guessable secrets (passwords) against
    dictionaries and precomputed tables. A token is 256 uniformly random bits, so neither attack
    exists, and an unsalted hash lets the store find a record by its hash with an index lookup.
    """
    if not isinstance(token, str):
        raise TokenError(f"join token must be a string, got {type(token).__name__}")
    return hashlib.sha256(token.encode("utf-8", errors="surrogatepass")).hexdigest()


def issue_token(
    *, now: float, ttl_s: float = TOKEN_TTL_S, uses: int = TOKEN_USES, note: str = ""
) -> tuple[str, TokenRecord]:
    """A new token (shown to the operator once) and the record to store for it."""
    if not 0 < ttl_s <= TOKEN_TTL_MAX_S:
        raise ConfigError(
            f"join token lifetime must be between 1 s and {TOKEN_TTL_MAX_S} s (30 days), "
            f"got {ttl_s}"
        )
    if not 1 <= uses <= TOKEN_USES_MAX:
        raise ConfigError(f"join token uses must be between 1 and {TOKEN_USES_MAX}, got {uses}")
    token, token_hash = new_token()
    record = TokenRecord(
        id=secrets.token_hex(TOKEN_ID_BYTES), hash=token_hash, created_at=now,
        expires_at=now + ttl_s, uses_left=uses, note=note,
    )
    return token, record


def check_token(record: TokenRecord | None, *, now: float, token: str | None = None) -> None:
    """Raise TokenError unless ``record`` admits one more join at ``now``.

    ``record`` is what the store found for the token's hash (None: nothing). Pass ``token`` too
    when the record was found some other way, and it is compared in constant time.
    """
    if record is None or (token is not None and not record.matches(token)):
        raise TokenError("join token not recognised")
    if now >= record.expires_at:
        raise TokenError(f"join token expired at {iso(record.expires_at, utc='+00:00')}")
    if record.uses_left <= 0:
        raise TokenError(f"join token has no uses left (it allowed {record.uses_allowed})")


def spend_token(record: TokenRecord | None, *, now: float, token: str | None = None) -> TokenRecord:
    """Check the token and return its record with one use fewer, for the caller to store."""
    check_token(record, now=now, token=token)
    assert record is not None
    return dataclasses.replace(record, uses_left=record.uses_left - 1)


# --- revocation ---------------------------------------------------------------------------


class RevocationSet:
    """Revoked envoys and certificate serials, held in memory by every gateway.

    Grow-only: entries are never removed, so merging two copies (from two gateways, or the
    store and a gateway) is a plain union and cannot un-revoke anything. An envoy revoked by id
    loses every certificate it has, including ones issued before or after the revocation.
    """

    def __init__(self, entries: Iterable[tuple[str, int | None]] = ()) -> None:
        self._envoys: set[str] = set()
        self._serials: set[int] = set()
        self._entries: set[tuple[str, int | None]] = set()
        for envoy_id, serial in entries:
            self.revoke(envoy_id, serial)

    def revoke(self, envoy_id: str, serial: int | None = None) -> None:
        self._envoys.add(envoy_id)
        if serial is not None:
            self._serials.add(serial)
        self._entries.add((envoy_id, serial))

    def is_revoked(self, envoy_id: str | None = None, serial: int | None = None) -> bool:
        return (envoy_id is not None and envoy_id in self._envoys) or (
            serial is not None and serial in self._serials
        )

    def check(self, envoy_id: str, serial: int) -> None:
        """Raise RevokedError if the envoy or this certificate of it was revoked."""
        if envoy_id in self._envoys:
            raise RevokedError(f"envoy {envoy_id!r} was revoked; it must be admitted again")
        if serial in self._serials:
            raise RevokedError(
                f"certificate serial {serial:x} of envoy {envoy_id!r} was revoked"
            )

    def merge(self, other: RevocationSet) -> None:
        for envoy_id, serial in other._entries:
            self.revoke(envoy_id, serial)

    def __len__(self) -> int:
        return len(self._entries)

    def to_list(self) -> list[dict[str, str | None]]:
        """Plain dicts for storage. Serials are hex strings: X.509 serials run to 159 bits,
        more than JSON or msgpack integers carry safely."""
        return [
            {"envoy_id": envoy_id, "serial": None if serial is None else format(serial, "x")}
            for envoy_id, serial in sorted(self._entries, key=lambda e: (e[0], e[1] or 0))
        ]

    @classmethod
    def from_list(cls, items: Iterable[dict[str, Any]]) -> RevocationSet:
        result = cls()
        for index, item in enumerate(items):
            try:
                envoy_id = item["envoy_id"]
                serial = item.get("serial")
                if not isinstance(envoy_id, str):
                    raise TypeError("envoy_id is not a string")
                if isinstance(serial, str):
                    serial = int(serial, 16)
                elif serial is not None and (type(serial) is not int):
                    raise TypeError("serial is not a hex string")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise AdmissionError(
                    f"cannot read revocation entry #{index}: expected "
                    f"{{'envoy_id': str, 'serial': hex str or None}}, got {clipped_repr(item)}"
                ) from exc
            result.revoke(envoy_id, serial)
        return result


# --- TLS ----------------------------------------------------------------------------------


def tls_server_context(
    cert_pem: bytes, key_pem: bytes, ca_pem: bytes, *, require_client_cert: bool
) -> ssl.SSLContext:
    """A TLS 1.2+ server context for the gateway.

    The gateway uses ``require_client_cert=False`` (``CERT_OPTIONAL``): an envoy that is not yet
    admitted has no certificate but must reach ``join``. A certificate that *is* presented is
    still verified against the fleet CA (a foreign or expired one fails the handshake), and the
    gateway checks per message that one was presented where the message needs it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_cert_chain_pem(ctx, cert_pem, key_pem)
    load_ca_pem(ctx, ca_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


# --- helpers ------------------------------------------------------------------------------


def _load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AdmissionError(
            "cannot read certificate request: expected a PEM CSR "
            f"(-----BEGIN CERTIFICATE REQUEST-----), got {clipped_repr(csr_pem, 60)}"
        ) from exc


def _load_cert(data: bytes) -> x509.Certificate:
    try:
        if isinstance(data, bytes | bytearray) and bytes(data).lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(bytes(data))
        return x509.load_der_x509_certificate(bytes(data))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AdmissionError(
            f"cannot read certificate: expected PEM or DER X.509, got {clipped_repr(data, 60)}"
        ) from exc


def _check_key(key: Any, envoy_id: str) -> None:
    expected = f"EC P-256/P-384, Ed25519 or RSA of at least {MIN_RSA_BITS} bits"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ACCEPTED_CURVES):
            return
        got = f"EC {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= MIN_RSA_BITS:
            return
        got = f"RSA {key.key_size}-bit"
    else:
        got = type(key).__name__
    raise AdmissionError(
        f"refusing certificate request for {envoy_id!r}: its key is {got}, expected {expected}"
    )


def _name(common_name: str, what: str) -> x509.Name:
    try:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    except ValueError as exc:
        raise AdmissionError(
            f"cannot use {what} {clipped_repr(common_name)}: expected 1-64 characters"
        ) from exc


def _spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _utc(unix_s: float) -> datetime:
    # Certificates carry whole seconds; truncating here keeps IssuedCert.not_after exact.
    return datetime.fromtimestamp(int(unix_s), tz=UTC)
