"""vigo.server.peer.adopt: a surviving standby's data dir becomes a new cluster's primary."""

from __future__ import annotations

import random

import pytest

from tests.unit.test_replication_core import crank, setup, write_some
from vigo.errors import ConfigError, RestoreError
from vigo.server.partition import Partition
from vigo.server.peer.adopt import adopt, inspect


def _standby(tmp_path):
    partition, log, cores = setup(tmp_path, names=("s1",))
    write_some(partition, 40, random.Random(3))
    partition.admin("secrets.set", {"name": "api_token", "value": b"t0ken"})
    crank(log, cores, partition)
    return partition, cores["s1"]


def test_inspect_reads_a_standby_without_changing_it(tmp_path):
    partition, _core = _standby(tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "s1").rglob("*") if p.is_file()}
    info = inspect(tmp_path / "s1")
    assert info["role"] == "standby" and info["complete"]
    assert tuple(info["position"]) == partition.store.stream.position()
    assert info["term"] == partition.term
    assert {p: p.read_bytes() for p in (tmp_path / "s1").rglob("*") if p.is_file()} == before


def test_adopted_standby_serves_as_primary_at_a_higher_term_with_everything(tmp_path):
    partition, _core = _standby(tmp_path)
    term = partition.term
    keys = dict(partition.store.query("SELECT key, value FROM meta WHERE key LIKE 'k%'"))
    partition.close()
    result = adopt(tmp_path / "s1")
    assert result["was"] == "standby" and result["term"] == term + 1 and result["term_before"] == term
    assert not (tmp_path / "s1" / "stream" / "apply.json").exists()

    adopted = Partition(tmp_path / "s1")
    try:
        assert adopted.term == term + 1
        assert dict(adopted.store.query("SELECT key, value FROM meta WHERE key LIKE 'k%'")) == keys
        assert (tmp_path / "s1" / "secrets" / "values" / "api_token.sealed").exists()
        with adopted.store.write() as db:  # it takes writes: a primary, not a standby
            adopted.store.set_meta(db, "after-adopt", 1)
        assert adopted.store.stream.reason_for_new_generation or adopted.store.stream.position() is not None
    finally:
        adopted.close()
    assert inspect(tmp_path / "s1")["role"] == "primary"


def test_a_standby_caught_between_snapshots_is_refused_and_left_alone(tmp_path):
    _partition, core = _standby(tmp_path)
    core.applier.forget()  # as when a snapshot was being received
    with pytest.raises(ConfigError, match="without a complete copy"):
        adopt(tmp_path / "s1")
    assert (tmp_path / "s1" / "stream" / "standby.json").exists()


def test_a_damaged_copy_is_refused_before_anything_changes(tmp_path):
    _partition, _core = _standby(tmp_path)
    db = tmp_path / "s1" / "state.db"
    with open(db, "r+b") as f:  # a torn last page: the size no longer matches the last commit
        f.truncate(db.stat().st_size - 100)
    with pytest.raises(RestoreError, match="bytes, the last commit says"):
        adopt(tmp_path / "s1")
    assert (tmp_path / "s1" / "stream" / "apply.json").exists()


def test_not_a_data_dir(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no state\.db"):
        inspect(tmp_path)


def test_vigocli_server_adopt_check_then_adopt(tmp_path, capsys):
    import json

    from vigo.cli.main import main

    partition, _core = _standby(tmp_path)
    term = partition.term
    partition.close()
    assert main(["server", "adopt", "--data-dir", str(tmp_path / "s1"), "--check", "--json"]) in (0, None)
    checked = json.loads(capsys.readouterr().out)
    assert checked["role"] == "standby" and checked["term"] == term
    assert main(["server", "adopt", "--data-dir", str(tmp_path / "s1")]) in (0, None)
    out = capsys.readouterr().out
    assert f"{term + 1} (was {term})" in out and "was standby" in out
    assert main(["server", "adopt", "--data-dir", str(tmp_path / "nothing")]) == 2
    assert "holds no state.db" in capsys.readouterr().err
