"""Peer replication in synchronous mode on a simulated 4-node Ray cluster (head + hosts a, b, c):
primary on a, standbys on b and c, control and the gateway on the head; real subprocess envoys.

The tests run in order on one cluster, each starting where the previous left it:
1. the primary's host dies while envoys flush -> promote -> nothing acknowledged is lost;
2. the old primary's host returns -> it is fenced and rejoins as a standby;
3. a standby's host is down under writes -> it catches up (or resyncs by snapshot);
5. promote refusals.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import apsw
import pytest
import ray

from tests.raycluster import SimCluster, envoy_status, join_envoy, run_envoy_once
from tests.serverharness import stack_files
from vigo.actors.failover import promote
from vigo.errors import NotPrimaryError, PromoteError

pytestmark = pytest.mark.timeout(900)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stack"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("repl")
    cluster = SimCluster(root).start()
    try:
        cluster.deploy(cluster.config(standbys=["b", "c"], sync_standbys=1, sync_timeout_s=3.0,
                                      max_lag_bytes=1024 * 1024))
        cluster.wait("standbys in sync", cluster.all_in_sync, timeout_s=60)
        cluster.admin("secrets.set", {"name": "api_token", "value": b"replicated-secret"})
        cluster.admin("stack.push", {"files": stack_files(EXAMPLE)})
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def envoys(sim, tmp_path_factory):
    base = tmp_path_factory.mktemp("envoys")
    token = sim.admin("token.create", {"uses": 3})["token"]
    return [join_envoy(base / f"e{i}", f"127.0.0.1:{sim.port}", token) for i in range(3)]


def db_rows(path: Path, sql: str) -> list[tuple]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def member_dir(sim: SimCluster, name: str) -> Path:
    topology = ray.get(sim.control().get_topology.remote())
    return sim.root / topology["partitions"]["p0"]["hosts"][name]


def test_1_primary_host_dies_during_flush_and_promotion_loses_nothing(sim, envoys):
    produced: list[str] = []
    stop = threading.Event()

    def keep_running():
        while not stop.is_set():
            for e in envoys:
                report = run_envoy_once(e)
                if report.get("run_id"):
                    produced.append(report["run_id"])

    worker = threading.Thread(target=keep_running, daemon=True)
    worker.start()
    sim.wait("some runs acknowledged", lambda: len(produced) >= 6, timeout_s=120)
    sim.kill_host("a")
    result = promote("p0")
    assert result["old_primary"] == "primary-p0" and not result["old_primary_alive"]
    assert result["new_primary"] in ("standby-p0-b", "standby-p0-c") and result["term"] == 2
    count_at_promotion = len(produced)
    sim.wait("runs after promotion", lambda: len(produced) >= count_at_promotion + 6, timeout_s=120)
    stop.set()
    worker.join(timeout=120)
    for e in envoys:  # one last flush each: every queue must drain into the new primary
        final = run_envoy_once(e)
        produced.append(final["run_id"])
        assert final["exit_code"] == 0, final["stderr"]
        status = envoy_status(e)
        assert status["queue"]["entries"] == 0, status["queue"]
        assert status["envoy_id"] == e["id"] and status["highest_term"] == 2

    new_dir = member_dir(sim, result["new_primary"])
    stored = {r[0] for r in db_rows(new_dir / "state.db", "SELECT run_id FROM runs")}
    assert set(produced) <= stored, f"lost: {sorted(set(produced) - stored)[:5]}"
    assert db_rows(new_dir / "state.db", "PRAGMA integrity_check") == [("ok",)]
    joined = {r[0] for r in db_rows(new_dir / "state.db", "SELECT id FROM envoys")}
    assert joined == {e["id"] for e in envoys}, "no envoy re-joined"


def test_2_old_primary_returns_fenced_and_rejoins_as_standby(sim, envoys):
    sim.restore_host("a")
    old = sim.actor("primary-p0")
    info = sim.wait("old primary back as standby", lambda: (i := ray.get(old.ping.remote(), timeout=5))["role"] == "standby" and i)
    assert info["term"] >= 2
    with pytest.raises(NotPrimaryError):
        ray.get(old.handle_batch.remote([{"type": "checkin", "envoy_id": envoys[0]["id"], "body": {}}]), timeout=30)
    # A write at the old term is refused by every standby too.
    reply = ray.get(sim.actor("primary-p0").receive_segments.remote([], 1), timeout=30)
    assert reply["status"] == "fenced"
    sim.wait("old primary in sync as standby", sim.all_in_sync, timeout_s=90)
    fenced_copies = list((sim.root / "a").glob("state.db.fenced-*"))
    assert fenced_copies, "the old primary's database is kept aside for the operator"
    new = sim.route()["primary"]
    names = {s["name"] for s in sim.replication()["standbys"]}
    assert "primary-p0" in names and new not in names


def test_3_standby_host_down_under_writes_catches_up_or_resyncs(sim, envoys):
    primary_name = sim.route()["primary"]
    other = next(n for n in ("standby-p0-b", "standby-p0-c") if n != primary_name)
    host = other.rsplit("-", 1)[1]
    # (a) a short absence: it resumes from its position.
    resyncs_before = {s["name"]: s["resyncs"] for s in sim.replication()["standbys"]}
    sim.kill_host(host)
    for i in range(5):
        sim.admin("secrets.set", {"name": f"short{i}", "value": b"x" * 1000})
    sim.restore_host(host)
    sim.wait("standby caught up", sim.all_in_sync, timeout_s=90)
    after = {s["name"]: s["resyncs"] for s in sim.replication()["standbys"]}
    assert after[other] == resyncs_before[other], "a short absence needs no snapshot"
    # (b) away past what the primary keeps (max_lag_bytes = 1 MiB): resync by snapshot.
    sim.kill_host(host)
    for i in range(40):  # 40 x 60 KiB of random text: past the 1 MiB the primary keeps
        sim.admin("secrets.set", {"name": f"big{i}", "value": os.urandom(30_000).hex()})
    sim.restore_host(host)
    sim.wait("standby resynchronised", sim.all_in_sync, timeout_s=120)
    after = {s["name"]: s["resyncs"] for s in sim.replication()["standbys"]}
    assert after[other] > resyncs_before[other], "the standby should have been sent a snapshot"
    primary_dir, standby_dir = member_dir(sim, primary_name), member_dir(sim, other)
    query = "SELECT tree, path, sha256 FROM trees ORDER BY tree, path"
    assert db_rows(standby_dir / "state.db", query) == db_rows(primary_dir / "state.db", query)
    assert (standby_dir / "secrets" / "values" / "big39.sealed").read_bytes() == \
        (primary_dir / "secrets" / "values" / "big39.sealed").read_bytes()


def test_5_promote_refusals(sim):
    primary_name = sim.route()["primary"]
    standbys = sorted(sim.route()["standbys"])
    slow = standbys[0]
    ray.get(sim.actor(slow).inject_fault.remote("standby_apply_delay_s", 4.0), timeout=30)
    try:
        for i in range(3):
            sim.admin("secrets.set", {"name": f"late{i}", "value": b"y"})
        with pytest.raises(PromoteError, match="is behind the primary"):
            promote("p0", slow)
    finally:
        ray.get(sim.actor(slow).inject_fault.remote("standby_apply_delay_s", 0.0), timeout=60)
    with pytest.raises(PromoteError, match="unknown standby 'standby-p0-zz'"):
        promote("p0", "standby-p0-zz")
    ray.get(sim.control().register_partition.remote("p9", "primary-p9", 1, str(sim.root / "p9"), []), timeout=30)
    with pytest.raises(PromoteError, match="has no standby"):
        promote("p9")
    assert sim.route()["primary"] == primary_name, "refusals change nothing"


def test_server_status_shows_primary_standbys_positions_and_lag(sim, monkeypatch, capsys):
    def settled():
        info = sim.admin("status")
        rep = info["replication"]
        done = all(s["in_sync"] and s["lag_bytes"] == 0 and s["position"] == rep["head"] for s in rep["standbys"])
        return done and info

    info = sim.wait("both standbys at the head with no lag", settled, timeout_s=90)
    assert info["primary"] == sim.route()["primary"] and info["term"] == sim.route()["term"]
    assert info["replication"]["mode"] == "synchronous" and len(info["replication"]["standbys"]) == 2
    from vigo.cli import client
    from vigo.cli import server as server_cli

    monkeypatch.setattr(client, "cluster_token", lambda: "t")
    monkeypatch.setattr(client, "find_gateways", lambda address, token: [])
    monkeypatch.setattr(client, "admin", lambda address, op, args=None: dict(info))
    server_cli.status(address="http://unused", as_json=False)
    out = capsys.readouterr().out
    assert f"primary         {info['primary']}" in out or info["primary"] in out
    assert "replication" in out and "synchronous" in out and out.count("in sync") == 2
