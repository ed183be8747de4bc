"""Continuous archiving and restore on real SQLite files with the real archiver thread, against
moto's S3 API on loopback (and a file target): point in time, target outages, checkpoint
pressure, generations, gaps. The Ray-backed "kill the primary, restore" test is in
test_archive_dev_server.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import apsw
import pytest

from tests.s3server import aws_env, s3_server  # noqa: F401  (fixtures)
from vigo.config import ServerConfig
from vigo.errors import RestoreError
from vigo.server.partition import Partition
from vigo.snapshots.layout import list_generations
from vigo.snapshots.restore import plan_restore, restore
from vigo.snapshots.targets import open_target

pytestmark = pytest.mark.timeout(300)
BUCKET = "vigo-archive"
BIN = Path(sys.executable).parent


def start(data_dir: Path, url: str, endpoint: str = "", *, interval_s: float = 0.2) -> Partition:
    cfg = ServerConfig.local(data_dir)
    cfg.archive.url, cfg.archive.endpoint_url, cfg.archive.sync_interval_s = url, endpoint, interval_s
    partition = Partition(data_dir, cfg)
    partition.start_archive()
    return partition


def write(partition: Partition, name: str, value: bytes = b"v") -> float:
    partition.admin("secrets.set", {"name": name, "value": value})
    return time.time()


def drained(partition: Partition, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = partition.archiver.status()
        if status["spool_files"] == 0 and status["last_error"] is None:
            return status
        time.sleep(0.05)
    raise AssertionError(f"archive did not drain: {partition.archiver.status()}")


def secret_names(data_dir: Path) -> set[str]:
    conn = apsw.Connection(str(data_dir / "state.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {r[0].rsplit("/", 1)[1].removesuffix(".sealed") for r in conn.execute(
            "SELECT path FROM trees WHERE tree = 'secrets' AND path LIKE 'values/%'")}
    finally:
        conn.close()


def logical(data_dir: Path) -> dict[str, list[tuple]]:
    """Every user table's rows, ordered: what "the same database" means for a restore."""
    conn = apsw.Connection(str(data_dir / "state.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: list(conn.execute(f'SELECT * FROM "{t}" ORDER BY 1, 2')) for t in tables}
    finally:
        conn.close()


@pytest.fixture
def s3(s3_server):  # noqa: F811
    s3_server.create_bucket(BUCKET)
    return s3_server


def test_point_in_time_restore_keeps_exactly_the_first_write(tmp_path, s3):
    url = f"s3://{BUCKET}/pitr"
    partition = start(tmp_path / "live", url, s3.endpoint_url)
    try:
        write(partition, "before")
        time.sleep(0.3)
        between = time.time()
        time.sleep(0.3)
        write(partition, "after")
        drained(partition)
    finally:
        partition.close()
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(between)) + f".{int(between * 1000) % 1000:03d}Z"
    env = {**os.environ, **s3.env}
    proc = subprocess.run([str(BIN / "vigocli"), "restore", "--from", url, "--data-dir", str(tmp_path / "pitr"),
                           "--to-time", iso, "--endpoint-url", s3.endpoint_url, "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    names = secret_names(tmp_path / "pitr")
    assert "before" in names and "after" not in names
    assert result["reached_at"] <= between
    assert (tmp_path / "pitr" / "secrets" / "values" / "before.sealed").exists(), "trees are materialised"
    latest = restore(url, tmp_path / "latest", endpoint_url=s3.endpoint_url)
    assert {"before", "after"} <= secret_names(tmp_path / "latest")
    assert latest["reached_at"] > between


def test_target_outage_spools_then_catches_up_without_a_gap(tmp_path, s3):
    url = f"s3://{BUCKET}/outage"
    partition = start(tmp_path / "live", url, s3.endpoint_url)
    try:
        for i in range(5):
            write(partition, f"up{i}")
        drained(partition)
        s3.stop()
        for i in range(40):  # the server keeps answering while the target is down
            write(partition, f"down{i}", os.urandom(2000).hex().encode())
            partition.tick()
        deadline = time.monotonic() + 30
        while partition.archiver.status()["last_error"] is None and time.monotonic() < deadline:
            time.sleep(0.1)
        status = partition.archiver.status()
        assert status["last_error"] and status["spool_files"] > 0 and status["lag_bytes"] > 0
        s3.restart()
        drained(partition, timeout_s=60)
        write(partition, "back")
        drained(partition)
    finally:
        partition.close()
    restore(url, tmp_path / "restored", endpoint_url=s3.endpoint_url)
    names = secret_names(tmp_path / "restored")
    assert {f"down{i}" for i in range(40)} | {"back", "up0"} <= names
    assert logical(tmp_path / "restored") == logical(tmp_path / "live")


def test_checkpoint_pressure_restore_equals_the_live_database(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    partition = start(tmp_path / "live", archive.as_uri())
    try:
        for i in range(400):
            write(partition, f"k{i % 97}", os.urandom(1500).hex().encode())
            if i % 25 == 0:
                partition.store.checkpoint(force=True)  # many WAL restarts
            if i % 150 == 149:
                partition.store.stream.snapshot()
        drained(partition)
        indexes = {o.index for g in list_generations(open_target(archive.as_uri()), "p0") for o in g.wal}
        assert len(indexes) > 10
    finally:
        partition.close()
    result = restore(archive.as_uri(), tmp_path / "restored")
    assert logical(tmp_path / "restored") == logical(tmp_path / "live")
    assert result["generation"] == list_generations(open_target(archive.as_uri()), "p0")[-1].generation


def test_generations_restart_on_restore_and_on_foreign_checkpoints_and_are_never_crossed(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    url = archive.as_uri()
    first = start(tmp_path / "live", url)
    try:
        write(first, "gen1_a")
        drained(first)
        other = apsw.Connection(str(tmp_path / "live" / "state.db"))  # an operator's shell
        other.execute("SELECT COUNT(*) FROM meta").fetchall()
        other.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
        other.close()
        write(first, "gen2_a")  # continuity cannot be proven: a new generation, with a snapshot
        drained(first)
    finally:
        first.close()
    target = open_target(url)
    gens = list_generations(target, "p0")
    assert len(gens) == 2
    restore(url, tmp_path / "restored")
    second = start(tmp_path / "restored", url)  # a server on a restored data dir: generation 3
    try:
        write(second, "gen3_a")
        drained(second)
    finally:
        second.close()
    gens = list_generations(target, "p0")
    assert len(gens) == 3 and len({g.generation for g in gens}) == 3
    for gen in gens:  # each plan uses its own generation's objects only
        plan = plan_restore(target, "p0", generation=gen.generation)
        prefix = f"p0/generations/{gen.generation}/"
        assert plan.snapshot.key.startswith(prefix) and all(w.key.startswith(prefix) for w in plan.segments)
    restore(url, tmp_path / "old", generation=gens[0].generation)
    assert "gen1_a" in secret_names(tmp_path / "old") and "gen2_a" not in secret_names(tmp_path / "old")
    restore(url, tmp_path / "newest")
    assert {"gen1_a", "gen2_a", "gen3_a"} <= secret_names(tmp_path / "newest")
    with pytest.raises(RestoreError, match="exists"):
        restore(url, tmp_path / "newest")


def test_a_missing_wal_object_is_a_clear_error_naming_the_range(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    partition = start(tmp_path / "live", archive.as_uri(), interval_s=0.05)
    try:
        for i in range(6):
            write(partition, f"w{i}")
            drained(partition)  # one WAL object per write
    finally:
        partition.close()
    target = open_target(archive.as_uri())
    wal = list_generations(target, "p0")[-1].wal
    assert len(wal) >= 4
    target.delete([wal[2].key])
    with pytest.raises(RestoreError, match=f"missing bytes {wal[2].start:#x}..{wal[3].start:#x}"):
        restore(archive.as_uri(), tmp_path / "restored")
    assert not (tmp_path / "restored" / "state.db").exists(), "nothing half-restored is left"


def test_retention_keeps_what_the_newest_snapshots_need(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    url = archive.as_uri()
    old = start(tmp_path / "old", url)  # a generation that is entirely past retention
    try:
        write(old, "gone")
        drained(old)
    finally:
        old.close()
    partition = start(tmp_path / "live", url)
    try:
        for i in range(5):
            write(partition, f"a{i}")
            partition.store.checkpoint(force=True)
        drained(partition)
        time.sleep(1.2)
        partition.store.stream.snapshot()
        for i in range(5):
            write(partition, f"b{i}")
        drained(partition)
        target = open_target(url)
        before = list_generations(target, "p0")
        assert len(before) == 2 and len(before[-1].snapshots) == 2
        partition.archiver.retention_s = 1.0
        deleted = partition.archiver.enforce_retention()
        after = list_generations(target, "p0")
        assert [g.generation for g in after] == [before[-1].generation], "the expired generation is gone"
        kept = after[0]
        assert [s.index for s in kept.snapshots] == [before[-1].snapshots[-1].index], "only the fresh snapshot stays"
        assert all(w.index >= kept.snapshots[0].index for w in kept.wal), "WAL before it is gone"
        assert deleted
    finally:
        partition.close()
    restore(url, tmp_path / "restored")
    assert {f"a{i}" for i in range(5)} | {f"b{i}" for i in range(5)} <= secret_names(tmp_path / "restored")


def test_bad_restore_inputs_get_clear_errors(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    proc = subprocess.run([str(BIN / "vigocli"), "restore", "--from", archive.as_uri(), "--data-dir",
                           str(tmp_path / "r"), "--to-time", "yesterday"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not an ISO 8601 time" in proc.stderr
    proc = subprocess.run([str(BIN / "vigocli"), "restore", "--from", archive.as_uri(), "--data-dir",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no archived partition" in proc.stderr
    proc = subprocess.run([str(BIN / "vigocli"), "restore", "--from", "ftp://x/y", "--data-dir",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "ftp" in proc.stderr
    partition = start(tmp_path / "live", archive.as_uri())
    try:
        for i in range(3):
            write(partition, f"w{i}")
            drained(partition)
    finally:
        partition.close()
    wal = list_generations(open_target(archive.as_uri()), "p0")[-1].wal
    victim = archive / wal[-1].key
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(Exception, match=wal[-1].key.rsplit("/", 1)[1]):
        restore(archive.as_uri(), tmp_path / "restored")
    assert not (tmp_path / "restored" / "state.db").exists()
