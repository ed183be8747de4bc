"""The envoy's durable state: one LMDB environment in ``STATE_DIR/cache``.

Named databases (every value msgpack):

    meta        envoy_id, highest serial and term accepted, trusted key, last run, queue bytes
    bundles     "current" and "previous": the signed parts of the last two accepted bundles,
                their secrets sealed with the local key (see vigo/crypto/aead.py)
    traits      "last": the traits of the last run
    queue       run reports not yet acknowledged by a server, key = 8-byte big-endian sequence
    runs        run_id -> queue key, so an acknowledgement by run id deletes in O(1)
    quarantine  entries that failed to decode, moved aside with the reason, never a crash

Why LMDB: a committed write transaction is durable and atomic (copy-on-write B+tree, fsync on
commit), so a ``kill -9`` at any instant leaves either the whole run's report in the queue or
none of it, never half. One process writes at a time (the run lock in engine.py); readers such
as ``vigo-envoy status`` never block it.

The queue is bounded by bytes (``queue_max_bytes``). Past the bound, the oldest reports are
folded into one *summary* record at the head of the queue that keeps their count, status
totals and time range, so a long outage costs detail, never the fact that runs happened (the
records and their counting: vigo/agent/queuefold.py).
"""

from __future__ import annotations

import logging
import os
import struct
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vigo.agent.queuefold import SUMMARY, QueueStats, fold, merge_summaries, tally
from vigo.errors import (
    BundleError,
    BundleRefusedError,
    CacheError,
    SecretError,
)
from vigo.policy.bundle import Bundle, verify_parts
from vigo.timefmt import iso

log = logging.getLogger("vigo.agent.cache")

#: LMDB's map is a sparse file; this is an upper bound on the cache's size on disk, not a cost.
DEFAULT_MAP_SIZE_BYTES = 1 << 30
#: Default bound on queued report bytes before the oldest are folded into a summary.
DEFAULT_QUEUE_MAX_BYTES = 64 * 1024 * 1024

_DBS = ("meta", "bundles", "traits", "queue", "runs", "quarantine")
_SEQ = struct.Struct(">Q")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


