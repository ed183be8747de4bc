"""Applying the stream to a database file: what a standby does continuously and restore does once.

A snapshot is installed as the database file; then each segment's pages are written where a
checkpoint would write them (page n at (n - 1) x page size, the newest image of each page, only
pages within the final database size) and the file is cut to the last commit's size. So after
each segment the file is byte-identical to the primary's database at that position, checkpointed.

No SQLite connection is open while this writes: the applier owns the file, and readers (the
standby materialising its trees, promotion) open it only between segments.

Order and idempotence live here too: a segment applies only at the receiver's exact position;
one that ends at or before it is a duplicate (skipped); one that overlaps is trimmed at the
position; one that starts beyond is a gap the sender must fill (``StreamGap``); another
generation needs a snapshot first (``NeedSnapshot``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from vigo.durable import atomic_write, replace_durably
from vigo.errors import CorruptSegment, NeedSnapshot, StreamGap, WalFormatError
from vigo.state import walformat as wf
from vigo.state.stream import Segment

log = logging.getLogger("vigo.state.apply")


@dataclass
class ApplyState:
    generation: str
    index: int
    offset: int = 0
    salts: tuple[int, int] | None = None
    checksum: tuple[int, int] | None = None
    page_size: int = 0
    magic: int = wf.MAGIC_LE  # the WAL's magic tells the checksum's byte order
    db_pages: int = 0
    term: int = 0
    committed_at: float = 0.0  # commit time (primary's clock) of the last applied transaction


class Applier:
    def __init__(self, db_path: Path | str, state_path: Path | str) -> None:
        self.db_path = Path(db_path)
        self.state_path = Path(state_path)
        self.state = self._load()

    # --- state --------------------------------------------------------------------------

    def _load(self) -> ApplyState | None:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("apply state %s unreadable (%s): a snapshot is needed", self.state_path, exc)
            return None
        for key in ("salts", "checksum"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        return ApplyState(**raw)

    def _save(self, *, durable: bool) -> None:
        assert self.state is not None
        atomic_write(self.state_path, json.dumps(asdict(self.state)).encode(), fsync=durable,
                     tmp=self.state_path.with_suffix(".tmp"))

    def position(self) -> tuple[str, int, int] | None:
        return None if self.state is None else (self.state.generation, self.state.index, self.state.offset)

    def forget(self) -> None:
        """Drop the position (the database file stays): the next segment needs a snapshot."""
        self.state = None
        self.state_path.unlink(missing_ok=True)

    # --- snapshot -----------------------------------------------------------------------

    def install_snapshot(self, source: Path, generation: str, index: int, *, term: int = 0,
                         created_at: float = 0.0, move: bool = False) -> None:
        """Make ``source`` (a database file at the start of ``index``) this receiver's database."""
        self.forget()
        tmp = self.db_path.with_name(f".{self.db_path.name}.installing")
        if move:
            os.replace(source, tmp)  # into the temp name only: the rename below is the one that counts
        else:
            shutil.copyfile(source, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            header = os.pread(fd, 100, 0)
        finally:
            os.close(fd)
        page_size = _db_page_size(header) if len(header) == 100 else 0
        for suffix in ("-wal", "-shm"):  # a stale log would be replayed over the new file
            Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)
        replace_durably(tmp, self.db_path)
        size = self.db_path.stat().st_size
        self.state = ApplyState(generation=generation, index=index, page_size=page_size,
                                db_pages=size // page_size if page_size else 0, term=term, committed_at=created_at)
        self._save(durable=True)

    # --- segments -----------------------------------------------------------------------

    def accept(self, segment: Segment, *, durable: bool = True) -> bool:
        """Apply ``segment`` if it continues this receiver; False for a duplicate."""
        st = self.state
        if st is None or segment.generation != st.generation:
            raise NeedSnapshot(
                f"segment {segment.describe()} is in generation {segment.generation} but this receiver "
                f"{'has no position' if st is None else f'is in {st.generation}'}: a snapshot is needed", self.position())
        if (segment.index == st.index + 1 and segment.start == 0 and segment.closes is not None
                and st.offset == segment.closes):
            st.index, st.offset, st.salts, st.checksum = segment.index, 0, None, None  # index st.index is complete
        if segment.index < st.index or (segment.index == st.index and segment.end <= st.offset):
            return False
        if segment.index != st.index or not segment.start <= st.offset:
            raise StreamGap(f"segment {segment.describe()} does not continue this receiver at "
                            f"{st.generation}/{st.index:08x}/{st.offset:016x}", self.position())
        if segment.start < st.offset:
            assert st.checksum is not None
            segment = segment.trim_before(st.offset, st.checksum)
        self._apply(segment, durable=durable)
        return True

    def _apply(self, seg: Segment, *, durable: bool) -> None:
        st = self.state
        assert st is not None
        data = memoryview(seg.data)
        if seg.start == 0:
            try:
                header = wf.parse_header(bytes(data[:wf.WAL_HEADER_BYTES]))
            except WalFormatError as exc:
                raise CorruptSegment(f"segment {seg.describe()}: {exc}") from exc
            if st.page_size and header.page_size != st.page_size:
                raise CorruptSegment(f"segment {seg.describe()} has page size {header.page_size}, "
                                     f"the database has {st.page_size}")
            chain, frames_at = header.checksum, wf.WAL_HEADER_BYTES
        else:
            if seg.salts != st.salts or seg.checksum_start != st.checksum:
                raise CorruptSegment(f"segment {seg.describe()} continues a different log "
                                     f"(salts/checksum do not match this receiver's position)")
            header = wf.WalHeader(st.magic, st.page_size, 0, seg.salts, (0, 0))
            chain, frames_at = seg.checksum_start, seg.start
        scan = wf.scan_frames(data[frames_at - seg.start:], frames_at, header, chain)
        if scan.commit_end != seg.end or scan.checksum != seg.checksum_end:
            raise CorruptSegment(
                f"segment {seg.describe()}: frames verify only to offset {scan.commit_end} "
                f"(stopped: {scan.stopped}), expected committed frames to {seg.end}")
        final_pages = scan.commits[-1].db_pages
        ps = header.page_size
        newest: dict[int, int] = {}
        for pgno, off in scan.pages:
            newest[pgno] = off
        fd = os.open(self.db_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for pgno in sorted(newest):
                if pgno > final_pages:
                    continue  # beyond the database's end after this segment: a checkpoint skips it
                at = newest[pgno] - seg.start + wf.FRAME_HEADER_BYTES
                os.pwrite(fd, data[at:at + ps], (pgno - 1) * ps)
            os.ftruncate(fd, final_pages * ps)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        st.offset, st.salts, st.checksum = seg.end, header.salts, scan.checksum
        st.page_size, st.db_pages, st.term = ps, final_pages, seg.term
        st.committed_at, st.magic = seg.commits[-1][2], header.magic
        self._save(durable=durable)


def _db_page_size(header: bytes) -> int:
    """Page size from a database file header (offset 16, big-endian; 1 means 65536)."""
    value = int.from_bytes(header[16:18], "big")
    return 65536 if value == 1 else value
