"""The envoy's side of admission: its own key and CSR, and the TLS context it dials out with.

The envoy never imports ``vigo.server``; the server imports :func:`load_cert_chain_pem` and
:func:`load_ca_pem` from here instead, so the TLS plumbing both sides need lives on the light
side.

The private key is made on the envoy and never leaves it: the server only ever sees the CSR.
"""

from __future__ import annotations

import os
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vigo.errors import AdmissionError

# X.509 caps a CommonName at 64 characters; the CSR's name is only a hint (the CA overrides it).
_CN_MAX_CHARS = 64


def make_envoy_key_and_csr(hostname: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PKCS#8 PEM) and a CSR signed by it (PEM).

    The CSR's subject is only informational: the fleet CA writes the envoy id it chose itself.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = (hostname or "vigo envoy")[:_CN_MAX_CHARS]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def tls_client_context(
    ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ client context that trusts only the fleet CA (never the system store).

    Without ``cert_pem``/``key_pem`` it is good for ``join`` only; after admission the envoy
    passes its certificate and key and the gateway sees who it is.
    """
    if (cert_pem is None) != (key_pem is None):
        given = "a certificate without a key" if key_pem is None else "a key without a certificate"
        raise AdmissionError(f"client certificate and key go together: got {given}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_ca_pem(ctx, ca_pem)
    if cert_pem is not None and key_pem is not None:
        load_cert_chain_pem(ctx, cert_pem, key_pem)
    return ctx


def load_cert_chain_pem(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``ctx.load_cert_chain`` from bytes.

    The ssl module only reads certificate chains from files, so the PEMs go to a private
    directory (0700, from ``mkdtemp``) as 0600 files that are deleted as soon as OpenSSL has
    read them.
    """
    with tempfile.TemporaryDirectory(prefix="vigo-tls-") as folder:
        cert_path = os.path.join(folder, "cert.pem")
        key_path = os.path.join(folder, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise AdmissionError(
                f"cannot load TLS certificate and key: expected a PEM certificate and the PEM "
                f"private key that belongs to it: {exc}"
            ) from exc


def load_ca_pem(ctx: ssl.SSLContext, ca_pem: bytes) -> None:
    """Trust ``ca_pem`` (the fleet CA) for verifying the other side."""
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise AdmissionError(
            f"cannot load fleet CA certificate: expected a PEM certificate, got "
            f"{ca_pem[:40]!r}: {exc}"
        ) from exc
