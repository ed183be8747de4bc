"""Replication without Ray: a real primary store feeding ReplicationLog, real standby data dirs
(StandbyCore), and a hand-cranked sender that can lose, repeat and delay messages."""

from __future__ import annotations

import os
import random
from pathlib import Path

import apsw

from vigo.server.partition import Partition
from vigo.server.peer.replication import ReplicationLog, Work
from vigo.server.peer.standby import StandbyCore


def deliver(log: ReplicationLog, name: str, core: StandbyCore, work: Work, term: int) -> dict:
    if work.kind == "probe":
        reply = core.reply()
    elif work.kind == "segments":
        reply = core.receive_segments(work.segments, term)
    else:
        snap = work.snapshot
        reply = core.receive_snapshot_chunk(generation=snap.generation, index=snap.index, offset=work.offset,
                                            data=work.data, size=snap.size, sha256=snap.sha256, term=term,
                                            created_at=snap.created_at)
    log.on_reply(name, work, reply)
    return reply


def crank(log: ReplicationLog, cores: dict[str, StandbyCore], partition: Partition, *, rnd: random.Random | None = None,
          loss: float = 0.0, rounds: int = 500) -> None:
    """Send until every standby is in sync (or rounds run out), maybe losing messages."""
    for _ in range(rounds):
        if log.snapshot_wanted:
            partition.store.stream.snapshot()
        busy = False
        for name, core in cores.items():
            work = log.work_for(name)
            if work is None:
                continue
            busy = True
            if rnd is not None and rnd.random() < loss:
                if rnd.random() < 0.5:
                    continue  # lost on the way there
                deliver(log, name, core, work, partition.term)  # applied, but the reply is lost
                log.on_failure(name, "reply lost")
                continue
            deliver(log, name, core, work, partition.term)
        if not busy:
            return
    raise AssertionError(f"replication did not settle: {log.status()}")


def write_some(partition: Partition, n: int, rnd: random.Random) -> None:
    for _ in range(n):
        with partition.store.write() as db:
            partition.store.set_meta(db, f"k{rnd.randrange(200)}", os.urandom(rnd.choice([16, 900, 6000])))


def checkpointed(partition: Partition) -> bytes:
    partition.store.db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_FULL)
    return (partition.store.data_dir / "state.db").read_bytes()


def setup(tmp_path: Path, names=("s1", "s2"), **kw):
    partition = Partition(tmp_path / "primary")
    log = ReplicationLog(list(names), **kw)
    partition.store.stream.consumers.append(log)
    partition.store.stream.snapshot()
    cores = {n: StandbyCore(tmp_path / n, n) for n in names}
    return partition, log, cores


def test_standbys_become_byte_identical_with_trees(tmp_path):
    partition, log, cores = setup(tmp_path)
    rnd = random.Random(1)
    write_some(partition, 50, rnd)
    partition.admin("secrets.set", {"name": "db_password", "value": b"s3cret"})
    crank(log, cores, partition)
    write_some(partition, 200, rnd)
    partition.store.checkpoint(force=True)
    write_some(partition, 30, rnd)
    crank(log, cores, partition, rnd=random.Random(2), loss=0.3, rounds=3000)
    expected = checkpointed(partition)
    for name, core in cores.items():
        assert core.applier.position() == partition.store.stream.position()
        assert (tmp_path / name / "state.db").read_bytes() == expected
        for tree_file in ("tls/ca.pem", "secrets/master.key", "secrets/values/db_password.sealed", "server.yaml"):
            assert (tmp_path / name / tree_file).read_bytes() == (tmp_path / "primary" / tree_file).read_bytes()
    assert all(s["in_sync"] and s["lag_bytes"] == 0 for s in log.status())


def test_sync_wait_counts_acknowledgements(tmp_path):
    partition, log, cores = setup(tmp_path, names=("s1",))
    crank(log, cores, partition)
    write_some(partition, 3, random.Random(3))
    head = partition.store.stream.position()
    assert log.wait_acked(head, 1, timeout_s=0.05) is False, "nothing was sent yet"
    crank(log, cores, partition)
    assert log.wait_acked(head, 1, timeout_s=0.05) is True


def test_a_standby_too_far_behind_is_resynchronised_by_snapshot(tmp_path):
    partition, log, cores = setup(tmp_path, names=("s1", "s2"), max_lag_bytes=1 << 20)
    crank(log, cores, partition)
    away = {"s1": cores["s1"]}
    write_some(partition, 400, random.Random(4))  # ~1.2 MB: past what the primary keeps
    crank(log, away, partition)  # s2 is away
    before = log.status()[1]["resyncs"]
    crank(log, cores, partition)
    assert log.status()[1]["resyncs"] > before
    assert (tmp_path / "s2" / "state.db").read_bytes() == checkpointed(partition)


def test_a_standby_that_was_away_resumes_from_its_position(tmp_path):
    partition, log, cores = setup(tmp_path, names=("s1",))
    crank(log, cores, partition)
    write_some(partition, 20, random.Random(5))
    # The standby's actor restarts: a fresh core on the same data dir keeps its position.
    cores = {"s1": StandbyCore(tmp_path / "s1", "s1")}
    log.on_failure("s1", "actor restarted")
    crank(log, cores, partition)
    assert log.status()[0]["resyncs"] == 0
    assert (tmp_path / "s1" / "state.db").read_bytes() == checkpointed(partition)


def test_lower_term_is_refused(tmp_path):
    partition, log, cores = setup(tmp_path, names=("s1",))
    crank(log, cores, partition)
    core = cores["s1"]
    assert core.observe_term(5)
    write_some(partition, 2, random.Random(6))
    work = log.work_for("s1")
    reply = core.receive_segments(work.segments, term=partition.term)
    assert reply["status"] == "fenced" and "has seen term 5" in reply["reason"]
