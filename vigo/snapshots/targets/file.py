"""The file backend: a directory on a local or mounted filesystem (``file:///srv/vigo-archive``).

Layout under the root directory, which must already exist (like a bucket; a typo or an
unmounted volume then fails loudly instead of filling the wrong disk):

    <key>                     the object's bytes, exactly as put
    <key>.meta.json           {"format": 1, "metadata": {..., "sha256": "<hex>"}}
    <dir>/.<name>.*.part      temp files of puts in progress (ignored by list)
    .lock                     flock(2) held while a put commits

Commit order: bytes and metadata go to temp files in the object's directory and are fsynced;
then, under the lock, the metadata is renamed into place and the directory fsynced, then the
bytes are hard-linked to the key and the directory fsynced again. So a visible object always has
its metadata (even where a crash could keep a later entry and lose an earlier one), and a crash
leaves at most an orphan ``.meta.json`` (which the retried put overwrites) or temp files. The
link fails if anything already sits at the key, so an object is never overwritten, not even by
a writer that ignores the lock. Nothing here reads modification times.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, TypeVar

from vigo.durable import atomic_file, exclusive_lock, fsync_path, replace_durably
from vigo.errors import (
    ConfigError,
    NotFound,
    ObjectConflict,
    ObjectCorrupt,
    TargetError,
    TargetUnavailable,
    clipped_repr,
)
from vigo.snapshots.targets.base import (
    COPY_CHUNK_BYTES,
    META_SUFFIX,
    SHA256_KEY,
    ObjectInfo,
    Progress,
    Target,
    check_key,
    check_metadata,
    check_prefix,
    conflict_message,
    corrupt_message,
    hash_file,
    sha256_hex,
)

#: Version of the ``.meta.json`` layout, so a later vigo can read what this one wrote.
META_FORMAT = 1
LOCK_NAME = ".lock"
# errnos that a full disk or a flaky network mount produce: they pass, so the caller retries.
_TRANSIENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ENOTCONN,
    errno.ECONNREFUSED, errno.ECONNRESET,
})
# Filesystems without hard links (vfat, some FUSE and SMB mounts) say so with these.
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
_T = TypeVar("_T")
# A concurrent delete may remove an emptied directory between our mkdir and our temp file.
_MKTEMP_ATTEMPTS = 3


class FileTarget(Target):
    """Objects as files under ``root``. Safe to share between threads and processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = Path(root)
        if not root.is_absolute():
            raise ConfigError(f"file target root must be an absolute path, got {str(root)!r}")
        self._root = root

    @property
    def url(self) -> str:
        return self._root.as_uri()

    # --- writing ------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, metadata: dict[str, str]) -> None:
        key = check_key(key)
        metadata = check_metadata(metadata)
        sha = sha256_hex(data)
        with self._boundary(f"put {key} to", key):
            self._require_root(f"put {key} to", key)
            path = self._path(key)
            if path.is_file():  # the common retry case: no temp files needed
                self._check_same(key, path, sha)
                return
            tmp, _ = self._write_temp(path, lambda out: out.write(data))
            self._commit(key, path, tmp, sha, metadata)

    def put_file(
        self, key: str, path: str | os.PathLike[str], metadata: dict[str, str],
        progress: Progress | None = None,
    ) -> None:
        key = check_key(key)
        metadata = check_metadata(metadata)
        with open(path, "rb", buffering=0) as src:
            total = os.fstat(src.fileno()).st_size
            with self._boundary(f"put {key} to", key):
                self._require_root(f"put {key} to", key)
                dest = self._path(key)
                if dest.is_file():
                    self._check_same(key, dest, hash_file(path)[0])
                    if progress:
                        progress(total, total)
                    return
                # Hash while copying: one read of the source, and the sha256 describes exactly
                # the bytes that were written, even if the source changes meanwhile. (A read
                # error on the source surfaces as a TargetError here too; it is rare enough.)
                tmp, sha = self._write_temp(
                    dest, lambda out: _copy(src.readinto, out.write, total, progress)
                )
                self._commit(key, dest, tmp, sha, metadata)

    def _write_temp(self, path: Path, fill: Callable[[BinaryIO], _T]) -> tuple[Path, _T]:
        """A fsynced temp file beside ``path`` holding what ``fill`` writes, and fill's result."""
        for attempt in range(_MKTEMP_ATTEMPTS):
            self._makedirs(path.parent)
            try:
                fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
                break
            except FileNotFoundError:
                if attempt == _MKTEMP_ATTEMPTS - 1:
                    raise
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                result = fill(out)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, result

    def _commit(self, key: str, path: Path, tmp: Path, sha: str, metadata: dict[str, str]) -> None:
        """Publish ``tmp`` as ``key``: metadata first, then the bytes (see the module docstring)."""
        doc = {"format": META_FORMAT, "metadata": {**metadata, SHA256_KEY: sha}}
        meta_tmp, _ = self._write_temp(path, lambda out: out.write(json.dumps(doc).encode()))
        try:
            with self._lock():
                if path.is_file():
                    self._check_same(key, path, sha)
                    return
                # Durable before the bytes appear, so a visible object always has its metadata.
                replace_durably(meta_tmp, _meta_path(path))
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    # A writer that does not take the lock got there first; it is not overwritten.
                    self._check_same(key, path, sha)
                    return
                except OSError as exc:
                    if exc.errno not in _NO_LINK_ERRNOS:
                        raise
                    # No hard links here: the existence check above, under the lock, is what
                    # keeps vigo writers from overwriting each other.
                    replace_durably(tmp, path)
                else:
                    fsync_path(path.parent)  # a link, not a rename: its directory made durable here
        finally:
            tmp.unlink(missing_ok=True)
            meta_tmp.unlink(missing_ok=True)

    def _check_same(self, key: str, path: Path, sha: str) -> None:
        """Succeed if the stored object has ``sha``, else `ObjectConflict` (write-once)."""
        stored = self._stored_sha(key, path)
        if stored != sha:
            raise ObjectConflict(conflict_message(key, self.url, stored, sha), key=key)

    # --- reading ------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        key = check_key(key)
        with self._boundary(f"get {key} from", key):
            path = self._path(key)
            with self._open_object(key, path) as src:
                data = src.read()
            expected = self._stored_sha(key, path)
        got = sha256_hex(data)
        if got != expected:
            raise ObjectCorrupt(corrupt_message(key, self.url, expected, got), key=key)
        return data

    def get_file(
        self, key: str, path: str | os.PathLike[str], progress: Progress | None = None
    ) -> None:
        key = check_key(key)
        with self._boundary(f"get {key} from", key):
            src_path = self._path(key)
            src = self._open_object(key, src_path)
        with src:
            with self._boundary(f"get {key} from", key):
                expected = self._stored_sha(key, src_path)
                total = os.fstat(src.fileno()).st_size

            def read(buf: bytearray) -> int:
                # Only reads are the target's; errors writing the destination stay OSErrors.
                with self._boundary(f"get {key} from", key):
                    return src.readinto(buf)

            with atomic_file(path) as out:
                got = _copy(read, out.write, total, progress)
                if got != expected:
                    raise ObjectCorrupt(corrupt_message(key, self.url, expected, got), key=key)

    def head(self, key: str) -> ObjectInfo | None:
        key = check_key(key)
        with self._boundary(f"head {key} in", key):
            self._require_root(f"head {key} in", key)
            path = self._path(key)
            try:
                st = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not stat.S_ISREG(st.st_mode):
                return None  # a directory: "wal" when only "wal/..." objects exist
            return ObjectInfo(key, st.st_size, self._read_meta(key, path))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        prefix = check_prefix(prefix)
        what = f"list {prefix!r} in" if prefix else "list"
        with self._boundary(what, None):
            self._require_root(what, None)
            # Walk only the deepest directory the prefix fully names, not the whole tree.
            start = self._root.joinpath(*prefix.split("/")[:-1])
            found = []
            for dirpath, dirnames, filenames in os.walk(start, onerror=_walk_error):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel_dir = Path(dirpath).relative_to(self._root).as_posix()
                for name in filenames:
                    if name.startswith(".") or name.endswith(META_SUFFIX):
                        continue  # temp files, the lock, metadata
                    key = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if key.startswith(prefix):
                        with suppress(FileNotFoundError):  # deleted while we walked
                            found.append(ObjectInfo(key, os.stat(os.path.join(dirpath, name)).st_size))
        found.sort(key=lambda info: info.key)
        return found

    # --- deleting -----------------------------------------------------------------------------

    def delete(self, keys: list[str]) -> None:
        keys = [check_key(key) for key in keys]  # all valid, or nothing deleted
        parents: set[Path] = set()
        for key in keys:
            with self._boundary(f"delete {key} from", key):
                self._require_root(f"delete {key} from", key)
                path = self._path(key)
                # The bytes before the metadata: a visible object always has its metadata.
                for victim in (path, _meta_path(path)):
                    # A directory at the key ("wal" when "wal/x" exists) is not an object.
                    with suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                        victim.unlink()
                parents.add(path.parent)
        # Emptied directories go too, deepest first, so retention leaves no skeleton behind.
        # rmdir refuses non-empty ones, and a put's temp files keep its directory non-empty.
        for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while directory != self._root:
                try:
                    directory.rmdir()
                except OSError:
                    break
                directory = directory.parent

    # --- helpers ------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self._root.joinpath(*key.split("/"))

    def _require_root(self, what: str, key: str | None) -> None:
        if not self._root.is_dir():
            raise TargetError(
                f"cannot {what} {self.url}: directory {self._root} does not exist (expected "
                "an existing directory; create it first, as you would create a bucket)",
                key=key,
            )

    def _open_object(self, key: str, path: Path) -> BinaryIO:
        self._require_root(f"get {key} from", key)
        try:
            return open(path, "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"cannot get {key} from {self.url}: not found", key=key) from exc

    def _makedirs(self, directory: Path) -> None:
        """Create the missing directories below the root, each made durable in its parent."""
        current = self._root
        for part in directory.relative_to(self._root).parts:
            parent, current = current, current / part
            try:
                current.mkdir()
            except FileExistsError:
                continue
            fsync_path(parent)

    def _read_meta(self, key: str, path: Path) -> dict[str, str]:
        meta = _meta_path(path)
        try:
            doc = json.loads(meta.read_bytes())
        except FileNotFoundError as exc:
            if not path.exists():  # deleted since we opened it, metadata and all
                raise NotFound(f"cannot read {key} in {self.url}: deleted meanwhile", key=key) from exc
            raise ObjectCorrupt(
                f"object {key} at {self.url} has no metadata file {meta.name} "
                "(put writes it before the object; something removed it)",
                key=key,
            ) from exc
        except ValueError as exc:
            raise ObjectCorrupt(
                f"object {key} at {self.url}: metadata file {meta.name} is not JSON: {exc}", key=key
            ) from exc
        metadata = doc.get("metadata") if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or doc.get("format") != META_FORMAT
            or not isinstance(metadata, dict)
            or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise ObjectCorrupt(
                f"object {key} at {self.url}: metadata file {meta.name} is not format "
                f"{META_FORMAT} with a metadata object of strings, got {clipped_repr(doc)}",
                key=key,
            )
        return metadata

    def _stored_sha(self, key: str, path: Path) -> str:
        sha = self._read_meta(key, path).get(SHA256_KEY)
        if sha is None:
            raise ObjectCorrupt(
                f"object {key} at {self.url}: metadata has no {SHA256_KEY!r} entry", key=key
            )
        return sha

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with exclusive_lock(self._root / LOCK_NAME):
            yield

    @contextmanager
    def _boundary(self, what: str, key: str | None) -> Iterator[None]:
        """Translate OS errors on the target's side into TargetError / TargetUnavailable."""
        try:
            yield
        except TargetError:
            raise
        except OSError as exc:
            error = TargetUnavailable if exc.errno in _TRANSIENT_ERRNOS else TargetError
            where = f" ({exc.filename})" if exc.filename else ""
            raise error(f"cannot {what} {self.url}: {exc.strerror or exc}{where}", key=key) from exc


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + META_SUFFIX)


def _copy(read: Callable[[bytearray], int | None], write: Callable[[memoryview], object],
          total: int, progress: Progress | None) -> str:
    """Copy chunk by chunk, hashing on the way; the hex sha256 of what was copied."""
    digest = hashlib.sha256()
    buf = bytearray(COPY_CHUNK_BYTES)
    view = memoryview(buf)
    done = 0
    while n := read(buf):
        digest.update(view[:n])
        write(view[:n])
        done += n
        if progress:
            progress(done, total)
    if progress and done == 0:
        progress(0, total)
    return digest.hexdigest()


def _walk_error(exc: OSError) -> None:
    # A directory that vanished (or never was) holds no objects; anything else (permissions,
    # I/O) must not make a listing silently incomplete: restore and retention trust it.
    if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        raise exc
