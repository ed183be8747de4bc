"""Secrets encrypted at rest on the server: AES-256-GCM under one master key.

A sealed secret is ``version (1 byte) | nonce (12) | ciphertext+tag``. The associated data
binds it to the secret's name, so a blob copied under another name (in the store, or a backup)
does not open. The master key is part of the partition's state (a row of the ``secrets`` tree,
materialised as ``secrets/master.key``, 0600), so a standby or a restore can open the secrets
it replicated. The consequence, stated plainly: the database file, its WAL stream and the
archive are as sensitive as the secrets themselves. Backups are encrypted as one unit for this
reason (a later issue); moving the key out of band is the alternative if that is not enough.

Nonces are random: at 96 bits, a key is good for far more seals (around 2**32) than a fleet
will ever write secrets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vigo.agent.sealing import load_or_create_key
from vigo.errors import SecretError

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce size
TAG_BYTES = 16
FORMAT_VERSION = 1  # leading byte; leaves room for key rotation (a key id) later
# Secrets are passwords, tokens and small key files; anything bigger is a file, not a secret,
# and would bloat every bundle it travels in.
MAX_SECRET_BYTES = 64 * 1024
SECRET_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_AAD_PREFIX = b"vigo-secret:v1:"


class SecretBox:
    """Seals and opens named secrets with a 32-byte master key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretError(f"secrets master key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, path: Path) -> SecretBox:
        """Read the master key at ``path``, or create it (0600, atomically) if there is none."""
        path = Path(path)
        try:
            key = load_or_create_key(path)
        except SecretError as exc:
            size = path.stat().st_size if path.exists() else 0
            raise SecretError(
                f"secrets master key {path} is {size} bytes, expected {KEY_BYTES}: it was "
                "truncated or replaced. Restore it from where you keep its copy; do not delete "
                "it, every stored secret needs it"
            ) from exc
        except OSError as exc:
            raise SecretError(f"cannot read or create secrets master key {path}: {exc}") from exc
        return cls(key)

    def seal(self, name: str, value: bytes) -> bytes:
        _check_name(name)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise SecretError(
                f"cannot seal secret {name!r}: expected bytes, got {type(value).__name__}"
            )
        if len(value) > MAX_SECRET_BYTES:
            raise SecretError(
                f"cannot seal secret {name!r}: it is {len(value)} bytes, at most "
                f"{MAX_SECRET_BYTES} bytes (64 KiB) are allowed"
            )
        nonce = os.urandom(NONCE_BYTES)
        return bytes([FORMAT_VERSION]) + nonce + self._aead.encrypt(nonce, bytes(value), _aad(name))

    def open(self, name: str, blob: bytes) -> bytes:
        _check_name(name)
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise SecretError(
                f"cannot open secret {name!r}: expected sealed bytes, got {type(blob).__name__}"
            )
        blob = bytes(blob)
        if len(blob) < 1 + NONCE_BYTES + TAG_BYTES:
            raise SecretError(
                f"cannot open secret {name!r}: sealed value is {len(blob)} bytes, expected at "
                f"least {1 + NONCE_BYTES + TAG_BYTES}"
            )
        if blob[0] != FORMAT_VERSION:
            raise SecretError(
                f"cannot open secret {name!r}: sealed format version {blob[0]}, expected "
                f"{FORMAT_VERSION}"
            )
        nonce, ciphertext = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, ciphertext, _aad(name))
        except InvalidTag as exc:
            raise SecretError(
                f"cannot open secret {name!r}: wrong master key, altered data, or sealed under "
                "another name"
            ) from exc


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not SECRET_NAME_RE.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise SecretError(
            "bad secret name: expected a letter or '_' then up to 127 letters, digits or '_' "
            f"(like db_password), got {shown}"
        )


def _aad(name: str) -> bytes:
    return _AAD_PREFIX + name.encode("ascii")
