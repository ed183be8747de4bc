"""Backups: a partition's whole state as one encrypted, verifiable file (a "unit", ``*.vgb``).

A unit holds a consistent snapshot of the database (APSW's online backup API, taken inside one
read transaction, so a live server keeps writing while it is copied) and every file of the
trees ``stack/``, ``secrets/``, ``tls/`` and ``server.yaml``, read from the *snapshot's*
``trees`` table so everything is from one instant. The trees are also inside the database; as
separate entries they are cross-checked against it by ``verify_backup`` and can be read out of a
unit without SQLite.

This module holds the operations: create (from a live server's database, to a path or a
file:// or s3:// URL), list, verify, restore into a data dir. The unit's file format (framing,
sealed chunks, scrypt keys, header and manifest, reading a unit back) is
vigo/snapshots/backupformat.py; ``BackupKey`` and the format's constants are imported from
there and used through this module by vigocli and the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw

from vigo.durable import replace_durably
from vigo.errors import (
    BackupCorruptError,
    BackupError,
    ConfigError,
    VigoError,
)
from vigo.snapshots.backupformat import (
    CHUNK_BYTES,
    DATABASE_ENTRY,
    FORMAT_VERSION,
    MAGIC,
    MAX_CHUNK_BYTES,
    SUFFIX,
    BackupKey,
    Opened,
    Progress,
    decrypt_unit,
    entry_name,
    new_unit,
    read_header,
    write_unit,
)

# Re-exported: vigocli reads key files through this module, the tests its weakest scrypt cost.
from vigo.snapshots.backupformat import MIN_SCRYPT_N as MIN_SCRYPT_N
from vigo.snapshots.backupformat import key_file_secret as key_file_secret
from vigo.state.store import Store

#: Database pages copied per online-backup step (8 MiB at 4 KiB pages): the progress grain.
SNAPSHOT_STEP_PAGES = 2048
#: Files of the data dir a restore replaces (with --force). The database's side files go with
#: it: an old WAL beside a new database would be replayed into it.
_STATE_FILES = ("state.db", "state.db-wal", "state.db-shm", "state.db-journal")
_TREE_DIRS = ("stack", "secrets", "tls")


# --- create -------------------------------------------------------------------------------


def create_backup(conn: apsw.Connection, out: Path, key: BackupKey, *, partition: str,
                  progress: Progress | None = None, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """Write a unit of the database behind ``conn`` (a live one is fine) to ``out``, atomically.

    The snapshot and the unit are built in a private temp folder beside ``out`` (same file
    system, so the final rename is atomic; the plaintext snapshot never leaves that 0700 folder
    and is deleted at the end)."""
    started = time.monotonic()
    out = Path(out)
    if not 1024 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"backup chunk size must be 1024..{MAX_CHUNK_BYTES} bytes, got {chunk_bytes}")
    if out.exists():
        raise BackupError(f"cannot write backup {out}: it already exists (choose another name; "
                          "a backup is never overwritten)")
    if not out.parent.is_dir():
        raise BackupError(f"cannot write backup {out}: folder {out.parent} does not exist")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise BackupError(f"cannot write backup {out}: cannot create a temp folder in {out.parent}: {exc}") from exc
    try:
        snapshot = work / "snapshot.db"
        created_at, db_info = _snapshot(conn, snapshot, progress)
        entries, trees = _snapshot_entries(snapshot, chunk_bytes)
        header, manifest, keys = new_unit(key, created_at=created_at, partition=partition,
                                          chunk_bytes=chunk_bytes, database=db_info, entries=entries)
        unit = work / "unit.vgb"
        size = write_unit(unit, header, manifest, keys, snapshot, trees, chunk_bytes, progress)
        try:
            replace_durably(unit, out)
        except OSError as exc:
            raise BackupError(f"cannot move the finished backup into place at {out}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"path": str(out), "size": size, "entries": len(entries), "created_at": created_at,
            "partition": partition, "backup_id": header["backup_id"], "database_pages": db_info["page_count"],
            "seconds": round(time.monotonic() - started, 3)}


def _snapshot(conn: apsw.Connection, dest: Path, progress: Progress | None) -> tuple[float, dict[str, Any]]:
    """Copy the database into ``dest`` in steps, all inside one read transaction on ``conn``.

    The online backup API restarts whenever another connection writes between two steps, which
    on a busy server could go on for ever. Holding a read transaction across the steps pins one
    WAL snapshot instead: every step reads the same instant, writers are not blocked (WAL), and
    a checkpoint simply stops at our snapshot until it ends."""
    if conn.in_transaction:
        # Inside someone's transaction the copy could hold uncommitted changes, and ours
        # could not end it: the caller has a bug.
        raise BackupError("cannot take a database snapshot inside an open transaction")
    try:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchall()  # opens the read transaction
            created_at = time.time()
            target = apsw.Connection(str(dest))
            try:
                with target.backup("main", conn, "main") as step:
                    while not step.done:
                        step.step(SNAPSHOT_STEP_PAGES)
                        if progress:
                            progress("snapshot", step.pagecount - step.remaining, step.pagecount)
                # A plain rollback-journal file: self-contained, no -wal beside it. The Store
                # turns WAL back on when a restore opens it.
                target.pragma("journal_mode", "delete")
                info = {"entry": DATABASE_ENTRY, "page_count": int(target.pragma("page_count")),
                        "page_size": int(target.pragma("page_size")),
                        "schema_version": int(target.pragma("user_version"))}
            finally:
                target.close()
        finally:
            conn.execute("COMMIT")  # a read transaction: nothing to commit, only ends it
    except apsw.Error as exc:
        raise BackupError(f"cannot take a snapshot of the database into {dest}: {exc}") from exc
    return created_at, info


def _snapshot_entries(snapshot: Path, chunk_bytes: int) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Manifest entries (database first, then every tree file) and the tree contents."""
    digest, size = hashlib.sha256(), 0
    with open(snapshot, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
            size += len(block)
    entries = [{"name": DATABASE_ENTRY, "size": size, "sha256": digest.hexdigest()}]
    contents = []
    for tree, path, content, mode in _tree_rows(snapshot):
        entries.append({"name": entry_name(tree, path), "tree": tree, "path": path, "mode": mode,
                        "size": len(content), "sha256": hashlib.sha256(content).hexdigest()})
        contents.append(content)
    return entries, contents


def _tree_rows(db_path: Path) -> list[tuple[str, str, bytes, int]]:
    """The ``trees`` table of a snapshot, opened read-only."""
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [(r[0], r[1], bytes(r[2]), int(r[3]))
                for r in conn.execute("SELECT tree, path, content, mode FROM trees ORDER BY tree, path")]
    finally:
        conn.close()


# --- verify -------------------------------------------------------------------------------


def _verify_into(path: Path, label: str, secret: str | bytes | BackupKey, work: Path,
                 progress: Progress | None) -> dict[str, Any]:
    """Decrypt and check everything; leaves the database snapshot at ``work/state.db``."""
    started = time.monotonic()
    db_path = work / DATABASE_ENTRY
    opened, trees, size = decrypt_unit(path, label, secret, db_path, progress)
    if progress:
        progress("check", 0, 1)
    tables = _check_database(db_path, opened, trees)
    if progress:
        progress("check", 1, 1)
    manifest = opened.manifest
    return {
        "path": label, "format": opened.header["format"], "partition": manifest["partition"],
        "created_at": manifest["created_at"], "backup_id": manifest["backup_id"],
        "vigo_version": manifest["vigo_version"], "size": size,
        "entry_count": len(manifest["entries"]),
        "entries": [{"name": e["name"], "size": e["size"]} for e in manifest["entries"]],
        "database": {**manifest["database"], "integrity": "ok", "tables": tables},
        "seconds": round(time.monotonic() - started, 3),
    }


def _check_database(db_path: Path, opened: Opened, trees: dict[str, bytes]) -> dict[str, int]:
    """integrity_check, the page count, and the trees rows against the tree entries."""
    label, expected = opened.label, opened.manifest["database"]
    by_name = {e["name"]: e for e in opened.manifest["entries"][1:]}
    try:
        # Read-write on purpose: on a read-only connection integrity_check skips CHECK
        # constraints. The file is our private copy and nothing here writes to it.
        conn = apsw.Connection(str(db_path))
    except apsw.Error as exc:
        raise BackupCorruptError(f"backup {label}: the database snapshot does not open: {exc}") from exc
    try:
        try:
            problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(20)")]
            pages = int(conn.pragma("page_count"))
        except apsw.Error as exc:
            raise BackupCorruptError(f"backup {label}: the database snapshot cannot be read: {exc}") from exc
        if problems != ["ok"]:
            raise BackupCorruptError(f"backup {label}: the database snapshot fails PRAGMA integrity_check "
                                     f"(expected 'ok'): {'; '.join(problems[:5])}")
        if pages != expected["page_count"]:
            raise BackupCorruptError(f"backup {label}: the database snapshot has {pages} pages, "
                                     f"the manifest says {expected['page_count']}")
        tables = {name: conn.execute(f'SELECT COUNT(*) FROM "{name.replace(chr(34), chr(34) * 2)}"').fetchall()[0][0]
                  for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table' "
                                              "AND name NOT LIKE 'sqlite_%' ORDER BY name")}
        rows = [(r[0], r[1], bytes(r[2]), int(r[3]))
                for r in conn.execute("SELECT tree, path, content, mode FROM trees ORDER BY tree, path")]
    finally:
        conn.close()
    in_db = set()
    for tree, path, content, mode in rows:
        name = entry_name(tree, path)
        in_db.add(name)
        if name not in trees:
            raise BackupCorruptError(f"backup {label}: the database's trees row {name} has no entry in the unit")
        if trees[name] != content:
            raise BackupCorruptError(
                f"backup entry {name} differs from the database's trees row (sha256 "
                f"{hashlib.sha256(trees[name]).hexdigest()[:16]}... in the unit, "
                f"{hashlib.sha256(content).hexdigest()[:16]}... in the database)")
        if by_name[name].get("mode") != mode:
            raise BackupCorruptError(f"backup entry {name} has mode {by_name[name].get('mode')!r} in the "
                                     f"manifest, {oct(mode)} in the database")
    extra = sorted(set(trees) - in_db)
    if extra:
        raise BackupCorruptError(f"backup {label}: entries {', '.join(extra[:5])} are not rows of the "
                                 "database's trees table")
    return tables


