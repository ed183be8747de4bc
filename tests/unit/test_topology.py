"""The topology core behind the control actor (vigo.server.topology), without Ray."""

from __future__ import annotations

import pytest

from vigo.server.topology import Topology


def test_register_route_and_survive_a_restart(tmp_path):
    topo = Topology(str(tmp_path))
    topo.register_partition("p0", "primary-p0", 1, "/data", ["standby-p0-b", "primary-p0"], None,
                            {"primary-p0": "a", "standby-p0-b": "b"})
    topo.register_gateway("gateway-a", "10.0.0.1:7700", "node-a")
    again = Topology(str(tmp_path))  # a restarted control actor reads its file
    route = again.route("p0")
    assert (route["primary"], route["term"], route["standbys"]) == ("primary-p0", 1, ["standby-p0-b"])
    assert route["failover"] == {"auto": False, "after_s": 5.0} and route["hosts"]["standby-p0-b"] == "b"
    assert again.get_topology()["gateways"]["gateway-a"]["endpoint"] == "10.0.0.1:7700"
    assert again.route("p9") is None and not again.auto_failover()
    again.unregister_gateway("gateway-a")
    assert Topology(str(tmp_path)).get_topology()["gateways"] == {}


def test_a_promotion_stands_against_a_redeploy(tmp_path):
    topo = Topology(str(tmp_path))
    topo.register_partition("p0", "primary-p0", 1, "/data", ["standby-p0-b"])
    topo.set_primary("p0", "standby-p0-b", 2)
    # the config still names primary-p0 at its own (older) term: the promoted primary stays
    topo.register_partition("p0", "primary-p0", 1, "/data", ["standby-p0-b", "standby-p0-c"],
                            {"auto": True, "after_s": 2.0})
    route = topo.route("p0")
    assert (route["primary"], route["term"]) == ("standby-p0-b", 2)
    assert route["standbys"] == ["primary-p0", "standby-p0-c"]
    assert route["history"][-1]["previous"] == "primary-p0" and topo.auto_failover()


def test_a_stale_promotion_is_refused(tmp_path):
    topo = Topology(str(tmp_path))
    topo.register_partition("p0", "primary-p0", 3, "/data", ["standby-p0-b"])
    with pytest.raises(ValueError, match="promotion to term 3 is stale: partition p0 is at term 3"):
        topo.set_primary("p0", "standby-p0-b", 3)
    assert topo.route("p0")["primary"] == "primary-p0"


def test_spanner_bolts(tmp_path):
    topo = Topology(str(tmp_path))
    topo.register_spanner(["bolt-b", "bolt-a"], {"bolt-a": "a", "bolt-b": "b"}, {"suspicion_s": 1.0})
    assert Topology(str(tmp_path)).get_topology()["spanner"]["bolts"] == ["bolt-a", "bolt-b"]

