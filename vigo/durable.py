"""Durability helpers shared by every layer: the state's stream, the archive, restore, backups,
standbys, control's topology and the envoy (its identity, the files it enforces) use them. A
bottom-layer module (standard library only) so that the state package below the snapshots, and
the envoy, can share one copy.

- ``atomic_write`` / ``atomic_file``: a file replaced whole or not at all (temp file beside it,
  fsync, rename, fsync of the directory).
- ``replace_durably``: the rename alone, for a file already written and fsynced elsewhere (or
  a symlink), and the fsync of the directory that makes it stick.
- ``fsync_path``: fsync a file or a directory by path.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

#: ``mode`` for files that open() would have made: 0o666 less the umask.
OPEN_MODE = 0o666


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file, or a directory (which makes a rename or link in it durable), by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.replace(src, dst)``, then fsync ``dst``'s directory so that the rename survives a
    crash. ``src``'s bytes are the caller's to have made durable first."""
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


@contextmanager
def atomic_file(
    path: str | os.PathLike[str], *, mode: int = 0o600, fsync: bool = True,
    tmp: str | os.PathLike[str] | None = None,
) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` whole, or not at all.

    The block writes (and may read back) a temp file beside ``path``: ``tmp`` when given
    (truncated if a crash left one), else a new ``.<name>.<random>.tmp``. It is created with
    ``mode`` from its first byte (the umask applies, as with open(2); ``OPEN_MODE`` for open()'s
    default) and never through a symlink. On a clean exit the file is flushed, fsynced, renamed
    over ``path`` and the directory fsynced (``fsync=False``: neither fsync, for files the
    caller makes durable in batches or can rebuild). If the block raises, the temp file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    if tmp is None:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        flags = os.O_EXCL
    else:
        temp, flags = Path(tmp), os.O_TRUNC
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | flags, mode)
    try:
        with os.fdopen(fd, "w+b") as out:  # readable too: a download hashes what it wrote
            yield out
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_path(path.parent)


def atomic_write(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, fsync: bool = True,
    tmp: str | os.PathLike[str] | None = None,
) -> None:
    """Replace ``path`` with ``data`` whole, or not at all (``atomic_file``, same arguments)."""
    with atomic_file(path, mode=mode, fsync=fsync, tmp=tmp) as out:
        out.write(data)


@contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600 if missing) for the block. flock
    conflicts between separate opens even in one process, so threads are covered too; the lock
    goes with the file descriptor, so a crashed holder never leaves it taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
