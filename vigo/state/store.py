"""The partition's state: one SQLite database (APSW, WAL mode) plus the trees beside it.

    DATA_DIR/
      state.db (+ -wal)     the database; the only source of truth
      stack/  secrets/  tls/  server.yaml
                            materialised copies of rows in the ``trees`` table

Every change to a tree is a row written in the same transaction as the change it belongs to,
and the files on disk are written from those rows after the commit. So one ordered stream of
WAL frames carries everything (for the replication and archive issues), and a crash between
commit and file write is repaired at the next start by ``materialise_trees``.

One connection, one writer: this object is owned by the primary actor, which runs one method
at a time. Automatic checkpoints are off because the primary is the only checkpointer (the
archiver must see every frame before it is checkpointed away); ``checkpoint()`` is called from
the primary's loop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw

from vigo.durable import atomic_file
from vigo.errors import StoreError
from vigo.state.stream import WalStream

log = logging.getLogger("vigo.state.store")

SCHEMA_VERSION = 1
TREES = ("stack", "secrets", "tls", "server.yaml")
#: Pages in the WAL past which the primary's loop runs a PASSIVE checkpoint.
CHECKPOINT_AFTER_PAGES = 4000

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE trees (
    tree TEXT NOT NULL, path TEXT NOT NULL, content BLOB NOT NULL, sha256 TEXT NOT NULL,
    mode INTEGER NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (tree, path));
CREATE TABLE bundles (
    serial INTEGER PRIMARY KEY, version TEXT NOT NULL, term INTEGER NOT NULL,
    pushed_at REAL NOT NULL, summary TEXT NOT NULL, bundle BLOB NOT NULL, secrets_sealed BLOB);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, uses_left INTEGER NOT NULL, uses_total INTEGER NOT NULL,
    note TEXT NOT NULL DEFAULT '');
CREATE TABLE envoys (
    id TEXT PRIMARY KEY, hostname TEXT NOT NULL, joined_at REAL NOT NULL, token_id TEXT,
    revoked_at REAL, traits TEXT, last_seen REAL, interval_s REAL, bundle_version TEXT,
    serial INTEGER, term INTEGER, queue_depth INTEGER, oldest_queued_at REAL,
    offline_runs INTEGER NOT NULL DEFAULT 0, last_run TEXT);
CREATE TABLE certs (
    serial TEXT PRIMARY KEY, envoy_id TEXT NOT NULL, issued_at REAL NOT NULL,
    not_after REAL NOT NULL, revoked_at REAL);
CREATE INDEX certs_envoy ON certs(envoy_id);
CREATE TABLE runs (
    run_id TEXT NOT NULL, envoy_id TEXT NOT NULL, kind TEXT NOT NULL,
    started_at REAL, finished_at REAL, received_at REAL NOT NULL, bundle_version TEXT,
    serial INTEGER, term INTEGER, noop INTEGER NOT NULL DEFAULT 0,
    offline INTEGER NOT NULL DEFAULT 0, ok INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0, report BLOB NOT NULL,
    PRIMARY KEY (envoy_id, run_id));
CREATE INDEX runs_envoy ON runs(envoy_id, started_at);
"""