def verify_backup(path: Path | str, passphrase_or_key: str | bytes | BackupKey,
                  progress: Progress | None = None, *, endpoint_url: str | None = None) -> dict[str, Any]:
    """Decrypt every entry, check every sha256, run integrity_check on the database snapshot and
    compare the tree entries with its ``trees`` rows. Raises a BackupError naming what failed.

    The snapshot is decrypted into a private (0700) temp folder and deleted afterwards: it holds
    the secrets in the clear while it exists."""
    with _local(path, progress=progress, endpoint_url=endpoint_url) as (local, label), \
            tempfile.TemporaryDirectory(prefix="vigo-verify-") as work:
        return _verify_into(local, label, passphrase_or_key, Path(work), progress)


# --- restore ------------------------------------------------------------------------------


def restore_backup(path: Path | str, key: str | bytes | BackupKey, data_dir: Path | str, *,
                   force: bool = False, progress: Progress | None = None,
                   endpoint_url: str | None = None) -> dict[str, Any]:
    """Verify the unit, then make ``data_dir`` hold its state: state.db (atomically) and the
    trees materialised from it. Refuses a non-empty ``data_dir`` unless ``force``; with force it
    replaces the database (and its -wal/-shm) and the trees, and reports what else it left.

    Nothing but the database and the trees is restored: a restored server starts a fresh archive
    generation and has no standbys until they are added again. Stop the server first."""
    started = time.monotonic()
    data_dir = Path(data_dir).resolve()
    if data_dir.exists() and not data_dir.is_dir():
        raise BackupError(f"cannot restore into {data_dir}: it is a file, expected a folder")
    existing = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    if existing and not force:
        shown = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
        raise BackupError(f"refusing to restore into {data_dir}: it is not empty (holds {shown}); "
                          "restore into a new folder, or pass --force to replace its state")
    created = not data_dir.exists()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Work inside the data dir: the same file system, so the database arrives by one rename,
    # and the plaintext snapshot never sits anywhere the restored secrets will not.
    work = Path(tempfile.mkdtemp(prefix=".vigo-restore-", dir=data_dir))
    try:
        with _local(path, work, progress, endpoint_url) as (local, label):
            result = _verify_into(local, label, key, work, progress)
        # The old database's side files go first (an old WAL would be replayed into the new
        # database), then one rename swaps the database, then the old trees go; from here on a
        # crash leaves the restored database in place and a start materialises its trees.
        target = data_dir / DATABASE_ENTRY
        try:
            removed = _remove(data_dir, _STATE_FILES[1:]) + ([DATABASE_ENTRY] if target.exists() else [])
            replace_durably(work / DATABASE_ENTRY, target)
            removed += _remove(data_dir, (*_TREE_DIRS, "server.yaml"))
        except OSError as exc:
            raise BackupError(f"cannot put the restored database in place at {target}: {exc}") from exc
        if progress:
            progress("restore", 0, 1)
        store = Store(data_dir)  # the server's store: its migration and WAL setup apply
        try:
            written = store.materialise_trees()
        finally:
            store.close()
        if progress:
            progress("restore", 1, 1)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    # What was there before and is not state we replace (the Store may have added its own
    # files since, like the stream's folder: those are not the operator's).
    kept = sorted(set(existing) - {*_STATE_FILES, *_TREE_DIRS, "server.yaml"})
    return {"data_dir": str(data_dir), "path": result["path"], "partition": result["partition"],
            "created_at": result["created_at"], "backup_id": result["backup_id"],
            "database_bytes": result["entries"][0]["size"], "tree_files": written,
            "replaced": sorted(removed), "kept": kept, "seconds": round(time.monotonic() - started, 3)}