class Cache:
    """The envoy's LMDB cache. Not thread-safe for writers; one writing process at a time."""

    def __init__(
        self,
        state_dir: Path,
        *,
        sealer: Any = None,
        map_size_bytes: int = DEFAULT_MAP_SIZE_BYTES,
        queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES,
        readonly: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.queue_max_bytes = queue_max_bytes
        self.readonly = readonly
        self._sealer = sealer
        self._quarantine_later: list[tuple[str, bytes, bytes, str]] = []
        path = self.state_dir / "cache"
        try:
            if not readonly:
                self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                path.mkdir(mode=0o700, exist_ok=True)
            elif not (path / "data.mdb").exists():
                raise CacheError(f"no envoy cache in {self.state_dir} (expected {path}/data.mdb; has this envoy run yet?)")
            self.env = lmdb.open(
                str(path), max_dbs=len(_DBS), map_size=map_size_bytes, subdir=True,
                readonly=readonly, sync=True, metasync=True, mode=0o600,
            )
            self._db = {name: self.env.open_db(name.encode(), create=not readonly) for name in _DBS}
        except lmdb.Error as exc:
            raise CacheError(f"cannot open envoy cache {path}: {exc}") from exc
        except OSError as exc:
            raise CacheError(f"cannot create state directory {self.state_dir}: {exc.strerror or exc}") from exc
        if not readonly:
            self._ensure_identity()

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- low level --------------------------------------------------------------------

    def _write(self):
        return self.env.begin(write=True)

    def _get(self, txn: lmdb.Transaction, db: str, key: bytes) -> Any:
        """Decode one value; a value that fails to decode is quarantined and reads as None."""
        raw = txn.get(key, db=self._db[db])
        if raw is None:
            return None
        try:
            return _unpack(raw)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            self._quarantine_later.append((db, key, bytes(raw), f"does not decode as msgpack: {_why(exc)}"))
            return None

    def _flush_quarantine(self) -> None:
        """Quarantine what the last read found undecodable (a read-only cache only logs it)."""
        pending, self._quarantine_later = self._quarantine_later, []
        for db, key, raw, reason in pending:
            if self.readonly:
                log.warning("cache entry %s/%s is unreadable: %s", db, _key_text(db, key), reason)
            else:
                self.quarantine(db, key, raw, reason)

    def quarantine(self, db: str, key: bytes, raw: bytes | None, reason: str) -> None:
        """Move a bad entry aside (kept for inspection) and say so in the log.

        The entry is deleted only if it still holds ``raw``: quarantine runs after the
        transaction that found the bad value, which may already have replaced it with a good one
        (a newly accepted bundle over a corrupt "current", a fresh envoy id, a queue summary).
        A queue entry takes its run-index entries and its share of meta/queue_bytes with it.
        """
        log.warning("cache entry %s/%s quarantined: %s", db, _key_text(db, key), reason)
        record = {"db": db, "key": key, "raw": raw, "reason": reason, "at": time.time()}
        qkey = f"{time.time():.6f}:{db}:{key.hex()}".encode()
        try:
            with self._write() as txn:
                txn.put(qkey, _pack(record), db=self._db["quarantine"])
                stored = txn.get(key, db=self._db[db])
                if stored is not None and (raw is None or bytes(stored) == raw):
                    txn.delete(key, db=self._db[db])
                if db == "queue":
                    self._repair_queue_index(txn, key)
        except lmdb.Error as exc:
            raise CacheError(f"cannot quarantine cache entry {db}/{key!r}: {exc}") from exc

    def _repair_queue_index(self, txn: lmdb.Transaction, key: bytes) -> None:
        """After a bad queue entry was moved aside: drop run-index entries that point at its key
        (unless a good entry now there is theirs) and recount meta/queue_bytes. Rare, so a full
        scan is fine."""
        runs, queue = self._db["runs"], self._db["queue"]
        now = txn.get(key, db=queue)
        keep = None
        if now is not None:
            try:
                entry = _unpack(now)
                keep = str(entry["run_id"]).encode() if isinstance(entry, dict) else None
            except Exception:
                keep = None
        stale = [bytes(k) for k, v in txn.cursor(db=runs) if bytes(v) == key and bytes(k) != keep]
        for run_key in stale:
            txn.delete(run_key, db=runs)
        txn.put(b"queue_bytes", _pack(_queue_bytes(txn, self._db["queue"])), db=self._db["meta"])

    def _ensure_identity(self) -> None:
        self._quarantine_later = []
        with self._write() as txn:
            if self._get(txn, "meta", b"envoy_id") is None:
                txn.put(b"envoy_id", _pack(uuid.uuid4().hex), db=self._db["meta"])
                txn.put(b"created_at", _pack(time.time()), db=self._db["meta"])
        self._flush_quarantine()

    def meta(self, key: str, default: Any = None) -> Any:
        self._quarantine_later = []
        with self.env.begin() as txn:
            value = self._get(txn, "meta", key.encode())
        self._flush_quarantine()
        return default if value is None else value

    def set_meta(self, key: str, value: Any) -> None:
        self._put("meta", key.encode(), value)

    def update_meta(self, values: dict[str, Any]) -> None:
        """Set several meta keys in one transaction (all or none); a None value deletes its key."""
        try:
            with self._write() as txn:
                for key, value in values.items():
                    if value is None:
                        txn.delete(key.encode(), db=self._db["meta"])
                    else:
                        txn.put(key.encode(), _pack(value), db=self._db["meta"])
        except lmdb.Error as exc:
            raise CacheError(f"cannot write {', '.join(values)} to the envoy cache: {exc}") from exc

    def _put(self, db: str, key: bytes, value: Any) -> None:
        try:
            with self._write() as txn:
                txn.put(key, _pack(value), db=self._db[db])
        except lmdb.MapFullError as exc:
            raise CacheError(f"envoy cache is full writing {db}/{key.decode()} (map size {self.env.info()['map_size']} bytes)") from exc
        except lmdb.Error as exc:
            raise CacheError(f"cannot write {db}/{key.decode()} to the envoy cache: {exc}") from exc

    @property
    def envoy_id(self) -> str:
        return str(self.meta("envoy_id", ""))

    # --- bundles ----------------------------------------------------------------------

    def accept_bundle(self, bundle: Bundle) -> bool:
        """Make a verified bundle current, unless it would roll the envoy back.

        Returns False when it is the bundle already in force. Raises BundleRefusedError for a
        lower term, a lower serial, or a different bundle under an already-accepted serial; the
        last good bundle then stays in force.
        """
        self._quarantine_later = []
        try:
            with self._write() as txn:
                high_serial = self._get(txn, "meta", b"highest_serial") or 0
                high_term = self._get(txn, "meta", b"highest_term") or 0
                current = self._get(txn, "bundles", b"current")
                if current is not None and not isinstance(current, dict):
                    raw = bytes(txn.get(b"current", db=self._db["bundles"]))
                    self._quarantine_later.append(("bundles", b"current", raw, "cached bundle is not a map"))
                    current = None
                # the rollback floor survives an unreadable meta entry: cached bundles carry it too
                previous = self._get(txn, "bundles", b"previous")
                for seen in (current, previous):
                    if isinstance(seen, dict):
                        high_serial = max(_as_int(high_serial), _as_int(seen.get("serial")))
                        high_term = max(_as_int(high_term), _as_int(seen.get("term")))
                high_serial, high_term = _as_int(high_serial), _as_int(high_term)
                _check_not_older(bundle, high_serial, high_term, current)
                if current is not None and current.get("version") == bundle.version and current.get("serial") == bundle.serial:
                    return False
                if current is not None:
                    txn.put(b"previous", _pack(current), db=self._db["bundles"])
                txn.put(b"current", _pack(self._stored(bundle)), db=self._db["bundles"])
                txn.put(b"highest_serial", _pack(max(high_serial, bundle.serial)), db=self._db["meta"])
                txn.put(b"highest_term", _pack(max(high_term, bundle.term)), db=self._db["meta"])
        except lmdb.Error as exc:
            raise CacheError(f"cannot store bundle {bundle.version} serial {bundle.serial}: {exc}") from exc
        finally:
            self._flush_quarantine()
        log.info("accepted bundle %s serial %d term %d", bundle.version, bundle.serial, bundle.term)
        return True

    def _stored(self, bundle: Bundle) -> dict[str, Any]:
        sealed = None
        if bundle.raw_secrets is not None:
            if self._sealer is None:
                raise CacheError("cannot cache a bundle with secrets: no sealing key configured")
            sealed = self._sealer.seal(bundle.raw_secrets, b"bundle-secrets:" + bundle.version.encode())
        return {
            "version": bundle.version,
            "serial": bundle.serial,
            "term": bundle.term,
            "body": bundle.raw_body,
            "signature": bundle.raw_signature,
            "key_id": bundle.key_id,
            "secrets_sealed": sealed,
            "accepted_at": time.time(),
        }

    def load_bundle(self, trusted: Ed25519PublicKey, slot: str = "current") -> Bundle | None:
        """The bundle in ``slot``, re-verified. A bad entry is quarantined and reads as None."""
        self._quarantine_later = []
        with self.env.begin() as txn:
            entry = self._get(txn, "bundles", slot.encode())
            stored = txn.get(slot.encode(), db=self._db["bundles"])
            stored = None if stored is None else bytes(stored)
        self._flush_quarantine()
        if entry is None:
            return None
        try:
            raw_secrets = None
            if entry.get("secrets_sealed") is not None:
                if self._sealer is None:
                    raise SecretError("no sealing key to open the cached bundle's secrets")
                raw_secrets = self._sealer.open(
                    entry["secrets_sealed"], b"bundle-secrets:" + str(entry["version"]).encode()
                )
            return verify_parts(
                entry["body"], entry["signature"], entry.get("key_id", ""), raw_secrets, trusted,
                origin=f"cached {slot} bundle",
            )
        except (BundleError, SecretError, KeyError, TypeError, AttributeError) as exc:
            reason = f"cached bundle unusable: {_why(exc)}"
            if self.readonly:
                log.warning("cache entry bundles/%s is unusable: %s", slot, reason)
            else:
                self.quarantine("bundles", slot.encode(), stored, reason)
            return None

    def bundle_in_force(self, trusted: Ed25519PublicKey) -> Bundle | None:
        """Current bundle, or the previous one when the current entry is unusable."""
        bundle = self.load_bundle(trusted, "current")
        if bundle is None:
            bundle = self.load_bundle(trusted, "previous")
            if bundle is not None:
                log.warning("current cached bundle unusable; enforcing previous %s serial %d", bundle.version, bundle.serial)
        return bundle

    def drop_bundles(self) -> None:
        """Forget the cached bundles (after a join replaced the signing key: they can no longer
        be verified, and their serials belong to the old key's numbering)."""
        try:
            with self._write() as txn:
                for slot in (b"current", b"previous"):
                    txn.delete(slot, db=self._db["bundles"])
                txn.put(b"highest_serial", _pack(0), db=self._db["meta"])
        except lmdb.Error as exc:
            raise CacheError(f"cannot drop cached bundles: {exc}") from exc

    def bundle_info(self, slot: str = "current") -> dict[str, Any] | None:
        """Version, serial, term and acceptance time of a cached bundle, without verifying it."""
        self._quarantine_later = []
        with self.env.begin() as txn:
            entry = self._get(txn, "bundles", slot.encode())
        self._flush_quarantine()
        if not isinstance(entry, dict):
            return None
        return {k: entry.get(k) for k in ("version", "serial", "term", "accepted_at")}

    # --- traits -----------------------------------------------------------------------

    def store_traits(self, traits: dict[str, Any]) -> None:
        self._put("traits", b"last", traits)

    def last_traits(self) -> dict[str, Any] | None:
        self._quarantine_later = []
        with self.env.begin() as txn:
            value = self._get(txn, "traits", b"last")
        self._flush_quarantine()
        return value

    # --- results queue ----------------------------------------------------------------

    def enqueue(self, report: dict[str, Any], *, last_run: dict[str, Any] | None = None) -> int:
        """Commit one run report to the queue (and the last-run summary) durably; return its seq.

        This is the first thing that happens to a report: only after this returns may it be
        printed or sent anywhere.
        """
        raw = _pack(report)
        run_id = str(report["run_id"])
        self._quarantine_later = []
        try:
            with self._write() as txn:
                queue = self._db["queue"]
                cur = txn.cursor(db=queue)
                seq = _SEQ.unpack(cur.key())[0] + 1 if cur.last() else 1
                key = _SEQ.pack(seq)
                used = self._get(txn, "meta", b"queue_bytes")
                if not isinstance(used, int):  # missing (first report) or unreadable: recount
                    used = _queue_bytes(txn, queue)
                txn.put(key, raw, db=queue)
                txn.put(run_id.encode(), key, db=self._db["runs"])
                used += len(raw)
                if used > self.queue_max_bytes:
                    used = self._compact(txn, used)
                txn.put(b"queue_bytes", _pack(used), db=self._db["meta"])
                if last_run is not None:
                    txn.put(b"last_run", _pack(last_run), db=self._db["meta"])
        except lmdb.MapFullError as exc:
            raise CacheError(
                f"envoy cache is full: cannot queue report {run_id} ({len(raw)} bytes); "
                f"lower queue_max_bytes or free disk space"
            ) from exc
        except lmdb.Error as exc:
            raise CacheError(f"cannot queue report {run_id}: {exc}") from exc
        finally:
            self._flush_quarantine()
        return seq

    def _compact(self, txn: lmdb.Transaction, used: int) -> int:
        """Fold the oldest reports into the head summary until the queue fits its bound.

        The newest report always stays whole, so at least one full report survives any bound.
        The summary's own bytes count against the bound while folding (it is written back).
        """
        queue, runs = self._db["queue"], self._db["runs"]
        cur = txn.cursor(db=queue)
        summary: dict[str, Any] | None = None
        summary_key: bytes | None = None
        folded = 0
        last_key = cur.key() if cur.last() else None
        cur.first()
        while used + _packed_size(summary) > self.queue_max_bytes and cur.key() != last_key:
            key, raw = bytes(cur.key()), bytes(cur.value())
            try:
                entry = _unpack(raw)
            except Exception as exc:
                self._quarantine_later.append(("queue", key, raw, f"does not decode: {_why(exc)}"))
                entry = None
            if entry is not None and not isinstance(entry, dict):
                self._quarantine_later.append(("queue", key, raw, "queue entry is not a map"))
            if isinstance(entry, dict) and entry.get("kind") == SUMMARY:
                summary = entry if summary is None else merge_summaries(summary, entry)
            elif isinstance(entry, dict):
                summary = fold(summary, entry)
                folded += 1
            if isinstance(entry, dict):
                txn.delete(str(entry.get("run_id", "")).encode(), db=runs)
            cur.delete()  # moves the cursor to the next entry
            used -= len(raw)
            summary_key = key
        if summary is not None and summary_key is not None:
            raw = _pack(summary)
            txn.put(summary_key, raw, db=queue)
            txn.put(str(summary["run_id"]).encode(), summary_key, db=runs)
            used += len(raw)
            log.warning(
                "results queue over %d bytes: folded %d oldest reports into summary %s (%d runs, %s .. %s)",
                self.queue_max_bytes, folded, summary["run_id"], summary["count"],
                iso(summary["first_started_at"]), iso(summary["last_started_at"]),
            )
        return used

    def pending(self, *, limit: int = 100, max_bytes: int = 4 * 1024 * 1024) -> list[dict[str, Any]]:
        """Oldest-first queued reports (and summaries), at most ``limit`` items / ``max_bytes``."""
        out: list[dict[str, Any]] = []
        size = 0
        self._quarantine_later = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._db["queue"])
            for key, raw in cur:
                if len(out) >= limit or (out and size + len(raw) > max_bytes):
                    break
                try:
                    entry = _unpack(raw)
                except Exception as exc:
                    self._quarantine_later.append(("queue", bytes(key), bytes(raw), f"does not decode: {_why(exc)}"))
                    continue
                if not isinstance(entry, dict):
                    self._quarantine_later.append(("queue", bytes(key), bytes(raw), "queue entry is not a map"))
                    continue
                out.append(entry)
                size += len(raw)
        self._flush_quarantine()
        return out

    def ack(self, run_ids: Iterable[str]) -> int:
        """Delete acknowledged reports; unknown ids are ignored (an ack may arrive twice)."""
        removed = 0
        try:
            with self._write() as txn:
                used = self._get(txn, "meta", b"queue_bytes")
                if not isinstance(used, int):
                    used = _queue_bytes(txn, self._db["queue"])
                for run_id in run_ids:
                    key = txn.pop(str(run_id).encode(), db=self._db["runs"])
                    if key is None:
                        continue
                    raw = txn.pop(key, db=self._db["queue"])
                    if raw is not None:
                        used -= len(raw)
                        removed += 1
                txn.put(b"queue_bytes", _pack(max(used, 0)), db=self._db["meta"])
        except lmdb.Error as exc:
            raise CacheError(f"cannot delete acknowledged reports: {exc}") from exc
        return removed

    def quarantine_run(self, run_id: str, reason: str) -> bool:
        """Move one queued report aside by run id (a report no server will ever accept); False
        if it is no longer queued."""
        with self.env.begin() as txn:
            key = txn.get(str(run_id).encode(), db=self._db["runs"])
            raw = None if key is None else txn.get(key, db=self._db["queue"])
            key, raw = (None, None) if raw is None else (bytes(key), bytes(raw))
        if key is None:
            return False
        self.quarantine("queue", key, raw, reason)
        return True

    def queue_stats(self) -> QueueStats:
        with self.env.begin() as txn:
            return tally((len(raw), _decoded(raw)) for _key, raw in txn.cursor(db=self._db["queue"]))

    # --- inspection -------------------------------------------------------------------

    def quarantined(self) -> list[dict[str, Any]]:
        out = []
        with self.env.begin() as txn:
            for _key, raw in txn.cursor(db=self._db["quarantine"]):
                try:
                    record = _unpack(raw)
                    key = record["key"]
                    key = _key_text(record["db"], key) if isinstance(key, bytes) else str(key)
                    out.append({"db": record["db"], "key": key, "reason": record["reason"], "at": record["at"]})
                except Exception as exc:
                    out.append({"db": "?", "key": "?", "reason": f"undecodable quarantine record: {exc}", "at": None})
        return out

    def check(self) -> list[str]:
        """Decode every entry; return the problems found (empty means consistent)."""
        problems: list[str] = []
        with self.env.begin() as txn:
            for name in _DBS:
                for key, raw in txn.cursor(db=self._db[name]):
                    if name == "runs":
                        if txn.get(raw, db=self._db["queue"]) is None:
                            problems.append(f"runs/{bytes(key).decode(errors='replace')} points at a missing queue entry")
                        continue
                    try:
                        value = _unpack(raw)
                    except Exception as exc:
                        problems.append(f"{name}/{bytes(key)!r} does not decode: {_why(exc)}")
                        continue
                    if name == "queue" and not isinstance(value, dict):
                        problems.append(f"queue/{bytes(key)!r} is not a map")
            used = _queue_bytes(txn, self._db["queue"])
            recorded = txn.get(b"queue_bytes", db=self._db["meta"])
            try:
                recorded_bytes = None if recorded is None else _unpack(recorded)
            except Exception:
                recorded_bytes = None  # reported above as not decoding
            if recorded_bytes is not None and recorded_bytes != used:
                problems.append(f"meta/queue_bytes says {recorded_bytes} but the queue holds {used}")
        return problems


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _key_text(db: str, key: bytes) -> str:
    """A key as people read it: queue keys are 8-byte sequence numbers, shown as ``#N``."""
    if db == "queue" and len(key) == _SEQ.size:
        return f"#{_SEQ.unpack(key)[0]}"
    return key.decode(errors="replace")


