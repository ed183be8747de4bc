"""TLS material both sides load: PEM certificates and keys into an ``ssl`` context, and the
one way a certificate is fingerprinted.

The envoy dials out with a client context built from these (``vigo.agent.enrolment``); the
gateway listens with a server context built from the same (``vigo.server.admissions``); vigocli
and the spanner roster name a gateway's or an envoy's certificate by :func:`cert_fingerprint`.
Both the envoy's join and vigocli check a gateway's certificate themselves, after the handshake
(:func:`unverified_client_context`).
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile

from vigo.errors import AdmissionError


def unverified_client_context() -> ssl.SSLContext:
    """A TLS 1.2+ client context that checks neither the chain nor the name, for callers that
    check the certificate themselves: an envoy's ``join`` (it does not know the CA yet; the
    answer is checked), vigocli (it compares the certificate with the digest the
    token-authenticated dashboard reported, a stronger statement than a CA store's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
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


def cert_fingerprint(cert: bytes | str) -> str:
    """SHA-256 of a certificate's DER bytes, hex: how gateways are pinned and how the spanner
    roster names an admitted envoy's certificate. ``cert`` is PEM (str or bytes) or DER bytes
    (what ``getpeercert(binary_form=True)`` gives)."""
    if isinstance(cert, str):
        der = ssl.PEM_cert_to_DER_cert(cert)
    elif cert.lstrip().startswith(b"-----BEGIN"):
        der = ssl.PEM_cert_to_DER_cert(cert.decode())
    else:
        der = cert
    return hashlib.sha256(der).hexdigest()