def _remove(data_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Remove these files or folders of the data dir; the names of those that existed."""
    removed = []
    for name in names:
        target = data_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            continue
        removed.append(name)
    return removed


# --- list ---------------------------------------------------------------------------------


def list_backups(location: Path | str, progress: Progress | None = None, *,
                 endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Units in a folder (or under a file:// or s3:// prefix) with their plaintext header facts,
    newest first. A file that looks like a unit but cannot be read is listed with ``error``; a
    file that is neither named ``*.vgb`` nor starts with the magic is not a backup and skipped.
    Header facts are not authenticated until ``verify_backup``."""
    if _is_url(location):
        found = _list_target(str(location), progress, endpoint_url)
    else:
        folder = Path(location)
        if not folder.exists():
            raise BackupError(f"cannot list backups in {folder}: it does not exist")
        files = [folder] if folder.is_file() else sorted(
            p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        found = []
        for i, file in enumerate(files):
            item = _list_file(file)
            if item is not None:
                found.append(item)
            if progress:
                progress("list", i + 1, len(files))
    return sorted(found, key=lambda b: (b.get("error") is None, b.get("created_at") or 0), reverse=True)


def _list_file(file: Path) -> dict[str, Any] | None:
    item: dict[str, Any] = {"name": file.name, "location": str(file), "size": None,
                            "created_at": None, "partition": None, "format": None, "error": None}
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            item["size"] = size
            if f.read(len(MAGIC)) != MAGIC and file.suffix != SUFFIX:
                return None
            f.seek(0)
            header, _ = read_header(f, str(file), size)
    except (OSError, BackupError) as exc:
        item["error"] = str(exc)
        return item
    item.update(created_at=header["created_at"], partition=header["partition"], format=header["format"])
    return item


# --- targets (file:// and s3:// URLs) -----------------------------------------------------

# Object metadata a unit carries in an archive target, so `list` needs no download.
_META = ("vigo-backup-format", "created-at", "partition")


def _is_url(location: Path | str) -> bool:
    return isinstance(location, str) and location.startswith(("file://", "s3://"))


def _split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/dir/x.vgb`` -> (``s3://bucket/dir``, ``x.vgb``)."""
    base, _, key = url.rstrip("/").rpartition("/")
    if not key or base.endswith(":/") or "://" not in base:
        raise ConfigError(f"backup URL {url!r} must name an object, like s3://bucket/backups/p0.vgb")
    return base, key


def _open_target(url: str, endpoint_url: str | None) -> Any:
    """The archive target for a URL; ``endpoint_url`` (an S3-compatible service) for s3:// only.
    Imported here: boto3 loads only when a URL asks for it."""
    from vigo.snapshots.targets import open_target

    return open_target(url, endpoint_url=endpoint_url or None) if url.startswith("s3://") else open_target(url)


@contextlib.contextmanager
def _local(location: Path | str, work: Path | None = None, progress: Progress | None = None,
           endpoint_url: str | None = None) -> Iterator[tuple[Path, str]]:
    """A local path for a backup location, downloading a URL into ``work`` (or a temp folder)."""
    if not _is_url(location):
        yield Path(location), str(location)
        return
    base, key = _split_url(str(location))
    with contextlib.ExitStack() as stack:
        folder = work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vigo-backup-")))
        local = folder / "download.vgb"
        report = (lambda done, total: progress("download", done, total)) if progress else None
        _open_target(base, endpoint_url).get_file(key, local, report)
        yield local, str(location)


def _list_target(url: str, progress: Progress | None, endpoint_url: str | None) -> list[dict[str, Any]]:
    """Objects named ``*.vgb`` under the URL. Listings carry no metadata, so each one is
    ``head``-ed for the header facts ``create_backup_at`` stored with it."""
    base = url.rstrip("/")
    target = _open_target(base, endpoint_url)
    objects = [o for o in target.list("") if o.key.endswith(SUFFIX)]
    found = []
    for i, obj in enumerate(objects):
        item: dict[str, Any] = {"name": obj.key.rpartition("/")[2], "location": f"{base}/{obj.key}",
                                "size": obj.size, "created_at": None, "partition": None, "format": None,
                                "error": None}
        try:
            info = target.head(obj.key)
            meta = dict(info.metadata) if info is not None else {}
            item.update(created_at=float(meta["created-at"]), partition=meta["partition"],
                        format=int(meta["vigo-backup-format"]))
        except VigoError as exc:
            item["error"] = str(exc)
        except (KeyError, ValueError) as exc:
            item["error"] = (f"no vigo backup metadata on this object (missing or bad {exc}); "
                             "`vigocli backup verify` reads the unit itself")
        found.append(item)
        if progress:
            progress("list", i + 1, len(objects))
    return found


def create_backup_at(conn: apsw.Connection, out: str, key: BackupKey, *, partition: str,
                     work_dir: Path, endpoint_url: str | None = None) -> dict[str, Any]:
    """``create_backup`` to a path or URL (the server's ``backup.create``). A URL's unit is
    written to a temp folder in ``work_dir`` (the data dir: room for the database is known to
    be there), uploaded with the object metadata ``list_backups`` reads, and deleted."""
    if not _is_url(out):
        path = Path(out)
        if not path.is_absolute():
            raise ConfigError(f"backup --out must be an absolute path on the server host, got {out!r}")
        if path.is_dir():
            path = path / default_name(partition)
        return create_backup(conn, path, key, partition=partition)
    url = out.rstrip("/") + "/" + default_name(partition) if out.endswith("/") else out
    base, name = _split_url(url)
    target = _open_target(base, endpoint_url)
    if target.head(name) is not None:
        raise BackupError(f"cannot write backup {url}: it already exists (choose another name; "
                          "a backup is never overwritten)")
    with tempfile.TemporaryDirectory(prefix=".backup-upload-", dir=work_dir) as tmp:
        local = Path(tmp) / name
        result = create_backup(conn, local, key, partition=partition)
        started = time.monotonic()
        metadata = dict(zip(_META, (str(FORMAT_VERSION), repr(result["created_at"]), partition), strict=True))
        target.put_file(name, local, metadata)
        upload_s = time.monotonic() - started
    return {**result, "path": url, "seconds": round(result["seconds"] + upload_s, 3)}


def default_name(partition: str) -> str:
    """``vigo-p0-20250101T120000Z.vgb``: sorts by time, says what it holds."""
    return f"vigo-{partition}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}{SUFFIX}"
