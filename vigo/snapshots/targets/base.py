"""The archive target interface: where WAL segments, snapshots and backups are kept.

A target is a flat, write-once key/value store under one URL (``file:///srv/vigo-archive``,
``s3://bucket/prefix``). Everything that archives or restores talks to it through `Target`
only, so the same code (and the same conformance suite) runs against every backend.

Keys are relative to the target's prefix: '/'-separated segments of ``[A-Za-z0-9_@=+:.-]``
that never start with '.' (so no '..', no hidden names, room for the file backend's temp
files) and never end in ``.meta.json`` (the file backend keeps metadata there). Listing order
is key order, so callers put what they order by into key names as fixed-width lowercase hex
(notes/wal-archiving.md §5) and never rely on modification times.

Errors are ``TargetError`` and its subclasses in `vigo.errors`: permanent ones (credentials,
a missing bucket or directory) as ``TargetError``, ``TargetUnavailable(ConnectionError)`` for
transient ones (refused, timed out, 5xx: spool and retry), ``NotFound``, ``ObjectCorrupt``,
``ObjectConflict`` and ``InvalidRequest(ValueError)``; each message says what was attempted,
what was expected and what arrived.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from vigo.errors import InvalidRequest

#: ``progress(bytes_done, bytes_total)``; called from the calling thread, never concurrently.
Progress = Callable[[int, int], None]

#: The metadata entry every put stores itself: hex sha256 of the object's bytes.
SHA256_KEY = "sha256"
#: Chunk for streaming local files: large enough that hashing, not syscalls, sets the pace.
COPY_CHUNK_BYTES = 8 * 1024 * 1024
#: S3 limits user metadata (names + values, UTF-8) to 2 KiB; the file backend enforces the
#: same so that code tested against files cannot outgrow S3.
MAX_METADATA_BYTES = 2048
#: S3 allows 1024-byte keys including the target prefix; leave room for a prefix.
MAX_KEY_BYTES = 800
#: Filesystems allow 255-byte names; leave room for ``.meta.json`` and temp suffixes.
MAX_SEGMENT_BYTES = 200
#: Suffix of the file backend's metadata files; reserved in keys on every backend.
META_SUFFIX = ".meta.json"

_SEGMENT = re.compile(r"[A-Za-z0-9_@=+:-][A-Za-z0-9_@=+:.-]*")
# Lowercase because S3 returns metadata names lowercased: anything else would not round-trip.
_META_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# Printable ASCII without surrounding blanks: metadata travels in HTTP headers, which trim.
_META_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. ``metadata`` includes ``sha256`` from `Target.head`; see `Target.list`."""

    key: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)


class Target(ABC):
    """A write-once object store under one URL. Implementations are safe to share between threads.

    Local-file problems on the caller's side (a missing ``put_file`` source, a destination
    directory that does not exist) raise the plain `OSError`; everything about the target
    itself raises a `TargetError`.
    """

    @property
    @abstractmethod
    def url(self) -> str:
        """The target's URL, without credentials: ``file:///path`` or ``s3://bucket/prefix``."""

    def describe(self) -> str:
        """A one-line description for logs and error messages (URL plus endpoint, if any)."""
        return self.url

    @abstractmethod
    def put(self, key: str, data: bytes, metadata: dict[str, str]) -> None:
        """Store ``data`` under ``key``, once.

        Adds the ``sha256`` metadata entry itself. Idempotent: if ``key`` already holds bytes
        with the same sha256 this succeeds (the first write's metadata stays); other bytes
        raise `ObjectConflict`.
        """

    @abstractmethod
    def put_file(
        self, key: str, path: str | os.PathLike[str], metadata: dict[str, str],
        progress: Progress | None = None,
    ) -> None:
        """`put` for large objects: streamed from ``path``, never read into memory whole."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes, verified against its sha256 (`ObjectCorrupt`, `NotFound`)."""

    @abstractmethod
    def get_file(
        self, key: str, path: str | os.PathLike[str], progress: Progress | None = None
    ) -> None:
        """Download to ``path`` atomically (temp file, fsync, rename), verified like `get`.

        ``path`` is replaced only by a complete, verified copy; on any error it is untouched.
        """

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and metadata (including ``sha256``) of one object, or None if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key.

        ``metadata`` is always empty here: S3 listings do not carry it, and the file backend
        leaves it empty too so that code tested against files cannot come to rely on it. Put
        what you order or select by into key names; `head` the few objects you need more of.
        """

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Delete ``keys``; keys that do not exist are fine."""


