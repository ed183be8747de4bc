"""The envoy's side of admission: its own key and CSR, and the TLS context it dials out with.

The TLS loading both sides need is ``vigo.crypto.tls``'s; what is here only the envoy uses.

The private key is made on the envoy and never leaves it: the server only ever sees the CSR.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vigo.crypto.tls import load_ca_pem, load_cert_chain_pem
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