def _decoded(raw: bytes) -> Any:
    """A value, or None when it does not decode (counted, not quarantined, by queue_stats)."""
    try:
        return _unpack(raw)
    except Exception:
        return None


def _packed_size(obj: Any) -> int:
    return 0 if obj is None else len(_pack(obj))


def _queue_bytes(txn: lmdb.Transaction, queue: Any) -> int:
    return sum(len(raw) for _key, raw in txn.cursor(db=queue))


def _why(exc: BaseException) -> str:
    """An exception as text, never empty (some msgpack errors carry no message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_not_older(bundle: Bundle, high_serial: int, high_term: int, current: dict[str, Any] | None) -> None:
    if bundle.term < high_term:
        raise BundleRefusedError(
            f"refusing bundle {bundle.version} from term {bundle.term}: this envoy has already "
            f"seen term {high_term} (a stale server cannot roll policy back)"
        )
    if bundle.serial < high_serial:
        raise BundleRefusedError(
            f"refusing bundle {bundle.version} serial {bundle.serial}: this envoy already accepted "
            f"serial {high_serial} (bundles never go backwards)"
        )
    if (
        current is not None
        and bundle.serial == current.get("serial")
        and bundle.version != current.get("version")
        and bundle.term == current.get("term")
    ):
        raise BundleRefusedError(
            f"refusing bundle {bundle.version} serial {bundle.serial}: serial {bundle.serial} was "
            f"already accepted with different content ({current.get('version')}); rebuild with a higher serial"
        )


def state_dir_default() -> Path:
    return Path(os.environ.get("VIGO_ENVOY_STATE_DIR", "/var/lib/vigo-envoy"))