# --- validation -------------------------------------------------------------------------------


def check_key(key: object) -> str:
    """``key`` if it is a valid object key, else `InvalidRequest` saying which rule it breaks."""
    key = _check_path(key, "key")
    if key.endswith(META_SUFFIX):
        raise InvalidRequest(
            f"invalid key {key!r}: names ending in {META_SUFFIX!r} are reserved for metadata",
            key=key,
        )
    return key


def check_prefix(prefix: object) -> str:
    """``prefix`` if a valid key could start with it ("" and a trailing '/' are fine)."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise InvalidRequest(f"invalid prefix: expected str, got {type(prefix).__name__}")
    _check_path(prefix.removesuffix("/"), "prefix", shown=prefix)
    return prefix


def check_metadata(metadata: object) -> dict[str, str]:
    """A copy of ``metadata`` if every entry survives a round trip through S3 headers."""
    if not isinstance(metadata, dict):
        raise InvalidRequest(f"invalid metadata: expected a dict of str to str, got {type(metadata).__name__}")
    size = len(SHA256_KEY) + 64  # the entry every put adds
    for name, value in metadata.items():
        if not isinstance(name, str) or not _META_NAME.fullmatch(name):
            raise InvalidRequest(
                f"invalid metadata name {name!r}: expected 1-63 characters of [a-z0-9-], "
                "starting with a letter or digit"
            )
        if name == SHA256_KEY:
            raise InvalidRequest(
                f"invalid metadata name {name!r}: reserved, the target computes it from the bytes"
            )
        if not isinstance(value, str) or not _META_VALUE.fullmatch(value):
            raise InvalidRequest(
                f"invalid metadata value for {name!r}: expected printable ASCII without "
                f"leading or trailing blanks, got {value!r}"
            )
        size += len(name) + len(value)
    if size > MAX_METADATA_BYTES:
        raise InvalidRequest(
            f"invalid metadata: {size} bytes of names and values (with sha256), "
            f"expected at most {MAX_METADATA_BYTES}"
        )
    return dict(metadata)


def _check_path(text: object, what: str, *, shown: str | None = None) -> str:
    if not isinstance(text, str):
        raise InvalidRequest(f"invalid {what}: expected str, got {type(text).__name__}")
    shown = text if shown is None else shown
    if not text:
        raise InvalidRequest(f"invalid {what} {shown!r}: empty")
    if text.startswith("/"):
        raise InvalidRequest(f"invalid {what} {shown!r}: must be relative (no leading '/')")
    if len(text.encode()) > MAX_KEY_BYTES:
        raise InvalidRequest(
            f"invalid {what} {shown!r}: {len(text.encode())} bytes, expected at most {MAX_KEY_BYTES}"
        )
    for segment in text.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidRequest(
                f"invalid {what} {shown!r}: segment {segment!r} (empty, '.' and '..' are not allowed)"
            )
        if not _SEGMENT.fullmatch(segment) or len(segment) > MAX_SEGMENT_BYTES:
            raise InvalidRequest(
                f"invalid {what} {shown!r}: segment {segment!r} must be 1-{MAX_SEGMENT_BYTES} "
                "characters of [A-Za-z0-9_@=+:.-], not starting with '.'"
            )
    return text


# --- local files, shared by every backend ------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(hex sha256, size) of a local file, read in chunks."""
    with open(path, "rb", buffering=0) as src:
        return hash_stream(src)


def hash_stream(src: BinaryIO) -> tuple[str, int]:
    """(hex sha256, size) of what is left to read in ``src``, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(COPY_CHUNK_BYTES)
    view = memoryview(buf)
    while n := src.readinto(buf):
        digest.update(view[:n])
        size += n
    return digest.hexdigest(), size


def conflict_message(key: str, where: str, stored: str | None, sha: str) -> str:
    return (
        f"cannot put {key} to {where}: it already exists with sha256 {stored}, this put has "
        f"sha256 {sha}; archive objects are write-once"
    )


def corrupt_message(key: str, where: str, expected: str, got: str) -> str:
    return (
        f"object {key} at {where} is corrupt: expected sha256 {expected} (stored when it was "
        f"put), its bytes hash to {got}"
    )
