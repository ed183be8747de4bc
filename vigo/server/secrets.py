"""Secrets encrypted at rest on the server: AES-256-GCM under one master key.

A sealed secret is ``version (1 byte) | nonce (12) | ciphertext+tag``. The associated data
binds it to the secret's name, so a blob copied under another name (in the store, or a backup)
does not open. The master key is part of the partition's state (a row of the ``secrets`` tree,
materialised as ``secrets/master.key``, 0600), so a standby or a restore can open the secrets
it replicated. The consequence, stated plainly: the database file, its WAL stream and the
archive are as sensitive as the secrets themselves. Backups are encrypted as one unit for this
reason (a later issue); moving the key out of band is the alternative if that is not enough.

The cipher, its nonces and the key file are ``vigo.crypto.aead``'s; this module adds what is
particular to named secrets: the version byte, the name check, the size limit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vigo.crypto.aead import KEY_BYTES, NONCE_BYTES, TAG_BYTES, Sealer, load_or_create_key
from vigo.errors import ProtocolError, SecretError, StackError

if TYPE_CHECKING:
    from vigo.state.store import Store

# The partition's one logger: operators follow one name for everything a partition does.
log = logging.getLogger("vigo.server.partition")

FORMAT_VERSION = 1  # leading byte; leaves room for key rotation (a key id) later
# Secrets are passwords, tokens and small key files; anything bigger is a file, not a secret,
# and would bloat every bundle it travels in.
MAX_SECRET_BYTES = 64 * 1024
SECRET_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_AAD_PREFIX = b"vigo-secret:v1:"


class SecretBox:
    """Seals and opens named secrets with a 32-byte master key."""

    def __init__(self, key: bytes) -> None:
        self._sealer = Sealer(key, what="secrets master key")

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
        return bytes([FORMAT_VERSION]) + self._sealer.seal(bytes(value), _aad(name))

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
        try:
            return self._sealer.open(memoryview(blob)[1:], _aad(name))
        except SecretError as exc:  # the length was checked above: the tag did not verify
            raise SecretError(
                f"cannot open secret {name!r}: wrong master key, altered data, or sealed under "
                "another name"
            ) from exc


class SecretsCore:
    """The named secrets of one partition, sealed in its ``secrets`` tree (``values/<name>.sealed``)
    so they replicate, archive and back up with everything else and open only with the master
    key, which lives in the same tree (see the module's docstring for what that implies)."""

    def __init__(self, store: Store, box: SecretBox) -> None:
        self.store = store
        self.box = box

    def put(self, name: str, value: bytes | str) -> dict[str, Any]:
        """Seal and store one value (the admin table has checked that it is text or bytes)."""
        data = value.encode() if isinstance(value, str) else value
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_body", f"secret {name!r} is not UTF-8 text; templates need text "
                                            "(base64-encode binary values)") from None
        sealed = self.box.seal(name, data)
        with self.store.write() as db:
            self.store.put_file(db, "secrets", f"values/{name}.sealed", sealed)
        log.info("secret %s set (%d bytes, sealed)", name, len(data))
        return {"name": name, "bytes": len(data)}

    def listing(self) -> list[dict[str, Any]]:
        """Names and when each was last set; never a value."""
        rows = self.store.query("SELECT path, updated_at FROM trees WHERE tree = 'secrets' "
                                "AND path LIKE 'values/%' ORDER BY path")
        return [{"name": r[0][len("values/"):-len(".sealed")], "updated_at": r[1]} for r in rows]

    def values(self, names: Iterable[str]) -> dict[str, str]:
        """The opened values a stack references, for the bundle build; a missing one fails the
        push (an envoy would otherwise render a template with a hole in it)."""
        values = {}
        for name in names:
            sealed = self.store.get_file("secrets", f"values/{name}.sealed")
            if sealed is None:
                raise StackError(f"secret {name!r} is referenced by the stack but not set",
                                 expected=f"`vigocli secrets set {name}` first", got="no such secret")
            values[name] = self.box.open(name, sealed).decode()
        return values


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not SECRET_NAME_RE.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise SecretError(
            "bad secret name: expected a letter or '_' then up to 127 letters, digits or '_' "
            f"(like db_password), got {shown}"
        )


def _aad(name: str) -> bytes:
    return _AAD_PREFIX + name.encode("ascii")
