"""The state stream on real SQLite files: sealing, checkpoints, generations, and the applier that
turns a snapshot plus segments back into a byte-identical database."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import apsw
import pytest

from vigo.errors import CorruptSegment, NeedSnapshot, StreamGap, WalFormatError
from vigo.state import walformat as wf
from vigo.state.apply import Applier
from vigo.state.store import Store
from vigo.state.stream import Segment, Snapshot, decode_segment, encode_segment, merge_segments


class Recorder:
    """A consumer that keeps everything (and a copy of each snapshot, as the archive would)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.segments: list[Segment] = []
        self.snapshots: list[tuple[Snapshot, Path]] = []
        self.flushes = 0

    def on_segment(self, seg: Segment) -> None:
        self.segments.append(seg)

    def on_snapshot(self, snap: Snapshot) -> None:
        copy = self.folder / f"snap-{snap.generation}-{snap.index}.db"
        shutil.copyfile(snap.path, copy)
        self.snapshots.append((snap, copy))

    def flush(self) -> None:
        self.flushes += 1


def _store(tmp_path: Path) -> tuple[Store, Recorder]:
    store = Store(tmp_path / "data")
    rec = Recorder(tmp_path)
    store.stream.consumers.append(rec)
    store.stream.snapshot()
    return store, rec


def _write(store: Store, rnd: random.Random, n: int, *, checkpoint_every: int = 0) -> None:
    for i in range(n):
        with store.write() as db:
            store.set_meta(db, f"k{rnd.randrange(300)}", os.urandom(rnd.choice([8, 600, 5000])))
            if rnd.random() < 0.05:
                db.execute("DELETE FROM meta WHERE key LIKE 'k1%'")
        if checkpoint_every and i % checkpoint_every == checkpoint_every - 1:
            store.checkpoint(force=True)


def _replay(tmp_path: Path, rec: Recorder, snapshot_no: int = 0, name: str = "replica") -> Applier:
    snap, copy = rec.snapshots[snapshot_no]
    applier = Applier(tmp_path / f"{name}.db", tmp_path / f"{name}.json")
    applier.install_snapshot(copy, snap.generation, snap.index)
    for seg in rec.segments:
        if seg.generation == snap.generation and seg.index >= snap.index:
            applier.accept(seg, durable=False)
    return applier


def _checkpointed_bytes(store: Store) -> bytes:
    store.db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_FULL)
    return (store.data_dir / "state.db").read_bytes()


def test_checksum_matches_what_sqlite_wrote(tmp_path):
    db = apsw.Connection(str(tmp_path / "t.db"))
    db.pragma("journal_mode", "wal")
    db.wal_autocheckpoint(0)
    db.execute("CREATE TABLE t(x)")
    for _ in range(50):
        with db:
            db.execute("INSERT INTO t VALUES (?)", (os.urandom(700),))
    raw = (tmp_path / "t.db-wal").read_bytes()
    header = wf.parse_header(raw)
    scan = wf.scan_frames(raw[32:], 32, header, header.checksum)
    assert scan.stopped == "end" and scan.commit_end == len(raw) and len(scan.commits) == 51
    flipped = bytearray(raw)
    flipped[32 + 24 + 100] ^= 0x01  # a bit inside the first frame's page
    assert wf.scan_frames(bytes(flipped[32:]), 32, header, header.checksum).stopped == "checksum"
    with pytest.raises(WalFormatError, match="magic"):
        wf.parse_header(b"\0" * 32)


def test_replay_is_byte_identical_across_checkpoints_restarts_and_snapshots(tmp_path):
    store, rec = _store(tmp_path)
    rnd = random.Random(7)
    _write(store, rnd, 600, checkpoint_every=150)
    store.stream.snapshot()
    _write(store, rnd, 400, checkpoint_every=170)
    indexes = {s.index for s in rec.segments}
    assert len(indexes) >= 6, "checkpoints should have rewound the WAL several times"
    for n in range(len(rec.snapshots)):  # from the first snapshot and from the later one
        applier = _replay(tmp_path, rec, n, name=f"r{n}")
        assert applier.position() == store.stream.position()
    expected = _checkpointed_bytes(store)
    for n in range(len(rec.snapshots)):
        assert (tmp_path / f"r{n}.db").read_bytes() == expected
    conn = apsw.Connection(str(tmp_path / "r0.db"))
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_unfinished_transaction_frames_are_never_sealed(tmp_path):
    store, _ = _store(tmp_path)
    _write(store, random.Random(1), 5)
    before = store.stream.position()
    other = apsw.Connection(str(tmp_path / "data" / "state.db"))
    other.pragma("cache_size", 2)  # spill pages of the open transaction into the WAL
    other.execute("BEGIN")
    for _ in range(200):
        other.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (os.urandom(8).hex(), os.urandom(3000)))
    wal_size = (tmp_path / "data" / "state.db-wal").stat().st_size
    assert wal_size > before[2] + 100 * 4096, "the open transaction should have spilled frames"
    store.stream.wal_frames = None  # read to the end of the file, as after a restart
    assert store.stream.seal() is None
    assert store.stream.position() == before
    other.execute("ROLLBACK")
    other.close()


