"""Ed25519 keys that sign PolicyBundles.

The signing key is deliberately separate from any TLS key: whoever can terminate TLS for a
gateway still cannot make policy that envoys accept. Files are PEM (PKCS#8 private key,
SubjectPublicKeyInfo public key) so standard tools can inspect them.

In the bottom layer because three sides read these files: the policy builder signs with them,
the envoy trusts a public key, and the server signs the bundles it serves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vigo.durable import atomic_write
from vigo.errors import SigningKeyError


def generate_keypair(out: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write a new private key to ``out`` (mode 0600) and its public key to ``out.pub``."""
    pub_path = out.with_name(out.name + ".pub")
    if not force:
        for path in (out, pub_path):
            if path.exists():
                raise SigningKeyError(
                    f"refusing to overwrite existing key file {path} (pass --force to replace it)"
                )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(out, private_pem)
    pub_path.write_bytes(public_pem(key.public_key()))
    return out, pub_path


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the first byte; never world-readable, not even for an instant.
    atomic_write(path, data, mode=0o600, tmp=path.with_name(f".{path.name}.tmp{os.getpid()}"))


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(
            f"cannot load signing key {path}: expected an unencrypted PEM Ed25519 private key "
            f"(as written by `vigocli stack keygen`): {exc}"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"cannot use signing key {path}: expected an Ed25519 key, got {type(key).__name__}"
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    return parse_public_key(_read(path, "trusted public key"), origin=str(path))


def parse_public_key(data: bytes, *, origin: str = "public key") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(
            f"cannot load {origin}: expected a PEM Ed25519 public key (KEY.pub from "
            f"`vigocli stack keygen`): {exc}"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"cannot use {origin}: expected an Ed25519 key, got {type(key).__name__}")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint so a wrong-key error can say which key signed and which is trusted."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