class Store:
    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.db = apsw.Connection(str(self.data_dir / "state.db"))
            self.db.setbusytimeout(5000)
            mode = self.db.pragma("journal_mode", "wal")
            if str(mode).lower() != "wal":
                raise StoreError(f"cannot put {self.data_dir / 'state.db'} in WAL mode (got {mode})")
            # The primary is the only checkpointer: no checkpoint behind the stream's back, not
            # even the one SQLite runs when the last connection closes (the WAL must still hold
            # what the stream state says it sealed when the next process opens it).
            self.db.wal_autocheckpoint(0)
            self.db.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
            self._wal_frames = 0
            self.db.set_wal_hook(self._on_wal_commit)
            # An acknowledged write survives power loss: results are acknowledged after commit.
            self.db.pragma("synchronous", "FULL")
            self.db.pragma("foreign_keys", True)
            self._migrate()
        except apsw.Error as exc:
            raise StoreError(f"cannot open the server database in {self.data_dir}: {exc}") from exc
        self.stream = WalStream(self.db, self.data_dir / "state.db", self.data_dir / "stream",
                                term=lambda: int(self.get_meta("term", 1)))
        if self.stream.reason_for_new_generation:
            log.info("the state stream will start a new generation: %s", self.stream.reason_for_new_generation)

    def close(self) -> None:
        self.stream.close()
        self.db.close()
        self.stream.close_db_fd()

    # --- transactions -------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[apsw.Connection]:
        """One write transaction; trees touched inside it are written to disk after commit."""
        self._pending_files: list[tuple[str, str]] = []
        try:
            with self.db:
                yield self.db
        except apsw.FullError as exc:
            raise StoreError(f"the server disk is full: the write was rolled back ({exc})") from exc
        except apsw.Error as exc:
            raise StoreError(f"database write failed and was rolled back: {exc}") from exc
        self._seal()
        pending, self._pending_files = self._pending_files, []
        for tree, path in pending:
            try:
                self._materialise(tree, path)
            except OSError as exc:  # committed: the database is right, the copy is repaired at start
                log.error("cannot write %s/%s after commit: %s", tree, path, exc)

    def query(self, sql: str, args: tuple | dict = ()) -> list[tuple]:
        try:
            return list(self.db.execute(sql, args))
        except apsw.Error as exc:
            raise StoreError(f"database read failed: {exc}") from exc

    def one(self, sql: str, args: tuple | dict = ()) -> tuple | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    # --- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.one("SELECT value FROM meta WHERE key = ?", (key,))
        return default if row is None else row[0]

    def set_meta(self, db: apsw.Connection, key: str, value: Any) -> None:
        db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # --- trees --------------------------------------------------------------------------

    def put_file(self, db: apsw.Connection, tree: str, path: str, content: bytes, *, mode: int = 0o600) -> None:
        """Record a tree file in this transaction; it reaches the disk after the commit."""
        _check_tree_path(tree, path)
        db.execute(
            "INSERT INTO trees(tree, path, content, sha256, mode, updated_at) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(tree, path) DO UPDATE SET content=excluded.content, sha256=excluded.sha256, "
            "mode=excluded.mode, updated_at=excluded.updated_at",
            (tree, path, content, hashlib.sha256(content).hexdigest(), mode, time.time()),
        )
        self._pending_files.append((tree, path))

    def delete_tree(self, db: apsw.Connection, tree: str, prefix: str = "") -> None:
        rows = list(db.execute("SELECT path FROM trees WHERE tree = ? AND path LIKE ? || '%'", (tree, prefix)))
        db.execute("DELETE FROM trees WHERE tree = ? AND path LIKE ? || '%'", (tree, prefix))
        self._pending_files.extend((tree, r[0]) for r in rows)

    def get_file(self, tree: str, path: str) -> bytes | None:
        row = self.one("SELECT content FROM trees WHERE tree = ? AND path = ?", (tree, path))
        return None if row is None else bytes(row[0])

    def tree_files(self, tree: str, prefix: str = "") -> dict[str, bytes]:
        rows = self.query("SELECT path, content FROM trees WHERE tree = ? AND path LIKE ? || '%' ORDER BY path", (tree, prefix))
        return {r[0]: bytes(r[1]) for r in rows}

    def materialise_trees(self) -> int:
        """Rewrite every tree file from the database (after a crash between commit and write).
        A file that cannot be written is logged, never fatal: the database is the truth."""
        count = 0
        for tree, path in self.query("SELECT tree, path FROM trees"):
            try:
                self._materialise(tree, path)
                count += 1
            except OSError as exc:
                log.error("cannot write %s/%s from the database: %s", tree, path, exc)
        return count

    def _materialise(self, tree: str, path: str) -> None:
        row = self.one("SELECT content, mode FROM trees WHERE tree = ? AND path = ?", (tree, path))
        if row is None:
            write_tree_file(self.data_dir, tree, path, None, 0)
        else:
            write_tree_file(self.data_dir, tree, path, bytes(row[0]), int(row[1]))

    # --- maintenance --------------------------------------------------------------------

    def _seal(self) -> None:
        """Hand the commit's frames to the stream. The write is committed whatever happens
        here; a stream that cannot seal restarts in a new generation (with a snapshot) at the
        next write rather than ship a log with a hole in it."""
        try:
            self.stream.seal()
        except Exception as exc:
            log.error("cannot seal the committed WAL frames (%s): the stream restarts in a new generation", exc)
            self.stream.reason_for_new_generation = f"sealing failed: {exc}"

    def _on_wal_commit(self, _db: apsw.Connection, _name: str, pages: int) -> int:
        # SQLite reports the WAL's frame count after each commit. The WAL *file* never shrinks
        # after a checkpoint (it is reused from the start), so its size says nothing.
        self._wal_frames = pages
        if hasattr(self, "stream"):
            self.stream.wal_frames = pages
        return apsw.SQLITE_OK

    def wal_pages(self) -> int:
        """Frames in the WAL since it last restarted (as of the last commit)."""
        return self._wal_frames

    def checkpoint(self, *, force: bool = False) -> tuple[int, int] | None:
        """Seal, then PASSIVE checkpoint, once the WAL passed CHECKPOINT_AFTER_PAGES (or when
        forced). Returns (frames in the WAL, frames copied back)."""
        if not force and self._wal_frames < CHECKPOINT_AFTER_PAGES:
            return None
        result = self.stream.checkpoint()
        if result[0] == result[1]:
            self._wal_frames = 0  # all copied back: the next writer restarts the WAL
        return result

    def _migrate(self) -> None:
        version = self.db.pragma("user_version")
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database schema {version} is newer than this vigo understands ({SCHEMA_VERSION}); upgrade vigo"
            )
        with self.db:
            self.db.execute(_SCHEMA)
            self.db.pragma("user_version", SCHEMA_VERSION)
            self.db.execute("INSERT INTO meta(key, value) VALUES ('created_at', ?), ('term', 1)", (time.time(),))


