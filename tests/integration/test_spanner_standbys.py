"""Spanner and peer replication together: two bolts (hosts a and b), each with a standby on the
other's host. Bolt a's host dies: its envoys are served by bolt b at once (the roster), bolt a's
standby is promoted (its data and roster came by the replication stream), and bolt a, now
served from host b, takes its slice back; no run report is lost and no envoy re-joins."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest
import ray

from tests.raycluster import SimCluster, join_envoy, run_envoy_once
from tests.serverharness import stack_files
from vigo.actors.failover import promote

pytestmark = pytest.mark.timeout(900)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stack"


def runs_in(root: Path) -> set[str]:
    found = set()
    for db in root.glob("*/bolt-*/state.db"):
        conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            found |= {r[0] for r in conn.execute("SELECT run_id FROM runs")}
        finally:
            conn.close()
    return found


def test_a_bolt_fails_over_to_its_standby_and_takes_its_slice_back(tmp_path):
    sim = SimCluster(tmp_path / "cluster", hosts=("a", "b")).start()
    try:
        cfg = sim.config(sync_standbys=0)
        cfg.spanner.bolts = ["a", "b"]
        cfg.spanner.standbys_per_bolt = 1
        cfg.spanner.suspicion_s, cfg.spanner.rejoin_hold_s = 1.0, 2.0
        cfg.spanner.delta_interval_s, cfg.spanner.digest_interval_s = 0.1, 1.0
        sim.deploy_spanner(cfg)
        topology = ray.get(sim.control().get_topology.remote())
        assert topology["partitions"]["bolt-a"]["standbys"] == ["standby-bolt-a-b"]
        assert topology["partitions"]["bolt-b"]["standbys"] == ["standby-bolt-b-a"]
        sim.wait("both bolts live", lambda: len(sim.gateway_admin("spanner.status")["gateway_view"]["live"]) == 2)
        sim.wait("standbys in sync", lambda: sim.all_in_sync("bolt-a") and sim.all_in_sync("bolt-b"))
        sim.gateway_admin("secrets.set", {"name": "api_token", "value": b"s"})
        sim.gateway_admin("stack.push", {"files": stack_files(EXAMPLE)})
        token = sim.gateway_admin("token.create", {"uses": 16})["token"]
        envoys: list[dict] = []
        # Envoy ids are random: join until each bolt owns some (two per bolt at least).
        while len(envoys) < 16:
            envoys.append(join_envoy(tmp_path / f"e{len(envoys)}", f"127.0.0.1:{sim.port}", token))
            owned = list(ray.get(sim.actor("gateway-head").owners.remote([e["id"] for e in envoys])).values())
            if len(envoys) >= 4 and min(owned.count("bolt-a"), owned.count("bolt-b")) >= 2:
                break
        produced = []

        def run_all() -> list[dict]:
            out = [run_envoy_once(e) for e in envoys]
            produced.extend(r["run_id"] for r in out if r.get("run_id"))
            return out

        assert all(r["exit_code"] == 0 for r in run_all())
        before = ray.get(sim.actor("gateway-head").owners.remote([e["id"] for e in envoys]))
        assert set(before.values()) == {"bolt-a", "bolt-b"}, before
        sim.wait("bolt a's standby holds its roster", lambda: sim.all_in_sync("bolt-a"))

        sim.kill_host("a")
        sim.wait("bolt a leaves the live set",
                 lambda: sim.gateway_admin("spanner.status")["gateway_view"]["live"] == ["bolt-b"], timeout_s=30)
        assert all(r["exit_code"] == 0 and r["flushed"] >= 1 for r in run_all()), "bolt b serves everyone"

        result = promote("bolt-a")
        assert result["new_primary"] == "standby-bolt-a-b"
        sim.wait("bolt a is back, served by its promoted standby",
                 lambda: ray.get(sim.actor("gateway-head").owners.remote([e["id"] for e in envoys])) == before,
                 timeout_s=60)
        info = ray.get(sim.actor("standby-bolt-a-b").bolt_info.remote(), timeout=30)
        assert info["name"] == "bolt-a" and info["ready"] and info["agents"] == len(envoys)
        reports = run_all()
        assert all(r["exit_code"] == 0 and r["flushed"] >= 1 for r in reports), [r["stderr"][-300:] for r in reports]
        missing = set(produced) - runs_in(sim.root)
        assert not missing, f"{len(missing)} run reports lost"
    finally:
        sim.shutdown()
