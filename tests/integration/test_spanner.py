"""Spanner on a simulated 4-node Ray cluster: bolts on hosts a, b and c (write-equal primaries,
each with its own database), control and the gateway on the head, real subprocess envoys.

In order, on one cluster: envoys joined at one bolt are served by the bolts that own them
(admitted at one bolt, checked in through another); a revocation made at one bolt is refused
at every bolt; a bolt's host dies -> only its envoys move, each lands on a sibling that accepts
it without re-joining, and no run report is lost; the host returns -> the bolt catches up and
takes its slice back."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest
import ray

from tests.raycluster import SimCluster, join_envoy, run_envoy_once
from tests.serverharness import stack_files

pytestmark = pytest.mark.timeout(900)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stack"
BOLTS = ("a", "b", "c")
SUSPICION_S, REJOIN_HOLD_S = 1.5, 3.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    cluster = SimCluster(tmp_path_factory.mktemp("spanner"), hosts=BOLTS).start()
    try:
        cfg = cluster.config()
        cfg.spanner.bolts = list(BOLTS)
        cfg.spanner.suspicion_s, cfg.spanner.rejoin_hold_s = SUSPICION_S, REJOIN_HOLD_S
        cfg.spanner.delta_interval_s, cfg.spanner.digest_interval_s = 0.1, 1.0
        cluster.deploy_spanner(cfg)
        cluster.wait("every bolt live at the gateway", lambda: len(gateway_view(cluster)["live"]) == 3)
        cluster.gateway_admin("secrets.set", {"name": "api_token", "value": b"spanner-secret"})
        cluster.gateway_admin("stack.push", {"files": stack_files(EXAMPLE)})
        yield cluster
    finally:
        cluster.shutdown()


def gateway_view(sim: SimCluster) -> dict:
    return sim.gateway_admin("spanner.status")["gateway_view"]


def owners(sim: SimCluster, envoys: list[dict]) -> dict[str, str]:
    return ray.get(sim.actor("gateway-head").owners.remote([e["id"] for e in envoys]), timeout=30)


def runs_on(sim: SimCluster, host: str) -> set[str]:
    conn = apsw.Connection(str(sim.root / host / f"bolt-{host}" / "state.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {r[0] for r in conn.execute("SELECT run_id FROM runs")}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fleet(sim, tmp_path_factory):
    base = tmp_path_factory.mktemp("envoys")
    token = sim.gateway_admin("token.create", {"uses": 9})["token"]
    envoys = [join_envoy(base / f"e{i}", f"127.0.0.1:{sim.port}", token) for i in range(9)]
    return {"envoys": envoys, "produced": []}


def run_all(fleet: dict, envoys: list[dict] | None = None) -> list[dict]:
    out = []
    for e in envoys or fleet["envoys"]:
        report = run_envoy_once(e)
        if report.get("run_id"):
            fleet["produced"].append(report["run_id"])
        out.append(report)
    return out


def test_envoys_admitted_at_one_bolt_are_served_by_their_owners(sim, fleet):
    joined_at = {h for h in BOLTS if (sim.root / h / f"bolt-{h}" / "state.db").exists() and _joins(sim, h)}
    assert len(joined_at) == 1, "every join with one token goes to the token's owner bolt"
    reports = run_all(fleet)
    assert all(r["exit_code"] == 0 and r["flushed"] >= 1 for r in reports), [r["stderr"] for r in reports]
    assigned = owners(sim, fleet["envoys"])
    assert len(set(assigned.values())) >= 2, f"nine envoys should spread over the bolts: {assigned}"
    for e in fleet["envoys"]:
        host = assigned[e["id"]].removeprefix("bolt-")
        assert any(r in runs_on(sim, host) for r in fleet["produced"]), "reports land on the owner bolt"
    served_elsewhere = [e for e in fleet["envoys"] if assigned[e["id"]].removeprefix("bolt-") not in joined_at]
    assert served_elsewhere, "some envoys check in through a bolt that did not admit them"


def _joins(sim: SimCluster, host: str) -> int:
    conn = apsw.Connection(str(sim.root / host / f"bolt-{host}" / "state.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT COUNT(*) FROM envoys WHERE token_id IS NOT NULL").fetchone()[0]
    finally:
        conn.close()


def test_a_revocation_at_one_bolt_is_refused_at_every_bolt(sim, fleet):
    victim = fleet["envoys"][0]
    owner = owners(sim, [victim])[victim["id"]]
    elsewhere = next(f"bolt-{h}" for h in BOLTS if f"bolt-{h}" != owner)
    answer = ray.get(sim.actor(elsewhere).admin.remote("envoys.revoke", {"envoy_id": victim["id"]}), timeout=30)
    assert "ok" in answer, answer
    fleet["envoys"].remove(victim)
    sim.wait("every bolt lists the revocation",
             lambda: all(_revoked_at(sim, f"bolt-{h}", victim["id"]) for h in BOLTS), timeout_s=20)
    # The envoy learns it at its next contact (a connection the gateway drops while it applies
    # the new revocation set ends without an answer; the envoy's next run is told "revoked").
    refused = sim.wait("the envoy is told it is revoked",
                       lambda: (r := run_envoy_once(victim)) and "revoked" in (r.get("stderr", "") + str(r)).lower() and r,
                       timeout_s=30, every_s=0.5)
    assert refused.get("flushed", 0) == 0
    # Served by any bolt, it is refused: ask each bolt directly as its owner would be asked.
    for h in BOLTS:
        answer = ray.get(sim.actor(f"bolt-{h}").handle_batch.remote(
            [{"type": "checkin", "envoy_id": victim["id"], "body": {}}]), timeout=30)
        assert answer[0]["error"]["code"] == "revoked", (h, answer)


def _revoked_at(sim: SimCluster, bolt: str, envoy_id: str) -> bool:
    entries = ray.get(sim.actor(bolt).revocations.remote(), timeout=30)
    return any(envoy_id in str(entry) for entry in entries)


def test_a_dead_bolt_moves_only_its_envoys_and_takes_them_back(sim, fleet):
    before = owners(sim, fleet["envoys"])
    victim_bolt = max(set(before.values()), key=lambda b: sum(1 for v in before.values() if v == b))
    host = victim_bolt.removeprefix("bolt-")
    sim.kill_host(host)
    sim.wait("the gateway drops the dead bolt", lambda: victim_bolt not in gateway_view(sim)["live"], timeout_s=30)
    after = owners(sim, fleet["envoys"])
    for e in fleet["envoys"]:
        if before[e["id"]] == victim_bolt:
            assert after[e["id"]] != victim_bolt
        else:
            assert after[e["id"]] == before[e["id"]], "envoys of live bolts do not move"
    reports = run_all(fleet)
    assert all(r["exit_code"] == 0 and r["flushed"] >= 1 for r in reports), [r["stderr"][-300:] for r in reports]
    sim.restore_host(host)
    sim.wait("the bolt is back and has taken its slice again",
             lambda: owners(sim, fleet["envoys"]) == before, timeout_s=60)
    info = ray.get(sim.actor(victim_bolt).bolt_info.remote(), timeout=30)
    assert info["ready"] and info["agents"] >= len(fleet["envoys"])
    sim.wait("roster digests agree", lambda: ray.get(sim.actor(victim_bolt).bolt_info.remote())["digest_agreement"] == 1.0,
             timeout_s=30)
    reports = run_all(fleet)
    assert all(r["exit_code"] == 0 for r in reports)
    stored = set().union(*(runs_on(sim, h) for h in BOLTS))
    missing = set(fleet["produced"]) - stored
    assert not missing, f"{len(missing)} run reports lost"


def test_spanner_status_reports_slices_and_convergence(sim, fleet, monkeypatch, capsys):
    sim.wait("converged", lambda: all(b.get("digest_agreement") == 1.0 for b in
                                      sim.gateway_admin("spanner.status")["bolts"].values()), timeout_s=30)
    info = sim.gateway_admin("spanner.status")
    bolts = info["bolts"]
    assert sorted(bolts) == [f"bolt-{h}" for h in BOLTS]
    assert sum(b["slice"] for b in bolts.values()) == len(fleet["envoys"]), "each admitted envoy is served once"
    assert all(b["ready"] and b["states"]["revoked"] == 1 for b in bolts.values())
    from vigo.cli import spanner as spanner_cli

    monkeypatch.setattr(spanner_cli.client, "admin", lambda address, op, args=None: info)
    spanner_cli.status(address="http://unused", as_json=False)
    out = capsys.readouterr().out
    assert "BOLT" in out and "bolt-a" in out and "1.00" in out and "quorum: yes" in out


def test_server_status_lists_every_bolt(sim, fleet, monkeypatch, capsys):
    info = sim.gateway_admin("status")
    assert info["spanner"] and sorted(info["bolts"]) == [f"bolt-{h}" for h in BOLTS]
    from vigo.cli import client
    from vigo.cli import server as server_cli

    monkeypatch.setattr(client, "cluster_token", lambda: "t")
    monkeypatch.setattr(client, "find_gateways", lambda address, token: [])
    monkeypatch.setattr(client, "admin", lambda address, op, args=None: dict(info))
    server_cli.status(address="http://unused", as_json=False)
    out = capsys.readouterr().out
    assert all(f"bolt-{h}" in out for h in BOLTS) and "ENVOYS" in out


def test_a_malformed_roster_message_is_dropped_and_the_bolt_keeps_serving(sim, fleet):
    for junk in (b"", b"\x01junk", b"\x63" + b"\x00" * 40):
        assert ray.get(sim.actor("bolt-a").roster_receive.remote(junk), timeout=30) == []
    assert ray.get(sim.actor("bolt-a").bolt_ping.remote(), timeout=30)["ready"]
    assert all(r["exit_code"] == 0 for r in run_all(fleet, fleet["envoys"][:2]))
