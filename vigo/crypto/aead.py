"""AES-256-GCM, the one authenticated cipher in vigo, and the key files it uses.

Every encrypted byte vigo writes goes through :class:`Sealer`: the envoy's secrets at rest in
its cache (key ``STATE_DIR/seal.key``), the server's named secrets (``vigo.server.secrets``,
which adds a version byte in front), and the records of a backup unit
(``vigo.snapshots.backupformat``, which frames them with a length). One place makes nonces, so one
place has to be right about them.

A sealed blob is ``nonce (12) | ciphertext+tag``. The associated data binds it to its purpose,
so a blob copied into another slot (another cache entry, another secret's name, another backup
chunk) does not open. Nonces are random: at 96 bits, a key is good for far more seals (around
2**32) than any of those uses will write.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vigo.errors import SecretError

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce size
TAG_BYTES = 16
#: The envoy's sealing key, in its state directory.
KEY_FILE = "seal.key"


class Sealer:
    """Seals and opens blobs with one 32-byte key; ``what`` names the key in errors."""

    def __init__(self, key: bytes, *, what: str = "sealing key") -> None:
        if len(key) != KEY_BYTES:
            raise SecretError(f"{what} must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> Sealer:
        """The envoy's sealer: its key is ``state_dir/seal.key``, created on first use."""
        return cls(load_or_create_key(state_dir / KEY_FILE))

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, purpose)

    def open(self, sealed: bytes | bytearray | memoryview, purpose: bytes) -> bytes:
        """The plaintext, or SecretError when the key is wrong or the blob was altered (callers
        that can say more, such as which secret or which backup chunk, catch it and do)."""
        if len(sealed) < NONCE_BYTES + TAG_BYTES:
            raise SecretError(f"sealed blob too short ({len(sealed)} bytes) for {purpose.decode(errors='replace')}")
        view = memoryview(sealed)  # backup chunks are megabytes: slice without copying
        try:
            return self._aead.decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], purpose)
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
