"""The envoy's local sealing key: secrets never rest in plaintext in its cache.

A 32-byte AES-256-GCM key lives in ``STATE_DIR/seal.key``, created 0600 on first use. Whatever
the envoy keeps that holds a secret value (the secrets part of a cached bundle) is sealed with
it; the associated data binds a sealed blob to its purpose, so a blob copied into another slot
does not open.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vigo.errors import SecretError

KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE = "seal.key"


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretError(f"sealing key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> Sealer:
        return cls(load_or_create_key(state_dir / KEY_FILE))

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, purpose)

    def open(self, sealed: bytes, purpose: bytes) -> bytes:
        if len(sealed) < NONCE_BYTES + 16:
            raise SecretError(f"sealed blob too short ({len(sealed)} bytes) for {purpose.decode(errors='replace')}")
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], purpose)
        except InvalidTag as exc:
            raise SecretError(
                f"cannot open sealed {purpose.decode(errors='replace')}: wrong key or altered data"
            ) from exc


def load_or_create_key(path: Path) -> bytes:
    """Read the key, or create it atomically: written to a temp file, then hard-linked into
    place, so a concurrent reader never sees a half-written key and two creators cannot both win."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # someone else created it first; theirs is the key
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise SecretError(
            f"sealing key {path} is {len(key)} bytes, expected {KEY_BYTES}; it was truncated or "
            "replaced (remove it to start over: cached secrets are then lost until the next bundle)"
        )
    return key
