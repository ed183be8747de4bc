"""The state stream: every committed transaction's WAL frames, sealed in order, with positions.

One partition's database has one writer (the primary) and one checkpointer (the same primary).
After every commit the writer calls ``seal()``: the new committed frames are read from the WAL
file, their salts and checksum chain verified, and handed to each consumer as a ``Segment``.
Nothing past the last commit frame is ever sealed, and ``checkpoint()`` seals first and runs
the checkpoint itself, so no frame is copied into the database before its consumers have it.

Positions are ``(generation, index, offset)``:

- generation: 16 hex characters, a new one whenever continuity cannot be proven (no stream
  state, the WAL changed behind our back, a restored or promoted database); each generation
  starts with a snapshot, and nothing ever crosses from one generation to another.
- index: the WAL restart counter within a generation. Our complete checkpoint lets the next
  writer rewind the WAL (new salts): that starts index + 1 at offset 0.
- offset: byte offset in the index's WAL, just past the last sealed commit frame. Segments
  starting at 0 carry the 32-byte WAL header.

A consumer is anything with ``on_segment(segment)``, ``on_snapshot(snapshot)`` and ``flush()``
(called before a checkpoint so its copy is durable first): the standby replicator and the
archiver. Consumers are idempotent by position, so a segment re-sealed after a crash (the stream
state is persisted after the consumers saw it) is trimmed or skipped by them, never doubled.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import apsw

from vigo.durable import atomic_file, atomic_write
from vigo.errors import StoreError, WalFormatError
from vigo.state import walformat as wf

log = logging.getLogger("vigo.state.stream")

#: Largest WAL read per seal, bytes: a huge transaction is sealed in one go anyway (a segment
#: always ends on a commit frame), this only bounds the read of frames nobody committed.
MAX_SEAL_READ_BYTES = 512 * 1024 * 1024
#: A new generation before the index counter could overflow a signed 32-bit field.
MAX_INDEX = 0x7FFFFFFF
#: Longest time between two saves of the stream position outside checkpoints, seconds.
STATE_SAVE_INTERVAL_S = 1.0


def new_generation() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Segment:
    """Committed WAL bytes ``[start, end)`` of one index. ``commits`` lists each transaction
    inside: (end offset, database pages after it, commit time as seen by the sealer)."""

    generation: str
    index: int
    start: int
    end: int
    data: bytes
    page_size: int
    salts: tuple[int, int]
    checksum_start: tuple[int, int]  # the chain's value at ``start`` (header checksum at 32)
    checksum_end: tuple[int, int]
    commits: tuple[tuple[int, int, float], ...]
    term: int
    #: Set on an index's first segment: where the previous index of this generation ended
    #: (its last offset), so a receiver can tell it has all of the previous index.
    closes: int | None = None

    @property
    def committed_at(self) -> float:
        return self.commits[-1][2]

    def trim_before(self, offset: int, chain: tuple[int, int]) -> Segment:
        """The part of this segment after ``offset`` (a commit boundary the receiver already
        has, with the chain value there): what a receiver applies after a resend overlap."""
        if offset <= self.start:
            return self
        if offset >= self.end:
            raise StoreError(f"segment {self.describe()} ends before offset {offset}")
        if not any(end == offset for end, _, _ in self.commits):
            raise StoreError(f"offset {offset} is not a commit boundary of segment {self.describe()}")
        return replace(self, start=offset, data=self.data[offset - self.start:], checksum_start=chain,
                       commits=tuple(c for c in self.commits if c[0] > offset), closes=None)

    def cut_at(self, commit_end: int) -> Segment:
        """The prefix of this segment through the commit ending at ``commit_end`` (for point in
        time restore; cutting on a commit keeps the checksum chain valid)."""
        kept = tuple(c for c in self.commits if c[0] <= commit_end)
        if not kept or kept[-1][0] != commit_end:
            raise StoreError(f"offset {commit_end} is not a commit boundary of segment {self.describe()}")
        data = self.data[:commit_end - self.start]
        return replace(self, end=commit_end, data=data, commits=kept,
                       checksum_end=wf.frame_checksum_at(data, len(data) - (wf.FRAME_HEADER_BYTES + self.page_size)))

    def describe(self) -> str:
        return f"{self.generation}/{self.index:08x}/{self.start:016x}-{self.end:016x}"


@dataclass(frozen=True)
class Snapshot:
    """The database file as it is at the start of ``index`` (WAL empty), at ``path``."""

    generation: str
    index: int
    path: Path
    size: int
    page_size: int
    created_at: float
    term: int
    sha256: str


class Consumer(Protocol):
    def on_segment(self, segment: Segment) -> None: ...

    def on_snapshot(self, snapshot: Snapshot) -> None: ...

    def flush(self) -> None: ...


@dataclass
class StreamState:
    """Persisted in DATA_DIR/stream/state.json at most every STATE_SAVE_INTERVAL_S after seals,
    durably at checkpoints, snapshots and close."""

    generation: str
    index: int
    offset: int = 0  # just past the last sealed commit frame; 0 = the index has not begun
    salts: tuple[int, int] | None = None
    checksum: tuple[int, int] | None = None
    page_size: int = 0
    magic: int = 0
    #: Our last checkpoint copied every frame: the next writer may rewind the WAL. A rewind
    #: without this is someone else's checkpoint, and continuity is lost.
    restart_expected: bool = False
    index_ends: dict[str, int] = field(default_factory=dict)  # last offset of closed indexes (recent)


class WalStream:
    """The sealer, owned by the store (one writer, one thread: no locks here)."""

    def __init__(self, db: apsw.Connection, db_path: Path, state_dir: Path, *, term: Callable[[], int],
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.db_path = Path(db_path)
        self.wal_path = Path(f"{db_path}-wal")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.term = term
        self.clock = clock
        self.consumers: list[Consumer] = []
        self.last_snapshot: Snapshot | None = None
        self.wal_frames: int | None = None  # from the WAL hook: frames in the WAL as of the last commit
        # A descriptor on the database file for snapshot copies, opened once for the store's
        # life: closing any descriptor of the file would drop SQLite's POSIX locks on it.
        self._db_fd = os.open(self.db_path, os.O_RDONLY)
        self._wal_fd: int | None = None
        self._wal_ino: int | None = None
        self._saved_at = 0.0
        self.state = self._load_state()
        self.reason_for_new_generation: str | None = None if self.state else "no stream state"
        if self.state is not None:
            self.reason_for_new_generation = self._verify_continuity()

    # --- state --------------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.state_dir / "state.json"

    def _load_state(self) -> StreamState | None:
        try:
            raw = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("stream state %s is unreadable (%s): starting a new generation", self._state_path, exc)
            return None
        for key in ("salts", "checksum"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        try:
            return StreamState(**raw)
        except TypeError as exc:
            log.warning("stream state %s has unexpected fields (%s): starting a new generation", self._state_path, exc)
            return None

    def _save_state(self, *, durable: bool = False) -> None:
        assert self.state is not None
        self._saved_at = self.clock()
        atomic_write(self._state_path, json.dumps(asdict(self.state)).encode(), fsync=durable,
                     tmp=self._state_path.with_suffix(".tmp"))

    def position(self) -> tuple[str, int, int] | None:
        return None if self.state is None else (self.state.generation, self.state.index, self.state.offset)

    # --- reading the WAL ------------------------------------------------------------------

    def _wal(self) -> int | None:
        """A descriptor on the WAL file (reopened if SQLite replaced it), or None if absent."""
        try:
            st = os.stat(self.wal_path)
        except FileNotFoundError:
            return None
        if self._wal_fd is None or st.st_ino != self._wal_ino:
            if self._wal_fd is not None:
                os.close(self._wal_fd)
            self._wal_fd = os.open(self.wal_path, os.O_RDONLY)
            self._wal_ino = st.st_ino
        return self._wal_fd

    def _read(self, offset: int, size: int) -> bytes:
        fd = self._wal()
        if fd is None:
            return b""
        return os.pread(fd, size, offset)

    def _wal_size(self) -> int:
        fd = self._wal()
        return 0 if fd is None else os.fstat(fd).st_size

    def _verify_continuity(self) -> str | None:
        """None if the WAL on disk continues exactly where the stored state says we stopped,
        else why not (which forces a new generation)."""
        st = self.state
        assert st is not None
        if st.offset == 0:
            return None if st.restart_expected else "stream state has no position"
        raw = self._read(0, wf.WAL_HEADER_BYTES)
        if len(raw) < wf.WAL_HEADER_BYTES:
            return f"the WAL is gone or empty but {st.offset} bytes of index {st.index} were sealed"
        try:
            header = wf.parse_header(raw)
        except WalFormatError as exc:
            return f"the WAL header is unreadable ({exc})"
        if header.salts != st.salts:
            if st.restart_expected:
                return None  # rewound after our own complete checkpoint: seal() opens the next index
            return "the WAL was rewound by a checkpoint this server did not run"
        if st.offset > wf.WAL_HEADER_BYTES:
            tail = self._read(st.offset - header.frame_bytes, header.frame_bytes)
            if len(tail) < header.frame_bytes or wf.frame_checksum_at(tail, 0) != st.checksum:
                return f"the WAL frame ending at offset {st.offset} is not the one sealed there"
        return None

    # --- sealing --------------------------------------------------------------------------

    def seal(self) -> Segment | None:
        """Seal every committed frame not yet sealed and hand the segment to the consumers."""
        st = self.state
        if st is None or self.reason_for_new_generation:
            self.start_generation(self.reason_for_new_generation or "no stream state")
            st = self.state
            assert st is not None
        header_raw = self._read(0, wf.WAL_HEADER_BYTES)
        if len(header_raw) < wf.WAL_HEADER_BYTES:
            return None  # empty WAL: nothing committed since the last truncation
        header = wf.parse_header(header_raw)
        closes = None
        if st.offset and header.salts != st.salts:
            if not st.restart_expected:
                self.start_generation("the WAL was rewound by a checkpoint this server did not run")
                return None
            closes = st.offset
            st.index_ends = {k: v for k, v in st.index_ends.items() if int(k) > st.index - 8}
            st.index_ends[str(st.index)] = st.offset
            st.index += 1
            st.offset = 0
            if st.index > MAX_INDEX:
                self.start_generation("the WAL index counter is about to overflow")
                return None
        elif st.offset == 0 and st.index_ends.get(str(st.index - 1)) is not None:
            closes = st.index_ends[str(st.index - 1)]
        start = st.offset
        if start == 0:
            chain = header.checksum
            st.salts, st.page_size, st.magic, st.restart_expected = header.salts, header.page_size, header.magic, False
        else:
            chain = st.checksum
        assert chain is not None
        frames_from = max(start, wf.WAL_HEADER_BYTES)
        if self.wal_frames is not None:
            limit = wf.WAL_HEADER_BYTES + self.wal_frames * header.frame_bytes
        else:
            limit = self._wal_size()
        limit = min(limit, frames_from + MAX_SEAL_READ_BYTES)
        if limit <= frames_from:
            return None
        body = self._read(frames_from, limit - frames_from)
        scan = wf.scan_frames(body, frames_from, header, chain)
        if not scan.commits:
            return None
        data = (header_raw if start == 0 else b"") + body[:scan.commit_end - frames_from]
        now = self.clock()
        segment = Segment(
            generation=st.generation, index=st.index, start=start, end=scan.commit_end, data=data,
            page_size=header.page_size, salts=header.salts, checksum_start=chain if start else header.checksum,
            checksum_end=scan.checksum, commits=tuple((c.end, c.db_pages, now) for c in scan.commits),
            term=self.term(), closes=closes,
        )
        for consumer in self.consumers:
            consumer.on_segment(segment)
        st.offset, st.checksum = scan.commit_end, scan.checksum
        # Saved at most every STATE_SAVE_INTERVAL_S (and durably at every checkpoint): after a
        # crash the stream re-seals from an older position on the same log, and consumers,
        # idempotent by position, trim what they already have. A file rename per commit
        # would cost a third of the write path.
        if self.clock() - self._saved_at >= STATE_SAVE_INTERVAL_S:
            self._save_state()
        return segment

    # --- checkpoints and snapshots --------------------------------------------------------------

    def checkpoint(self) -> tuple[int, int]:
        """Seal, make every consumer's copy durable, then PASSIVE-checkpoint. Returns
        (frames in the WAL, frames copied into the database)."""
        self.seal()
        for consumer in self.consumers:
            consumer.flush()
        assert self.state is not None
        log_frames, done = self.db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        if log_frames >= 0 and done == log_frames:
            self.state.restart_expected = True
        self._save_state(durable=True)
        return log_frames, done

    def start_generation(self, reason: str) -> Snapshot:
        """Begin a new generation (with its snapshot)."""
        log.warning("starting a new stream generation: %s", reason)
        self.reason_for_new_generation = None
        return self._snapshot(new_generation(), 0)

    def snapshot(self) -> Snapshot:
        """A snapshot within this generation (scheduled, or for a standby that fell behind):
        everything sealed, TRUNCATE checkpoint, copy of the database file; index + 1 begins."""
        if self.state is None or self.reason_for_new_generation:
            return self.start_generation(self.reason_for_new_generation or "no stream state")
        self.seal()
        # An index that has not begun (nothing sealed since the last snapshot) is reused.
        return self._snapshot(self.state.generation, self.state.index + (1 if self.state.offset else 0))

    def _snapshot(self, generation: str, index: int) -> Snapshot:
        for consumer in self.consumers:
            consumer.flush()
        try:
            self.db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
        except apsw.BusyError as exc:
            raise StoreError(f"cannot snapshot the database: the TRUNCATE checkpoint was blocked ({exc})") from exc
        ends = {}
        if self.state is not None and self.state.generation == generation:
            ends = dict(self.state.index_ends)
            if self.state.offset:
                ends[str(self.state.index)] = self.state.offset
        self.state = StreamState(generation=generation, index=index, restart_expected=True, index_ends=ends)
        # The WAL is empty now and only checkpoints write the database file: the copy is the
        # database as of the start of ``index``.
        path = self.state_dir / f"snapshot-{generation}-{index:08x}.db"
        size, digest = _copy_fd(self._db_fd, path)
        page_size = int(self.db.pragma("page_size"))
        snap = Snapshot(generation, index, path, size, page_size, self.clock(), self.term(), digest)
        for old in self.state_dir.glob("snapshot-*.db"):
            if old != path:
                old.unlink(missing_ok=True)
        self.last_snapshot = snap
        self._save_state(durable=True)
        for consumer in self.consumers:
            consumer.on_snapshot(snap)
        log.info("snapshot %s/%08x taken (%d bytes)", generation, index, size)
        return snap

    def close(self) -> None:
        if self.state is not None and not self.reason_for_new_generation:
            self._save_state(durable=True)
        for fd in (self._wal_fd,):
            if fd is not None:
                os.close(fd)
        self._wal_fd = None
        # The database descriptor is closed by the store after SQLite's connection.

    def close_db_fd(self) -> None:
        os.close(self._db_fd)


def _copy_fd(src_fd: int, dest: Path, chunk: int = 8 * 1024 * 1024) -> tuple[int, str]:
    import hashlib

    digest = hashlib.sha256()
    offset = 0
    with atomic_file(dest, tmp=dest.with_suffix(".tmp")) as out:
        while True:
            data = os.pread(src_fd, chunk, offset)
            if not data:
                break
            out.write(data)
            digest.update(data)
            offset += len(data)
    return offset, digest.hexdigest()


# --- segments as bytes (the archive's objects, the spool's files) ---------------------------

SEGMENT_FORMAT = 1


def encode_segment(seg: Segment) -> bytes:
    import msgpack

    return msgpack.packb({
        "v": SEGMENT_FORMAT, "generation": seg.generation, "index": seg.index, "start": seg.start,
        "end": seg.end, "page_size": seg.page_size, "salts": list(seg.salts),
        "checksum_start": list(seg.checksum_start), "checksum_end": list(seg.checksum_end),
        "commits": [list(c) for c in seg.commits], "term": seg.term, "closes": seg.closes, "data": seg.data,
    }, use_bin_type=True)


def decode_segment(raw: bytes, *, name: str = "segment") -> Segment:
    import msgpack

    try:
        d = msgpack.unpackb(raw, raw=False)
    except Exception as exc:
        raise StoreError(f"{name} is not a vigo WAL segment (msgpack: {exc})") from exc
    if not isinstance(d, dict) or d.get("v") != SEGMENT_FORMAT:
        got = d.get("v") if isinstance(d, dict) else type(d).__name__
        raise StoreError(f"{name}: unknown segment format {got!r} (this vigo reads format {SEGMENT_FORMAT})")
    try:
        seg = Segment(
            generation=d["generation"], index=int(d["index"]), start=int(d["start"]), end=int(d["end"]),
            data=bytes(d["data"]), page_size=int(d["page_size"]), salts=tuple(d["salts"]),
            checksum_start=tuple(d["checksum_start"]), checksum_end=tuple(d["checksum_end"]),
            commits=tuple((int(e), int(p), float(t)) for e, p, t in d["commits"]), term=int(d["term"]),
            closes=d.get("closes"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{name}: malformed segment ({type(exc).__name__}: {exc})") from exc
    if len(seg.data) != seg.end - seg.start or not seg.commits:
        raise StoreError(f"{name}: holds {len(seg.data)} bytes for range {seg.start}..{seg.end}")
    return seg


def merge_segments(segs: list[Segment]) -> Segment:
    """Consecutive segments of one index as one (the archiver uploads one object per tick)."""
    first = segs[0]
    for prev, nxt in itertools.pairwise(segs):
        if (nxt.generation, nxt.index, nxt.start) != (prev.generation, prev.index, prev.end):
            raise StoreError(f"cannot merge {prev.describe()} with {nxt.describe()}: not consecutive")
    if len(segs) == 1:
        return first
    return replace(first, end=segs[-1].end, data=b"".join(s.data for s in segs),
                   checksum_end=segs[-1].checksum_end, commits=tuple(c for s in segs for c in s.commits),
                   term=segs[-1].term)