def test_a_foreign_checkpoint_starts_a_new_generation(tmp_path):
    store, rec = _store(tmp_path)
    _write(store, random.Random(2), 20)
    first_gen = store.stream.position()[0]
    other = apsw.Connection(str(tmp_path / "data" / "state.db"))
    other.execute("SELECT COUNT(*) FROM meta").fetchall()  # opens the WAL
    other.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)  # an operator's shell, say
    other.close()
    assert (tmp_path / "data" / "state.db-wal").stat().st_size == 0
    _write(store, random.Random(3), 3)
    gen = store.stream.position()[0]
    assert gen != first_gen
    assert rec.snapshots[-1][0].generation == gen
    applier = _replay(tmp_path, rec, len(rec.snapshots) - 1)
    assert applier.position() == store.stream.position()
    assert (tmp_path / "replica.db").read_bytes() == _checkpointed_bytes(store)


def test_reopening_continues_the_generation_and_resealing_is_harmless(tmp_path):
    store, rec = _store(tmp_path)
    _write(store, random.Random(4), 30)
    gen, index, offset = store.stream.position()
    state = (tmp_path / "data" / "stream" / "state.json").read_bytes()
    store.close()
    # Crash between the consumers seeing segments and the state reaching disk: older state.
    store = Store(tmp_path / "data")
    assert store.stream.reason_for_new_generation is None
    store.stream.consumers.append(rec)
    _write(store, random.Random(5), 10)
    assert store.stream.position()[0] == gen
    applier = _replay(tmp_path, rec)
    assert applier.position() == store.stream.position()
    store.close()
    (tmp_path / "data" / "stream" / "state.json").write_bytes(state)
    store = Store(tmp_path / "data")
    store.stream.consumers.append(rec)
    _write(store, random.Random(6), 5)
    assert store.stream.position()[0] == gen, "an older position still lies on the same log"
    resealed = [s for s in rec.segments if s.start < offset and s.index == index and s is not rec.segments[0]]
    assert resealed, "the frames after the stale position should have been sealed again"
    applier = _replay(tmp_path, rec, name="again")
    assert applier.position() == store.stream.position()
    assert (tmp_path / "again.db").read_bytes() == _checkpointed_bytes(store)


def test_applier_refuses_gaps_other_generations_and_corruption(tmp_path):
    store, rec = _store(tmp_path)
    _write(store, random.Random(8), 10)
    snap, copy = rec.snapshots[0]
    applier = Applier(tmp_path / "r.db", tmp_path / "r.json")
    with pytest.raises(NeedSnapshot):
        applier.accept(rec.segments[0])
    applier.install_snapshot(copy, snap.generation, snap.index)
    with pytest.raises(StreamGap) as gap:
        applier.accept(rec.segments[3])
    assert gap.value.position == (snap.generation, snap.index, 0)
    assert applier.accept(rec.segments[0]) is True
    assert applier.accept(rec.segments[0]) is False  # a duplicate is skipped
    bad = bytearray(rec.segments[1].data)
    bad[len(bad) // 2] ^= 0xFF
    from dataclasses import replace

    with pytest.raises(CorruptSegment, match="verify only to offset"):
        applier.accept(replace(rec.segments[1], data=bytes(bad)))
    merged = merge_segments(rec.segments[1:])
    assert applier.accept(decode_segment(encode_segment(merged))) is True
    assert applier.position() == store.stream.position()


def test_point_in_time_cut_keeps_the_chain(tmp_path):
    store, rec = _store(tmp_path)
    _write(store, random.Random(9), 12)
    merged = merge_segments(rec.segments)
    middle = merged.commits[5][0]
    cut = merged.cut_at(middle)
    snap, copy = rec.snapshots[0]
    applier = Applier(tmp_path / "r.db", tmp_path / "r.json")
    applier.install_snapshot(copy, snap.generation, snap.index)
    applier.accept(cut)
    assert applier.position()[2] == middle
    rest = merged.trim_before(middle, cut.checksum_end)
    applier.accept(rest)
    assert (tmp_path / "r.db").read_bytes() == _checkpointed_bytes(store)
