"""Placement without Ray (issue 18): what a deployment wants on the nodes that are there and what
waits for its node (vigo.server.topology), control starting it when a labelled node arrives
(vigo.actors.control, vigo.actors.placement), deploy applying a changed server.yaml one actor
at a time and leaving an unchanged one alone (vigo.actors.deploy), and constructors that never
fail because another actor is not up (vigo.actors.member, vigo.actors.gateway). Members and
gateways are small fakes except where their constructor itself is tested."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.fakeruntime import FakeRuntime
from vigo.actors import console as console_actor
from vigo.actors import deploy as deploy_mod
from vigo.actors import gateway as gateway_mod
from vigo.actors import member as member_mod
from vigo.actors import placement
from vigo.actors.control import Control
from vigo.config import ServerConfig
from vigo.errors import ConfigError
from vigo.server import topology
from vigo.server.topology import Topology, gateway_revision, member_revision, pending, wanted_actors


class FakeMember:
    def __init__(self, data_dir, cfg, name, role) -> None:
        self.name, self.role, self.term = name, role, 1
        self.revision = member_revision(data_dir, cfg, name)
        self.pid = id(self)

    def ping(self) -> dict:
        return {"name": self.name, "role": self.role, "term": self.term, "revision": self.revision, "pid": self.pid}


class FakeGateway:
    def __init__(self, name, partition, host, port, settings) -> None:
        self.name, self.port = name, port
        self.revision = gateway_revision(name, partition, host, port, settings)

    def status(self) -> dict:
        return {"name": self.name, "state": "serving", "advertise": f"10.0.0.1:{self.port}", "revision": self.revision}


class FakeConsole:
    def __init__(self, host_label, listen_host, port, session_ttl_s) -> None:
        self.port = port
        self.revision = console_actor.console_revision(host_label, listen_host, port, session_ttl_s)

    def status(self) -> dict:
        return {"name": "console", "state": "serving", "url": f"https://10.0.0.1:{self.port}/",
                "revision": self.revision}


@pytest.fixture
def scene(tmp_path, monkeypatch):
    rt = FakeRuntime()
    rt.alive_hosts |= {"head", "a"}
    monkeypatch.setattr(placement, "Member", FakeMember)
    monkeypatch.setattr(placement, "Gateway", FakeGateway)
    monkeypatch.setattr(console_actor, "Console", FakeConsole)
    controls = []

    def make_control(state_dir: str) -> Control:
        control = Control(state_dir, rt=rt)
        control._stop.set()  # the test drives poll_nodes itself
        controls.append(control)
        return control

    monkeypatch.setattr(deploy_mod, "Control", make_control)
    return rt, controls


def cfg_for(tmp_path, **changes) -> ServerConfig:
    cfg = ServerConfig.local(str(tmp_path / "{host}"), 7700)
    cfg.archive.url = ""
    cfg.replication.standbys = ["b"]
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def run_deploy(rt, tmp_path, cfg, **kw) -> dict:
    return deploy_mod.deploy(cfg, host="a", control_host="head", control_dir=str(tmp_path / "control"), rt=rt, **kw)


# --- the topology's view -------------------------------------------------------------------------

def test_wanted_and_pending_follow_the_labelled_nodes():
    spec = {"members": [{"name": "primary-p0", "host": "a", "role": "primary"},
                        {"name": "standby-p0-b", "host": "b", "role": "standby"}],
            "gateways": {"hosts": None, "partition": "p0", "listen_host": "0.0.0.0", "port": 7700, "settings": {}}}
    assert [(w["kind"], w["name"]) for w in wanted_actors(spec, {"a", "head"})] == [
        ("member", "primary-p0"), ("gateway", "gateway-a"), ("gateway", "gateway-head")]
    assert pending(spec, {"a", "head"}) == [{"kind": "standby", "name": "standby-p0-b", "host": "b",
                                             "reason": "waiting for a node labelled vigo-host=b"}]
    assert pending(spec, {"a", "b"}) == []
    listed = {**spec, "gateways": {**spec["gateways"], "hosts": ["a", "c"]}}
    assert [w["name"] for w in wanted_actors(listed, {"a", "b"}) if w["kind"] == "gateway"] == ["gateway-a"]
    assert [p["name"] for p in pending(listed, {"a", "b"})] == ["gateway-c"]
    assert wanted_actors(None, {"a"}) == [] and pending(None, {"a"}) == []


def test_revisions_ignore_what_does_not_define_the_actor():
    cfg = ServerConfig.local("/data").to_dict()
    base = member_revision("/data", cfg, "primary-p0")
    gateway_only = {**cfg, "gateway": {**cfg["gateway"], "retry_after_s": 9.0}, "listen": {"host": "::", "port": 1}}
    assert member_revision("/data", gateway_only, "primary-p0") == base  # gateway settings restart gateways only
    assert member_revision("/data", {**cfg, "checkin": {**cfg["checkin"], "interval_s": 9.0}}, "primary-p0") != base
    assert member_revision("/other", cfg, "primary-p0") != base
    assert gateway_revision("g", "p0", "0.0.0.0", 7700, {"a": 1}) == gateway_revision("g", "p0", "0.0.0.0", 7700, {"a": 1})
    assert gateway_revision("g", "p0", "0.0.0.0", 7700, {"a": 1}) != gateway_revision("g", "p0", "0.0.0.0", 7701, {"a": 1})


def test_deployment_survives_a_restart_and_pauses(tmp_path):
    topo = Topology(str(tmp_path))
    topo.set_deployment({"members": [], "gateways": None})
    mtime = topo.path.stat().st_mtime_ns
    topo.set_deployment({"members": [], "gateways": None})  # unchanged: not rewritten
    assert topo.path.stat().st_mtime_ns == mtime
    topo.pause_placement()
    assert Topology(str(tmp_path)).deployment()["paused"] is True
    assert topo.set_deployment({"members": [], "gateways": None})["paused"] is False


def test_a_standby_dropped_from_the_config_leaves_the_route(tmp_path):
    topo = Topology(str(tmp_path))
    topo.register_partition("p0", "primary-p0", 1, "/d", ["standby-p0-b", "standby-p0-c"], None,
                            {"primary-p0": "a", "standby-p0-b": "b", "standby-p0-c": "c"})
    route = topo.register_partition("p0", "primary-p0", 1, "/d", ["standby-p0-b"], None,
                                    {"primary-p0": "a", "standby-p0-b": "b"})
    assert route["standbys"] == ["standby-p0-b"] and set(route["hosts"]) == {"primary-p0", "standby-p0-b"}
    topo.set_primary("p0", "standby-p0-b", 2)  # after a failover the promoted member stays
    route = topo.register_partition("p0", "primary-p0", 1, "/d", [], None, {"primary-p0": "a"})
    assert (route["primary"], route["standbys"]) == ("standby-p0-b", ["primary-p0"])


# --- deploy and control ------------------------------------------------------------------------

def test_deploy_succeeds_with_absent_hosts_and_control_places_them_when_they_arrive(scene, tmp_path):
    rt, controls = scene
    result = run_deploy(rt, tmp_path, cfg_for(tmp_path), gateway_hosts=None)
    assert result["pending"] == [{"kind": "standby", "name": "standby-p0-b", "host": "b",
                                  "reason": "waiting for a node labelled vigo-host=b"}]
    assert sorted(result["gateways"]) == ["gateway-a", "gateway-head"]
    assert "standby-p0-b" not in rt.actors
    control = controls[-1]
    assert control.poll_nodes(now=0.0) == []  # nothing new
    rt.alive_hosts.add("b")  # the worker joins
    assert sorted(control.poll_nodes(now=1.0)) == ["gateway-b", "standby-p0-b"]
    assert rt.hosts["standby-p0-b"] == "b" and rt.hosts["gateway-b"] == "b"
    assert control.placement_status()["pending"] == []
    assert control.poll_nodes(now=2.0) == []  # no node change, no sweep due: not even looked at
    rt.kill(rt.actor("gateway-b"))  # killed for good: brought back by the next sweep
    assert control.poll_nodes(now=3.0) == []
    assert control.poll_nodes(now=1.0 + 31.0) == ["gateway-b"]


def test_deploy_refuses_without_the_primary_or_control_host(scene, tmp_path):
    rt, _ = scene
    with pytest.raises(ConfigError, match=r"vigo-host=a \(the primary of p0 lives there\)"):
        rt.alive_hosts.discard("a")
        run_deploy(rt, tmp_path, cfg_for(tmp_path))


def test_unchanged_deploy_changes_nothing_and_a_changed_one_restarts_in_order(scene, tmp_path):
    rt, _ = scene
    rt.alive_hosts.add("b")
    first = run_deploy(rt, tmp_path, cfg_for(tmp_path))
    assert sorted(first["started"]) == ["gateway-a", "gateway-b", "gateway-head", "primary-p0", "standby-p0-b"]
    objects = dict(rt.actors)
    again = run_deploy(rt, tmp_path, cfg_for(tmp_path))
    assert (again["started"], again["restarted"], again["stopped"]) == ([], [], [])
    assert rt.actors == objects and rt.killed == []

    changed = run_deploy(rt, tmp_path, cfg_for(tmp_path, checkin__interval_s=45.0, gateway__retry_after_s=7.0))
    assert changed["restarted"] == ["standby-p0-b", "primary-p0", "gateway-a", "gateway-b", "gateway-head"]
    assert rt.killed == changed["restarted"]  # each killed once, in that order

    rt.killed.clear()
    gateway_only = run_deploy(rt, tmp_path, cfg_for(tmp_path, checkin__interval_s=45.0, gateway__retry_after_s=3.0))
    assert gateway_only["restarted"] == ["gateway-a", "gateway-b", "gateway-head"]  # members untouched


def test_a_standby_removed_from_the_config_is_stopped(scene, tmp_path):
    rt, _ = scene
    rt.alive_hosts |= {"b", "c"}
    run_deploy(rt, tmp_path, cfg_for(tmp_path, replication__standbys=["b", "c"]))
    result = run_deploy(rt, tmp_path, cfg_for(tmp_path))
    assert result["stopped"] == ["standby-p0-c"] and "standby-p0-c" not in rt.actors
    # server.yaml changed for every member (replication.standbys), the primary last: it feeds one fewer
    assert result["restarted"] == ["standby-p0-b", "primary-p0"]


def test_teardown_pauses_placement_first(scene, tmp_path):
    rt, controls = scene
    run_deploy(rt, tmp_path, cfg_for(tmp_path))
    killed = deploy_mod.teardown(rt=rt)
    assert killed == ["primary-p0", "gateway-a", "gateway-head", "console", "control"]  # standby-p0-b was never placed
    assert rt.calls[[c[1] for c in rt.calls].index("pause_placement")][0] == "control"
    rt.alive_hosts.add("b")
    assert controls[-1].poll_nodes(now=100.0) == []  # paused: a node arriving places nothing


def test_the_console_runs_on_controls_host_and_follows_its_settings(scene, tmp_path):
    rt, _ = scene
    first = run_deploy(rt, tmp_path, cfg_for(tmp_path))
    assert first["console"] == "https://10.0.0.1:7780/" and rt.hosts["console"] == "head"
    console = rt.actors["console"]
    assert run_deploy(rt, tmp_path, cfg_for(tmp_path))["console"] == "https://10.0.0.1:7780/"
    assert rt.actors["console"] is console and "console" not in rt.killed  # unchanged: left alone
    moved = run_deploy(rt, tmp_path, cfg_for(tmp_path, console__port=7781))
    assert moved["console"] == "https://10.0.0.1:7781/" and rt.killed == ["console"]
    assert "restarted" in moved and "primary-p0" not in moved["restarted"]  # members untouched
    off = run_deploy(rt, tmp_path, cfg_for(tmp_path, console__enabled=False))
    assert off["console"] is None and "console" not in rt.actors


def test_a_replaced_actor_that_control_already_started_is_kept(scene, tmp_path):
    rt, _ = scene
    run_deploy(rt, tmp_path, cfg_for(tmp_path))
    want = "new"
    calls = []

    def start() -> None:
        calls.append("start")

    class Racer:  # what control placed between the kill and deploy's look
        def ping(self) -> dict:
            return {"revision": want}

    real_kill = rt.kill

    def kill(handle) -> None:
        real_kill(handle)
        rt.add(handle.name, Racer(), host="a")

    rt.kill = kill
    placement.replace(rt, "primary-p0", want, "ping", start, timeout_s=5)
    assert calls == []


# --- constructors that never wait on another actor ----------------------------------------------

def test_a_gateway_constructor_returns_and_says_why_while_control_does_not_answer(monkeypatch):
    monkeypatch.setattr(gateway_mod, "INIT_WAIT_S", 0.3)
    monkeypatch.setattr(gateway_mod, "CONNECT_CALL_TIMEOUT_S", 0.05)
    rt = FakeRuntime()
    rt.add("control", Topology.__new__(Topology), host="head")
    rt.hang("control")

    async def scenario() -> tuple[dict, float]:
        t0 = time.monotonic()
        gw = gateway_mod.Gateway.__new__(gateway_mod.Gateway)
        await gw.__init__("gateway-x", "p0", "127.0.0.1", 0, None, rt=rt)
        took = time.monotonic() - t0
        status = await gw.status()
        gw._connect_task.cancel()
        assert repr(gw) == "vigo-gateway[starting]" and gw._published is False
        answer = await gw.admin("status", {})
        assert answer["error"]["code"] == "unavailable"
        return status, took

    status, took = asyncio.run(scenario())
    assert took < 2.0
    assert status["state"] == "starting" and "TimeoutError" in status["error"] and status["advertise"] is None


def test_a_gateway_without_any_control_keeps_trying(monkeypatch):
    monkeypatch.setattr(gateway_mod, "INIT_WAIT_S", 0.2)
    rt = FakeRuntime()

    async def scenario() -> dict:
        gw = gateway_mod.Gateway.__new__(gateway_mod.Gateway)
        await gw.__init__("gateway-x", "p0", "127.0.0.1", 0, None, rt=rt)
        status = await gw.status()
        gw._connect_task.cancel()
        return status

    status = asyncio.run(scenario())
    assert status["state"] == "starting" and status["error"].startswith("ValueError")


def test_a_late_gateway_restarts_once_to_publish_its_endpoint(monkeypatch):
    monkeypatch.setattr(gateway_mod, "REPUBLISH_DELAY_S", 0.0)
    exits = []
    monkeypatch.setattr(gateway_mod.os, "_exit", lambda code: exits.append(code))

    async def scenario(published: bool) -> None:
        gw = gateway_mod.Gateway.__new__(gateway_mod.Gateway)
        gw.name, gw._published, gw._init_done = "gateway-x", published, asyncio.Event()
        gw._init_done.set()
        await gw._republish_if_late()

    asyncio.run(scenario(True))
    assert exits == []
    asyncio.run(scenario(False))
    assert exits == [1]


def test_a_member_constructor_returns_while_control_does_not_answer_then_takes_its_role(tmp_path, monkeypatch):
    monkeypatch.setattr(member_mod, "INIT_WAIT_S", 0.2)
    monkeypatch.setattr(member_mod, "START_RETRY_CAP_S", 0.1)
    rt = FakeRuntime()
    control = rt.add("control", Topology(str(tmp_path / "control")), host="head")
    rt.hang("control")
    t0 = time.monotonic()
    member = member_mod.Member(str(tmp_path / "a"), None, "primary-p0", "primary", rt=rt)
    try:
        assert time.monotonic() - t0 < 2.0
        info = member.ping()
        assert info["role"] == "starting" and "TimeoutError" in info["error"] and info["pid"] == os.getpid()
        assert repr(member) == "vigo-member[starting]"
        # The partition moved on while it was away: it must follow control, not its birth role.
        control.register_partition("p0", "standby-p0-b", 3, "/d", ["primary-p0"])
        rt.hung.discard("control")
        deadline = time.monotonic() + 10
        while member.ping()["role"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)
        info = member.ping()
        assert (info["role"], info["term"]) == ("standby", 3) and "error" not in info
    finally:
        member._stop.set()


def test_a_member_without_any_control_starts_in_its_birth_role(tmp_path):
    member = member_mod.Member(str(tmp_path / "a"), None, "primary-p0", "primary", rt=FakeRuntime())
    try:
        assert member.ping()["role"] == "primary"
    finally:
        member._stop.set()
        member.partition.close()


def test_topology_helpers_need_no_ray():
    assert topology.gateway_name("h1") == "gateway-h1"


def test_server_deploy_and_status_say_what_is_pending():
    from vigo.cli.server import _change_rows, _placement_rows

    waiting = [{"kind": "standby", "name": "standby-p0-node-2", "host": "node-2",
                "reason": "waiting for a node labelled vigo-host=node-2"}]
    rows = _change_rows({"started": ["primary-p0"], "restarted": [], "pending": waiting})
    assert ("pending", "standby on node-2: waiting for a node labelled vigo-host=node-2") in rows
    assert ("restarted", "nothing (no setting changed)") in rows
    assert _placement_rows({"pending": waiting, "paused": False}) == [
        ("pending", "standby on node-2: waiting for a node labelled vigo-host=node-2")]
    assert _placement_rows({"error": "control did not answer (TimeoutError)"})[0][1].startswith("unknown")


def test_drivers_of_a_loopback_cluster_stay_on_loopback():
    from vigo.actors.runtime import _is_loopback

    assert _is_loopback("127.0.0.1:6379") and _is_loopback("localhost:1") and _is_loopback("[::1]:6379")
    assert not _is_loopback("auto") and not _is_loopback("10.0.0.1:6379") and not _is_loopback("head:6379")


def test_a_node_that_comes_back_gets_the_settings_deployed_while_it_was_away(scene, tmp_path):
    rt, controls = scene
    rt.alive_hosts.add("b")
    run_deploy(rt, tmp_path, cfg_for(tmp_path))
    control = controls[-1]
    control.poll_nodes(now=0.0)
    old = rt.actors["standby-p0-b"]
    rt.kill_host("b")  # b is away (its standby RESTARTING, as Ray shows it) during the next deploy
    changed = run_deploy(rt, tmp_path, cfg_for(tmp_path, checkin__interval_s=45.0))
    assert "standby-p0-b" not in changed["restarted"] and rt.actors["standby-p0-b"] is old
    assert [p["name"] for p in changed["pending"]] == ["standby-p0-b"]
    # b's raylet comes back with a new node id; Ray restarts the standby with its old arguments
    rt.alive_hosts.add("b")
    rt.hung -= {"standby-p0-b", "gateway-b"}
    rt.host_labels = lambda: {"node-head": "head", "node-a": "a", "node-b-again": "b"}
    control.poll_nodes(now=1.0)
    assert rt.actors["standby-p0-b"] is not old
    assert rt.actors["standby-p0-b"].revision == member_revision(
        str(tmp_path / "b"), cfg_for(tmp_path, checkin__interval_s=45.0).to_dict() | {"data_dir": str(tmp_path / "b")},
        "standby-p0-b")
    assert control._recheck == set()


def test_a_redeploy_after_a_failover_needs_the_promoted_members_host_not_the_birth_primarys(scene, tmp_path):
    rt, controls = scene
    rt.alive_hosts.add("b")
    run_deploy(rt, tmp_path, cfg_for(tmp_path))
    controls[-1].set_primary("p0", "standby-p0-b", 2)
    rt.actors["standby-p0-b"].role, rt.actors["standby-p0-b"].term = "primary", 2
    rt.kill_host("a")  # the old primary's host is gone
    result = run_deploy(rt, tmp_path, cfg_for(tmp_path))
    assert (result["primary"], result["term"]) == ("standby-p0-b", 2)
    assert [p["name"] for p in result["pending"]] == ["primary-p0"]


def test_automatic_failover_is_held_while_a_deploy_restarts_the_primary(scene, tmp_path):
    rt, controls = scene
    run_deploy(rt, tmp_path, cfg_for(tmp_path))
    run_deploy(rt, tmp_path, cfg_for(tmp_path, checkin__interval_s=45.0))
    holds = [args for name, method, args in rt.calls if method == "hold_failover"]
    assert holds == [("p0", 180.0), ("p0", 0)]
    control = controls[-1]
    control.hold_failover("p0", 60)
    assert control.failover_held("p0")
    from vigo.actors.failover import Watchdog

    control.register_partition("p0", "primary-p0", 1, "/d", ["standby-p0-b"], {"auto": True, "after_s": 0.0})
    asked = []
    watchdog = Watchdog(control, rt=rt)
    watchdog._check = lambda *a: asked.append(a)
    watchdog.round()
    assert asked == []  # held: the primary's silence is planned
    control.hold_failover("p0", 0)
    watchdog.round()
    assert [a[0] for a in asked] == ["p0"]


def test_a_gateway_whose_port_is_taken_returns_soon_then_serves_and_republishes(tmp_path, monkeypatch):
    import socket

    from vigo.server.partition import Partition

    monkeypatch.setattr(gateway_mod, "INIT_BIND_WAIT_S", 0.3)
    monkeypatch.setattr(gateway_mod, "CONNECT_RETRY_CAP_S", 0.1)
    monkeypatch.setattr(gateway_mod, "REPUBLISH_DELAY_S", 0.0)
    exits = []
    monkeypatch.setattr(gateway_mod.os, "_exit", lambda code: exits.append(code))
    partition = Partition(tmp_path / "a", ServerConfig.local(tmp_path / "a"))

    class Primary:
        def gateway_material(self, hostnames, ips):
            return partition.gateway_material(hostnames, ips)

    rt = FakeRuntime()
    control = rt.add("control", Topology(str(tmp_path / "control")), host="head")
    control.register_partition("p0", "primary-p0", 1, str(tmp_path / "a"))
    rt.add("primary-p0", Primary(), host="a")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def scenario() -> tuple[dict, dict, str]:
        t0 = time.monotonic()
        gw = gateway_mod.Gateway.__new__(gateway_mod.Gateway)
        await gw.__init__("gateway-a", "p0", "127.0.0.1", port, None, rt=rt)
        assert time.monotonic() - t0 < 5.0  # it did not wait INIT_WAIT_S for a port that stays taken
        first = await gw.status()
        published = repr(gw)
        taken.close()  # the port is free: it binds, serves, and restarts once to publish
        for _ in range(100):
            if exits:
                break
            await asyncio.sleep(0.05)
        second = await gw.status()
        await gw.server.stop()
        gw._connect_task.cancel()
        return first, second, published

    try:
        first, second, published = asyncio.run(scenario())
    finally:
        taken.close()
        partition.close()
    assert first["state"] == "starting" and first["bind_error_s"] > 0 and "OSError" in first["error"]
    assert published == "vigo-gateway[starting]"
    assert second["state"] == "serving" and second["advertise"] == f"127.0.0.1:{port}"
    assert exits == [1]
    assert control.get_topology()["gateways"]["gateway-a"]["endpoint"] == f"127.0.0.1:{port}"
