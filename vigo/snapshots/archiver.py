"""The archiver: a stream consumer that ships sealed segments and snapshots to a target.

The primary's thread hands every segment and snapshot to ``on_segment``/``on_snapshot``, which
only write them to the local spool (DATA_DIR/archive-spool, numbered in arrival order) and
return; ``flush()`` makes the spool durable before each checkpoint. A background thread wakes
every ``sync_interval_s``, merges the spooled segments of one WAL index into one object, uploads
in order, and deletes a spool file only once the target has it. So a target outage never
blocks a write or a checkpoint: the spool grows (a loud warning and a status flag past
``spool_max_bytes``) and drains in order when the target answers again.

What the objects under the target are called is ``vigo.snapshots.layout``'s.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigo.durable import OPEN_MODE, atomic_write, fsync_path
from vigo.errors import TargetError, TargetUnavailable
from vigo.retry import Backoff
from vigo.snapshots import layout
from vigo.state.stream import Segment, Snapshot, decode_segment, encode_segment, merge_segments

log = logging.getLogger("vigo.snapshots.archiver")

#: Waits between upload attempts while the target is unreachable: 1 s, doubling up to 10 s
#: (no jitter: one uploader per partition, nothing to spread), seconds.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 10.0
#: Largest merged WAL object, bytes (a tick's segments beyond it go in the next object).
MAX_OBJECT_BYTES = 64 * 1024 * 1024
#: How often a spool past its bound is shouted about in the log, seconds.
SPOOL_WARNING_EVERY_S = 60.0


@dataclass
class _Spooled:
    seq: int
    path: Path
    kind: str  # "seg" | "snap"
    size: int
    committed_at: float
    segment: Segment | None = None
    snapshot: dict[str, Any] | None = None
    synced: bool = False


@dataclass
class ArchiveStatus:
    url: str
    spool_bytes: int = 0
    spool_files: int = 0
    spool_over_bound: bool = False
    lag_s: float = 0.0
    lag_bytes: int = 0
    uploaded: tuple[str, int, int] | None = None
    uploaded_at: float | None = None
    last_error: str | None = None
    objects_uploaded: int = 0
    bytes_uploaded: int = 0
    lags_s: list[float] = field(default_factory=list)  # recent commit -> uploaded delays


class Archiver:
    def __init__(self, target: Any, spool_dir: Path | str, *, partition: str, sync_interval_s: float = 1.0,
                 snapshot_interval_s: float = 86400.0, retention_s: float = 86400.0,
                 retention_check_s: float = 3600.0, spool_max_bytes: int = 1 << 30,
                 clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.partition = partition
        self.sync_interval_s = sync_interval_s
        self.snapshot_interval_s = snapshot_interval_s
        self.retention_s = retention_s
        self.retention_check_s = retention_check_s
        self.spool_max_bytes = spool_max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: list[_Spooled] = []
        self._seq = 0
        self._last_snapshot_at = 0.0
        self._next_retention = clock() + retention_check_s
        self._warned_at = 0.0
        self._backoff = Backoff(BACKOFF_BASE_S, BACKOFF_MAX_S, jitter=False, clock=clock)
        self.status_ = ArchiveStatus(url=getattr(target, "url", str(target)))
        self._uploaded_tail: tuple[str, int, int, tuple[int, int]] | None = None
        self._load_spool()

    # --- the consumer side (primary thread) ---------------------------------------------------

    def _load_spool(self) -> None:
        """Spool files left by a previous process upload first, in their order."""
        for tmp in self.spool_dir.glob("*.tmp"):
            tmp.unlink()  # a crash mid-write: the stream re-seals from its persisted position
        for path in sorted(self.spool_dir.iterdir()):
            seq_text, _, kind = path.name.partition(".")
            if not seq_text.isdigit():
                continue
            seq = int(seq_text)
            self._seq = max(self._seq, seq + 1)
            try:
                if kind == "seg":
                    seg = decode_segment(path.read_bytes(), name=str(path))
                    self._queue.append(_Spooled(seq, path, "seg", path.stat().st_size, seg.commits[0][2], segment=seg, synced=True))
                elif kind == "snap.json":
                    meta = json.loads(path.read_text())
                    db = path.with_name(f"{seq_text}.snap.db")
                    self._queue.append(_Spooled(seq, db, "snap", db.stat().st_size, meta["created_at"], snapshot=meta, synced=True))
            except Exception as exc:  # an unreadable spool file is set aside, never uploaded as is
                log.error("spool file %s is unreadable (%s): moved aside", path, exc)
                path.rename(path.with_name(path.name + ".bad"))
        self._queue.sort(key=lambda s: s.seq)
        if self._queue:
            log.info("archive spool holds %d items from a previous run; uploading them first", len(self._queue))

    def _write(self, name: str, data: bytes) -> Path:
        """A spool file, renamed into place whole; not fsynced here: ``flush`` does that for
        every item at once before a checkpoint (a ``*.tmp`` left by a crash goes at the next
        load)."""
        path = self.spool_dir / name
        atomic_write(path, data, mode=OPEN_MODE, fsync=False, tmp=path.with_name(name + ".tmp"))
        return path

    def _tail(self) -> tuple[str, int, int, tuple[int, int]] | None:
        """Where the archive's copy of the stream ends: the last spooled segment, else the last
        uploaded one (as recorded in uploaded.json)."""
        last = next((s.segment for s in reversed(self._queue) if s.kind == "seg"), None)
        if last is not None:
            return last.generation, last.index, last.end, last.checksum_end
        if self._uploaded_tail is None:
            try:
                raw = json.loads((self.spool_dir / "uploaded.json").read_text())
                self._uploaded_tail = (raw["generation"], int(raw["index"]), int(raw["end"]), tuple(raw["checksum"]))
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                return None
        return self._uploaded_tail

    def on_segment(self, seg: Segment) -> None:
        with self._lock:
            tail = self._tail()
            if tail is not None and (seg.generation, seg.index) == tail[:2] and seg.start < tail[2]:
                # Re-sealed after a crash (the stream saves its position after its consumers
                # saw the segment): keep only what the archive does not have yet.
                if seg.end <= tail[2]:
                    return
                seg = seg.trim_before(tail[2], tail[3])
            seq = self._seq
            self._seq += 1
            path = self._write(f"{seq:012d}.seg", encode_segment(seg))
            self._queue.append(_Spooled(seq, path, "seg", len(seg.data), seg.commits[0][2], segment=seg))
        self._check_bound()

    def on_snapshot(self, snap: Snapshot) -> None:
        meta = {"generation": snap.generation, "index": snap.index, "size": snap.size, "page_size": snap.page_size,
                "created_at": snap.created_at, "term": snap.term, "sha256": snap.sha256, "partition": self.partition}
        with self._lock:
            seq = self._seq
            self._seq += 1
            db = self.spool_dir / f"{seq:012d}.snap.db"
            try:
                os.link(snap.path, db)  # the stream deletes its copy at the next snapshot; the link keeps ours
            except OSError:
                import shutil

                shutil.copyfile(snap.path, db)
            self._write(f"{seq:012d}.snap.json", json.dumps(meta).encode())
            self._queue.append(_Spooled(seq, db, "snap", snap.size, snap.created_at, snapshot=meta))
            self._last_snapshot_at = snap.created_at
        self._wake.set()

    def flush(self) -> None:
        """Make every spooled item durable (before the primary checkpoints its WAL away)."""
        with self._lock:
            pending = [s for s in self._queue if not s.synced]
        for item in pending:
            try:
                fsync_path(item.path)
            except FileNotFoundError:
                continue  # uploaded meanwhile
            item.synced = True
        if pending:
            fsync_path(self.spool_dir)

    def snapshot_due(self) -> bool:
        return self.clock() - self._last_snapshot_at >= self.snapshot_interval_s

    def _check_bound(self) -> None:
        size = sum(s.size for s in self._queue)
        over = size > self.spool_max_bytes
        self.status_.spool_over_bound = over
        if over and self.clock() - self._warned_at >= SPOOL_WARNING_EVERY_S:
            self._warned_at = self.clock()
            log.error("ARCHIVE SPOOL OVER ITS BOUND: %d bytes waiting (bound %d) for %s; last error: %s",
                      size, self.spool_max_bytes, self.status_.url, self.status_.last_error)

    # --- the uploader (its own thread) -------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vigo-archiver", daemon=True)
        self._thread.start()

    def stop(self, *, drain_s: float = 5.0) -> None:
        """Stop the thread after one last upload attempt (bounded by ``drain_s``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=drain_s + 30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.sync_interval_s)
            self._wake.clear()
            self.upload_once()
            if self.clock() >= self._next_retention:
                self._next_retention = self.clock() + self.retention_check_s
                try:
                    self.enforce_retention()
                except Exception as exc:
                    log.error("archive retention failed: %s", exc)
        self.upload_once()

    def upload_once(self) -> int:
        """Upload what was spooled when this pass began, in order; stop at the first failure.
        Segments spooled meanwhile wait for the next tick: under a steady load a pass that
        chased them would never end, one small PUT after another. Returns objects sent."""
        if self._backoff.remaining() > 0:
            return 0
        with self._lock:
            last_seq = self._queue[-1].seq if self._queue else -1
        sent = 0
        while True:
            with self._lock:
                batch = [item for item in self._next_batch() if item.seq <= last_seq]
            if not batch:
                break
            try:
                self._upload(batch)
            except (TargetUnavailable, TargetError, OSError) as exc:
                wait = self._backoff.delay()
                if self.status_.last_error is None:
                    log.warning("archive upload to %s failed (%s); spooling, next try in %.0f s",
                                self.status_.url, exc, wait)
                self.status_.last_error = str(exc)
                with self._lock:
                    self._check_bound()
                break
            if self.status_.last_error is not None:
                log.warning("archive target %s answers again; spool draining", self.status_.url)
            self.status_.last_error = None
            self._backoff.reset()
            done_at = self.clock()
            with self._lock:
                for item in batch:
                    self._queue.remove(item)
                    if item.kind == "seg" and item.segment is not None:
                        for _, _, t in item.segment.commits:
                            self.status_.lags_s.append(done_at - t)
                    if item.kind == "snap":
                        item.path.with_name(f"{item.seq:012d}.snap.json").unlink(missing_ok=True)
                    item.path.unlink(missing_ok=True)
                del self.status_.lags_s[:-10000]
                self._check_bound()
            sent += 1
        return sent

    def _next_batch(self) -> list[_Spooled]:
        """The next object's worth: one snapshot, or consecutive segments of one index."""
        if not self._queue:
            return []
        first = self._queue[0]
        if first.kind == "snap":
            return [first]
        batch, size = [first], first.size
        for item in self._queue[1:]:
            prev = batch[-1].segment
            seg = item.segment
            if (item.kind != "seg" or seg is None or prev is None or size + item.size > MAX_OBJECT_BYTES
                    or (seg.generation, seg.index, seg.start) != (prev.generation, prev.index, prev.end)):
                break
            batch.append(item)
            size += item.size
        return batch

    def _upload(self, batch: list[_Spooled]) -> None:
        if batch[0].kind == "snap":
            meta = batch[0].snapshot or {}
            gen, index = meta["generation"], int(meta["index"])
            self.target.put_file(layout.snapshot_key(self.partition, gen, index), batch[0].path, {
                "created-ms": str(int(meta["created_at"] * 1000)), "term": str(meta["term"]),
                "page-size": str(meta["page_size"]), "db-sha256": meta["sha256"],
            })
            gen_key = layout.generation_record_key(self.partition, gen)
            if self.target.head(gen_key) is None:
                self.target.put(gen_key, json.dumps({
                    "generation": gen, "partition": self.partition, "created_at": meta["created_at"],
                    "term": meta["term"], "first_index": index}).encode(), {"created-ms": str(int(meta["created_at"] * 1000))})
            self.status_.uploaded = (gen, index, 0)
            size = batch[0].size
        else:
            seg = merge_segments([s.segment for s in batch if s.segment is not None])
            key = layout.segment_key(self.partition, seg.generation, seg.index, seg.start, seg.end)
            self.target.put(key, encode_segment(seg), {
                "first-commit-ms": str(int(seg.commits[0][2] * 1000)),
                "last-commit-ms": str(int(seg.commits[-1][2] * 1000)), "term": str(seg.term),
            })
            self.status_.uploaded = (seg.generation, seg.index, seg.end)
            self._write("uploaded.json", json.dumps({"generation": seg.generation, "index": seg.index,
                                                     "end": seg.end, "checksum": list(seg.checksum_end)}).encode())
            self._uploaded_tail = (seg.generation, seg.index, seg.end, seg.checksum_end)
            size = len(seg.data)
        self.status_.uploaded_at = self.clock()
        self.status_.objects_uploaded += 1
        self.status_.bytes_uploaded += size

    # --- retention ------------------------------------------------------------------------

    def enforce_retention(self) -> list[str]:
        """Keep snapshots newer than ``retention_s`` (at least the newest one) and the WAL needed
        to roll them forward; delete older generations and everything below the oldest kept
        snapshot of the current one. Returns the keys deleted."""
        cutoff = self.clock() - self.retention_s
        gens = layout.list_generations(self.target, self.partition)
        if not gens:
            return []
        doomed: list[str] = []
        newest = gens[-1]
        for gen in gens:
            kept = [s for s in gen.snapshots if s.created_at >= cutoff]
            if gen is newest and not kept and gen.snapshots:
                kept = [gen.snapshots[-1]]
            if not kept:
                doomed += [o.key for o in self.target.list(layout.generation_prefix(self.partition, gen.generation) + "/")]
                continue
            floor = min(s.index for s in kept)
            doomed += [s.key for s in gen.snapshots if s.index < floor]
            doomed += [o.key for o in gen.wal if o.index < floor]
        if doomed:
            self.target.delete(doomed)
            log.info("archive retention deleted %d objects older than %.0f s", len(doomed), self.retention_s)
        return doomed

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            queue = list(self._queue)
        st = self.status_
        oldest = min((s.committed_at for s in queue), default=None)
        lag_s = 0.0 if oldest is None else max(0.0, self.clock() - oldest)
        return {
            "url": st.url, "spool_bytes": sum(s.size for s in queue), "spool_files": len(queue),
            "spool_over_bound": st.spool_over_bound, "spool_max_bytes": self.spool_max_bytes,
            "lag_s": round(lag_s, 3), "lag_bytes": sum(s.size for s in queue if s.kind == "seg"),
            "uploaded": list(st.uploaded) if st.uploaded else None, "uploaded_at": st.uploaded_at,
            "last_error": st.last_error, "objects_uploaded": st.objects_uploaded, "bytes_uploaded": st.bytes_uploaded,
        }
