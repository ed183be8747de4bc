"""Admissions: the fleet CA, CSRs, join tokens, revocation, and real TLS handshakes on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vigo.agent.enrolment import make_envoy_key_and_csr, tls_client_context
from vigo.errors import AdmissionError, ConfigError, RevokedError, TokenError
from vigo.server import admissions as adm
from vigo.server.admissions import FleetCA, RevocationSet, TokenRecord

NOW = 1_750_000_000.0  # a fixed clock: 2025-06-15T15:06:40Z


@pytest.fixture(scope="module")
def ca() -> FleetCA:
    return FleetCA.generate()


@pytest.fixture(scope="module")
def other_ca() -> FleetCA:
    return FleetCA.generate("someone else's CA")


@pytest.fixture(scope="module")
def server_tls(ca):
    return ca.issue_server_cert(["localhost"], ["127.0.0.1"])  # (key_pem, cert_pem)


@pytest.fixture(scope="module")
def envoy(ca):
    key_pem, csr_pem = make_envoy_key_and_csr("web-01.example.net")
    return key_pem, ca.sign_envoy_csr(csr_pem, "env-7f3a")


def _csr(key, cn="host", extensions=(), algorithm=None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


# --- the fleet CA -------------------------------------------------------------------------


def test_generated_ca_is_a_p256_ca_and_reloads(ca):
    cert = _cert(ca.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    der = cert.public_bytes(serialization.Encoding.DER)
    assert ca.fingerprint() == hashlib.sha256(der).hexdigest()
    again = FleetCA(key_pem=ca.key_pem, cert_pem=ca.cert_pem)
    assert again.fingerprint() == ca.fingerprint()
    assert b"PRIVATE" not in repr(ca).encode() and "key_pem" not in repr(ca)


def test_ca_with_someone_elses_key_is_refused(ca, other_ca):
    with pytest.raises(AdmissionError, match="does not match"):
        FleetCA(key_pem=other_ca.key_pem, cert_pem=ca.cert_pem)
    with pytest.raises(AdmissionError, match="cannot load fleet CA"):
        FleetCA(key_pem=b"nope", cert_pem=ca.cert_pem)


def test_server_cert_names_and_usage(ca, server_tls):
    key_pem, cert_pem = server_tls
    cert = _cert(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.issuer == _cert(ca.cert_pem).subject
    assert b"PRIVATE KEY" in key_pem


def test_server_cert_needs_names_and_real_ips(ca):
    with pytest.raises(AdmissionError, match="at least one hostname"):
        ca.issue_server_cert([], [])
    with pytest.raises(AdmissionError, match=r"expected an IP address, got '300.1.1.1'"):
        ca.issue_server_cert(["gw"], ["300.1.1.1"])


def test_ca_decides_identity_not_the_csr(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = _csr(
        key, cn="admin",
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.SubjectAlternativeName([x509.DNSName("gateway.example.net")]), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
        algorithm=hashes.SHA256(),
    )
    issued = ca.sign_envoy_csr(greedy, "env-1", now=NOW)
    cert = _cert(issued.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "env-1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["vigo:envoy:env-1"]
    assert san.get_values_for_type(x509.DNSName) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _spki(cert.public_key()) == _spki(key.public_key())  # the CSR's key, nothing else


def test_issued_cert_reads_back(envoy):
    _, issued = envoy
    der = _cert(issued.cert_pem).public_bytes(serialization.Encoding.DER)
    for form in (issued.cert_pem, der):
        assert adm.envoy_id_from_cert(form) == "env-7f3a"
        assert adm.cert_serial(form) == issued.serial


def test_lifetime_and_clock_skew(ca):
    _, csr = make_envoy_key_and_csr("h")
    issued = ca.sign_envoy_csr(csr, "env-2", now=NOW)
    cert = _cert(issued.cert_pem)
    assert issued.not_after == NOW + adm.ENVOY_CERT_LIFETIME_S
    assert cert.not_valid_after_utc.timestamp() == issued.not_after
    assert cert.not_valid_before_utc.timestamp() == NOW - adm.CLOCK_SKEW_S
    # Never beyond the CA's own expiry.
    capped = ca.sign_envoy_csr(csr, "env-2", lifetime_s=100 * 365 * 24 * 3600)
    assert capped.not_after == _cert(ca.cert_pem).not_valid_after_utc.timestamp()


@pytest.mark.parametrize("junk", [b"garbage", b"", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"])
def test_unreadable_csr(ca, junk):
    expected = r"^cannot read certificate request: expected a PEM CSR"
    with pytest.raises(AdmissionError, match=expected):
        ca.sign_envoy_csr(junk, "env-1")


def test_certificate_is_not_a_csr(ca):
    with pytest.raises(AdmissionError, match=r"cannot read certificate request.*BEGIN CERTIFICATE"):
        ca.sign_envoy_csr(ca.cert_pem, "env-1")


def test_tampered_csr_is_refused(ca):
    _, csr_pem = make_envoy_key_and_csr("honest-host")
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    forged = x509.load_der_x509_csr(der.replace(b"honest-host", b"honest-hosT"))
    forged_pem = forged.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(AdmissionError, match="not signed by its own key"):
        ca.sign_envoy_csr(forged_pem, "env-1")


@pytest.mark.parametrize(
    ("make_key", "algorithm", "named"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), hashes.SHA256(), "RSA 1024-bit"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), hashes.SHA256(), "EC secp521r1"),
    ],
)
def test_weak_or_unexpected_keys_are_refused(ca, make_key, algorithm, named):
    csr = _csr(make_key(), algorithm=algorithm)
    with pytest.raises(AdmissionError, match=f"its key is {named}, expected EC P-256/P-384"):
        ca.sign_envoy_csr(csr, "env-1")


@pytest.mark.parametrize(
    ("make_key", "algorithm"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), hashes.SHA256()),
        (lambda: ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
        (ed25519.Ed25519PrivateKey.generate, None),
    ],
)
def test_accepted_key_types(ca, make_key, algorithm):
    issued = ca.sign_envoy_csr(_csr(make_key(), algorithm=algorithm), "env-ok")
    assert adm.envoy_id_from_cert(issued.cert_pem) == "env-ok"


@pytest.mark.parametrize("envoy_id", ["", "-lead", "has space", "x" * 65, "a/b", None])
def test_bad_envoy_ids(ca, envoy_id):
    _, csr = make_envoy_key_and_csr("h")
    with pytest.raises(AdmissionError, match="expected an envoy id of 1-64"):
        ca.sign_envoy_csr(csr, envoy_id)


def test_only_envoy_certs_name_an_envoy(server_tls):
    _, server_cert = server_tls
    with pytest.raises(AdmissionError, match="not a vigo envoy certificate"):
        adm.envoy_id_from_cert(server_cert)
    with pytest.raises(AdmissionError, match="cannot read certificate: expected PEM or DER"):
        adm.envoy_id_from_cert(b"\x30\x03junk")


def test_envoy_key_and_csr():
    key_pem, csr_pem = make_envoy_key_and_csr("h" * 300)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "h" * 64


def test_enrolment_module_does_not_pull_in_the_server():
    probe = (
        "import sys, vigo.agent.enrolment\n"
        "print(sorted(m for m in sys.modules if m.startswith('vigo.server') or m == 'ray'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


# --- join tokens --------------------------------------------------------------------------


def test_new_token_shape_and_hash():
    token, token_hash = adm.new_token()
    assert token.startswith("vigo_") and len(token) == len("vigo_") + 43
    assert token_hash == hashlib.sha256(token.encode()).hexdigest() == adm.hash_token(token)
    assert adm.new_token()[0] != token


def test_token_checks_in_order():
    token, record = adm.issue_token(now=NOW, ttl_s=3600, uses=2, note="rack 4")
    assert record.hash == adm.hash_token(token) and token not in repr(record)
    assert len(record.id) == 8 and record.uses_allowed == 2

    with pytest.raises(TokenError, match=r"^join token not recognised$"):
        adm.check_token(None, now=NOW)
    with pytest.raises(TokenError, match=r"^join token not recognised$"):
        adm.check_token(record, now=NOW, token=adm.new_token()[0])

    once = adm.spend_token(record, now=NOW + 1, token=token)
    twice = adm.spend_token(once, now=NOW + 2)
    assert (record.uses_left, once.uses_left, twice.uses_left) == (2, 1, 0)
    with pytest.raises(TokenError, match=r"^join token has no uses left \(it allowed 2\)$"):
        adm.check_token(twice, now=NOW + 3)

    with pytest.raises(TokenError, match=r"^join token expired at 2025-06-15T16:06:40\+00:00$"):
        adm.check_token(record, now=NOW + 3600)
    adm.check_token(record, now=NOW + 3599)


def test_token_record_round_trip():
    _, record = adm.issue_token(now=NOW)
    spent = adm.spend_token(record, now=NOW)
    back = TokenRecord.from_dict(spent.to_dict())
    assert back == spent and back.uses_left == 0 and back.uses_allowed == adm.TOKEN_USES
    assert back.expires_at - back.created_at == adm.TOKEN_TTL_S


@pytest.mark.parametrize(("ttl_s", "uses"), [(0, 1), (31 * 24 * 3600, 1), (60, 0), (60, 10_001)])
def test_token_limits(ttl_s, uses):
    with pytest.raises(ConfigError, match="between"):
        adm.issue_token(now=NOW, ttl_s=ttl_s, uses=uses)


def test_hash_token_wants_a_string():
    with pytest.raises(TokenError, match="must be a string, got bytes"):
        adm.hash_token(b"vigo_abc")


# --- revocation ---------------------------------------------------------------------------


def test_revocation_set_round_trip_and_checks():
    big_serial = (1 << 158) + 12345  # X.509 serials exceed 64 bits
    revoked = RevocationSet()
    revoked.revoke("env-1", big_serial)
    revoked.revoke("env-2")
    assert revoked.is_revoked(envoy_id="env-1")
    assert revoked.is_revoked(serial=big_serial)
    assert revoked.is_revoked(envoy_id="env-2")
    assert not revoked.is_revoked(envoy_id="env-3", serial=7)
    assert not revoked.is_revoked()

    items = revoked.to_list()
    assert all(isinstance(item["serial"], str | None) for item in items)
    back = RevocationSet.from_list(items)
    assert back.to_list() == items and len(back) == 2

    with pytest.raises(RevokedError, match="envoy 'env-2' was revoked"):
        back.check("env-2", 99)
    with pytest.raises(RevokedError, match=r"certificate serial .* of envoy 'env-9' was revoked"):
        back.check("env-9", big_serial)
    back.check("env-3", 7)

    other = RevocationSet([("env-3", None)])
    other.merge(back)
    assert other.is_revoked(envoy_id="env-3") and other.is_revoked(serial=big_serial)


@pytest.mark.parametrize("item", [{}, {"envoy_id": 3}, {"envoy_id": "e", "serial": "xyz"}, "e"])
def test_revocation_entries_that_do_not_parse(item):
    with pytest.raises(AdmissionError, match="cannot read revocation entry #1"):
        RevocationSet.from_list([{"envoy_id": "ok", "serial": "ff"}, item])


# --- TLS on loopback ----------------------------------------------------------------------


@dataclass
class Outcome:
    handled: bool  # the server's handler ran: the handshake passed on the server's side
    reply: bytes = b""  # what the client read back (b"ok" when both sides are happy)
    peer_der: bytes | None = None  # what the server saw via SSLObject.getpeercert(binary_form=True)
    error: BaseException | None = None  # what the client saw, if it failed

    @property
    def accepted(self) -> bool:
        return self.handled and self.reply == b"ok"


def _exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host="localhost") -> Outcome:
    """Connect once over loopback. Under TLS 1.3 the server judges the client's certificate
    after the client considers the handshake done, so a refused client sees EOF on read rather
    than a handshake error; ``handled`` tells the two apart."""

    async def main() -> Outcome:
        seen: list[bytes | None] = []

        async def handle(reader, writer):
            seen.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
            writer.write(b"ok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reply, error = b"", None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=host), 5
            )
            try:
                reply = await asyncio.wait_for(reader.read(2), 5)
            finally:
                writer.close()
        except (ssl.SSLError, ConnectionError) as exc:
            error = exc
        finally:
            server.close()
            await server.wait_closed()
        return Outcome(bool(seen), reply, seen[0] if seen else None, error)

    return asyncio.run(main())


def _refused_by_gateway(outcome: Outcome) -> bool:
    return not outcome.handled and not outcome.accepted and outcome.peer_der is None


@pytest.fixture(scope="module")
def gateway_ctx(ca, server_tls):
    key_pem, cert_pem = server_tls
    return adm.tls_server_context(cert_pem, key_pem, ca.cert_pem, require_client_cert=False)


def test_unadmitted_envoy_reaches_the_gateway(ca, gateway_ctx):
    assert gateway_ctx.verify_mode == ssl.CERT_OPTIONAL
    assert gateway_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    outcome = _exchange(gateway_ctx, tls_client_context(ca.cert_pem))
    assert outcome.accepted and outcome.peer_der is None


def test_admitted_envoy_is_seen_by_its_cert(ca, gateway_ctx, envoy):
    key_pem, issued = envoy
    client = tls_client_context(ca.cert_pem, issued.cert_pem, key_pem)
    outcome = _exchange(gateway_ctx, client, host="127.0.0.1")
    assert outcome.accepted and outcome.peer_der is not None
    assert adm.envoy_id_from_cert(outcome.peer_der) == "env-7f3a"
    assert adm.cert_serial(outcome.peer_der) == issued.serial


def test_required_client_cert(ca, server_tls, envoy):
    key_pem, cert_pem = server_tls
    strict = adm.tls_server_context(cert_pem, key_pem, ca.cert_pem, require_client_cert=True)
    assert _refused_by_gateway(_exchange(strict, tls_client_context(ca.cert_pem)))
    envoy_key, issued = envoy
    assert _exchange(strict, tls_client_context(ca.cert_pem, issued.cert_pem, envoy_key)).accepted


def test_cert_from_another_ca_fails_the_handshake(ca, other_ca, gateway_ctx):
    key_pem, csr = make_envoy_key_and_csr("intruder")
    foreign = other_ca.sign_envoy_csr(csr, "env-7f3a")
    outcome = _exchange(gateway_ctx, tls_client_context(ca.cert_pem, foreign.cert_pem, key_pem))
    assert _refused_by_gateway(outcome)


def test_expired_envoy_cert_fails_the_handshake(ca, gateway_ctx):
    key_pem, csr = make_envoy_key_and_csr("late")
    stale = ca.sign_envoy_csr(csr, "env-old", now=time.time() - 3 * 24 * 3600, lifetime_s=3600)
    assert stale.not_after < time.time()
    outcome = _exchange(gateway_ctx, tls_client_context(ca.cert_pem, stale.cert_pem, key_pem))
    assert _refused_by_gateway(outcome)


def test_gateway_cert_cannot_pose_as_an_envoy(ca, gateway_ctx, server_tls):
    key_pem, cert_pem = server_tls  # same CA, but serverAuth only
    outcome = _exchange(gateway_ctx, tls_client_context(ca.cert_pem, cert_pem, key_pem))
    assert _refused_by_gateway(outcome)


def test_envoy_refuses_a_gateway_from_another_ca(other_ca, gateway_ctx):
    outcome = _exchange(gateway_ctx, tls_client_context(other_ca.cert_pem))
    assert not outcome.accepted and isinstance(outcome.error, ssl.SSLCertVerificationError)


def test_envoy_checks_the_gateway_name(ca, gateway_ctx):
    outcome = _exchange(gateway_ctx, tls_client_context(ca.cert_pem), host="gw.example.net")
    assert not outcome.accepted and isinstance(outcome.error, ssl.SSLCertVerificationError)


def test_context_inputs_are_checked(ca, server_tls, envoy):
    key_pem, cert_pem = server_tls
    envoy_key, issued = envoy
    with pytest.raises(AdmissionError, match="got a certificate without a key"):
        tls_client_context(ca.cert_pem, issued.cert_pem)
    with pytest.raises(AdmissionError, match="cannot load fleet CA certificate"):
        tls_client_context(b"not a cert")
    with pytest.raises(AdmissionError, match="the PEM private key that belongs to it"):
        tls_client_context(ca.cert_pem, issued.cert_pem, key_pem)  # the gateway's key
    with pytest.raises(AdmissionError, match="cannot load TLS certificate and key"):
        adm.tls_server_context(cert_pem, envoy_key, ca.cert_pem, require_client_cert=False)


def _spki(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