def tree_file_path(data_dir: Path, tree: str, path: str) -> Path:
    _check_tree_path(tree, path)
    if tree == "server.yaml":
        return data_dir / "server.yaml"
    return data_dir / tree / path


def write_tree_file(data_dir: Path, tree: str, path: str, content: bytes | None, mode: int) -> None:
    """Write (or, for None, delete) one materialised tree file, atomically."""
    target = tree_file_path(data_dir, tree, path)
    if content is None:
        target.unlink(missing_ok=True)
        return
    for parent in reversed(target.parents):  # a folder that became a file, or the reverse
        if parent.is_file() and data_dir in parent.parents:
            parent.unlink()
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Not fsynced: the database holds the trees, and they are materialised again from it.
    with atomic_file(target, mode=mode, fsync=False, tmp=target.with_name(f".{target.name}.tmp")) as out:
        out.write(content)
        out.flush()
        os.fchmod(out.fileno(), mode)  # exactly ``mode``, whatever the umask


def read_trees(db_path: Path) -> dict[tuple[str, str], tuple[str, bytes, int]]:
    """(tree, path) -> (sha256, content, mode) from a database file no one else writes (a
    standby's, a restored one). The connection is opened and closed here."""
    conn = apsw.Connection(str(db_path))
    try:
        return {(r[0], r[1]): (r[2], bytes(r[3]), int(r[4]))
                for r in conn.execute("SELECT tree, path, sha256, content, mode FROM trees")}
    except apsw.Error as exc:
        raise StoreError(f"cannot read the trees from {db_path}: {exc}") from exc
    finally:
        conn.close()


def _check_tree_path(tree: str, path: str) -> None:
    if tree not in TREES:
        raise StoreError(f"unknown tree {tree!r} (expected one of {', '.join(TREES)})")
    parts = path.split("/")
    if tree != "server.yaml" and (not path or path.startswith("/") or ".." in parts or "" in parts or "\0" in path):
        raise StoreError(f"tree path {path!r} in {tree}/ must be relative, without '..' or empty parts")
