"""A member's data dir made the birth state of a new cluster: the way on when the Ray head's host
is lost for good.

Ray's GCS and control's topology live on the head's disk. Ray can keep its GCS on an external
Redis, but vigo's control topology (the deployment, the partition's route and term) and the
primary's database are files on the head's host: a new head that took the old one's address
and label would find neither and start an empty primary, whose new generation a surviving
standby would then follow. So a lost head is replaced by a new cluster built from the
survivor that holds the newest commit, which in synchronous mode holds every acknowledged
write:

    on each surviving host, with Ray stopped there:   vigocli server adopt --check --data-dir DIR
    on the one holding the newest commit:             vigocli server adopt --data-dir DIR
    then `ray up` a cluster.yaml whose head is that host (docs/operations.md).

``inspect`` reads a data dir without changing it. ``adopt`` checks the database (size against
the last applied commit, ``PRAGMA integrity_check``), raises the term above every term the dir
has seen (so anything of the old cluster that ever speaks again is fenced, and envoys, which
refuse a lower term than they have seen, accept the new one), and removes the replication and
archive state: the first primary started on it begins a new stream generation with a
snapshot, as after a restore. The database itself, and so every envoy's identity, the fleet CA,
the stack and the queued reports already stored, is kept as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import apsw

from vigo.errors import ConfigError
from vigo.snapshots.restore import check_database
from vigo.state.apply import Applier
from vigo.state.store import Store
from vigo.timefmt import iso


def inspect(data_dir: Path | str) -> dict[str, Any]:
    """What a member's data dir holds: the role it last had, its position and terms. Reads
    only (the database opened read-only)."""
    data_dir = Path(data_dir)
    db = data_dir / "state.db"
    if not db.exists():
        raise ConfigError(f"{data_dir} holds no state.db: not a vigo member's data dir")
    stream = data_dir / "stream"
    applier = Applier(db, stream / "apply.json")
    if applier.state is not None or (stream / "standby.json").exists():
        role = "standby"
        position = applier.position()
        committed_at = applier.state.committed_at if applier.state else 0.0
    else:
        role = "primary"
        state = _json(stream / "state.json")
        position = (state["generation"], state["index"], state["offset"]) if state else None
        committed_at = 0.0
    terms = [_db_term(db), int((_json(stream / "standby.json") or {}).get("term") or 0),
             applier.state.term if applier.state else 0]
    return {
        "data_dir": str(data_dir), "role": role, "position": list(position) if position else None,
        "committed_at": committed_at or None, "committed_at_iso": iso(committed_at) if committed_at else None,
        "term": max(terms), "database_bytes": db.stat().st_size,
        "complete": role == "primary" or applier.state is not None,
    }


def adopt(data_dir: Path | str) -> dict[str, Any]:
    """Make ``data_dir`` the birth state of a new cluster's primary (see the module docstring).
    ConfigError, nothing changed, when the dir holds no complete copy of the database."""
    data_dir = Path(data_dir)
    before = inspect(data_dir)
    if not before["complete"]:
        raise ConfigError(f"{data_dir} is a standby without a complete copy (it was between snapshots): "
                          "adopt another survivor, or restore from the archive (`vigocli restore`)")
    stream = data_dir / "stream"
    if before["role"] == "standby":
        applier = Applier(data_dir / "state.db", stream / "apply.json")
        check_database(data_dir / "state.db", applier)
    term = int(before["term"]) + 1
    # The replication state goes first: a dir with neither stream state nor a standby's files is
    # a primary's, whose next start begins a new generation.
    shutil.rmtree(stream, ignore_errors=True)
    shutil.rmtree(data_dir / "archive-spool", ignore_errors=True)
    store = Store(data_dir)
    try:
        with store.write() as db:
            store.set_meta(db, "term", term)
        trees = store.materialise_trees()
    finally:
        store.close()
    # Opening the store wrote stream state for the generation it would have continued; the new
    # primary starts its own, announced to its standbys with a snapshot.
    shutil.rmtree(stream, ignore_errors=True)
    return {**before, "was": before["role"], "role": "primary", "term_before": before["term"], "term": term,
            "tree_files": trees}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _db_term(db: Path) -> int:
    if Path(f"{db}-wal").exists():  # a primary's: the newest term may be in its WAL
        conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    else:  # a standby's database is whole in its file: read it without leaving -shm/-wal behind
        conn = apsw.Connection(f"file:{db}?immutable=1", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        row = list(conn.execute("SELECT value FROM meta WHERE key = 'term'"))
    except apsw.Error as exc:
        raise ConfigError(f"{db} cannot be read as vigo's database: {exc}") from exc
    finally:
        conn.close()
    return int(row[0][0]) if row else 1
