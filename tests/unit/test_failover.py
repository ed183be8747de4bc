"""Promotion carried out (vigo.actors.failover) against the fake runtime: who is asked, in which
order members are fenced and promoted, what waiting costs, what a refusal leaves untouched, the
auto-failover watchdog, and the gateway's way to a new primary. Control is the real topology
core (vigo.server.topology); members and gateways are small fakes."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.fakeruntime import FakeRuntime
from vigo.actors import failover
from vigo.actors.gateway import RayBackend
from vigo.actors.runtime import RayRuntime, Runtime
from vigo.errors import NotPrimaryError, PromoteError
from vigo.server.topology import Topology

GEN = "3f0c9a1d2b7e4411"
MEMBERS = {"primary-p0": "a", "standby-p0-b": "b", "standby-p0-c": "c"}


class FakeMember:
    def __init__(self, name: str, role: str, offset: int = 1000, term: int = 3, committed_at: float = 100.0) -> None:
        self.name, self.role, self.term = name, role, term
        self.position = [GEN, 4, offset]
        self.committed_at = committed_at
        self.feeds: list[str] | None = None

    def ping(self) -> dict:
        return {"partition": "p0", "name": self.name, "role": self.role, "term": self.term, "pid": 1,
                "position": self.position, "committed_at": self.committed_at}

    def fence(self, term: int) -> dict:
        if self.role == "primary" and term > self.term:
            self.role = "standby"
        self.term = max(self.term, term)
        return self.ping()

    def promote(self, term: int, standbys: list[str]) -> dict:
        self.role, self.term, self.feeds = "primary", term, standbys
        return {**self.ping(), "promotion_s": 0.25}

    def admin(self, op: str, args: dict) -> dict:
        if self.role != "primary":
            raise NotPrimaryError(f"{self.name} is a standby")
        return {"ok": {"op": op, "served_by": self.name}}


class FakeGateway:
    def __init__(self) -> None:
        self.rerouted = 0

    def reroute(self) -> int:
        self.rerouted += 1
        return 0


@pytest.fixture
def scene(tmp_path):
    rt = FakeRuntime()
    control = rt.add("control", Topology(str(tmp_path / "control")), host="head")
    control.register_partition("p0", "primary-p0", 3, str(tmp_path / "a"), ["standby-p0-b", "standby-p0-c"],
                               None, MEMBERS)
    control.register_gateway("gateway-head", "127.0.0.1:7700", "node-head")
    members = {"primary-p0": FakeMember("primary-p0", "primary")}
    for name in ("standby-p0-b", "standby-p0-c"):
        members[name] = FakeMember(name, "standby")
    for name, member in members.items():
        rt.add(name, member, host=MEMBERS[name])
    gateway = rt.add("gateway-head", FakeGateway(), host="head")
    return SimpleNamespace(rt=rt, control=control, members=members, gateway=gateway)


def test_fences_first_then_promotes_then_commits_the_route_then_reroutes(scene):
    rt = scene.rt
    control = scene.control
    members = scene.members
    gateway = scene.gateway
    result = failover.promote("p0", rt=rt)

    assert rt.calls == [
        ("control", "route", ("p0",)),
        ("primary-p0", "ping", ()), ("standby-p0-b", "ping", ()), ("standby-p0-c", "ping", ()),
        ("primary-p0", "fence", (4,)), ("standby-p0-c", "fence", (4,)),
        ("standby-p0-b", "promote", (4, ["primary-p0", "standby-p0-c"])),
        ("control", "set_primary", ("p0", "standby-p0-b", 4)),
        ("control", "get_topology", ()),
        ("gateway-head", "reroute", ()),
    ]
    assert rt.clock == 0  # everyone answered: no deadline was waited out
    assert members["primary-p0"].role == "standby" and members["standby-p0-b"].role == "primary"
    assert members["standby-p0-b"].feeds == ["primary-p0", "standby-p0-c"]
    route = control.route("p0")
    assert (route["primary"], route["term"], route["standbys"]) == ("standby-p0-b", 4, ["primary-p0", "standby-p0-c"])
    assert gateway.rerouted == 1
    assert {k: result[k] for k in ("partition", "old_primary", "old_primary_alive", "new_primary", "term", "held",
                                   "primary_position", "fenced", "gateways", "open_s", "forced")} == {
        "partition": "p0", "old_primary": "primary-p0", "old_primary_alive": True, "new_primary": "standby-p0-b",
        "term": 4, "held": [GEN, 4, 1000], "primary_position": [GEN, 4, 1000],
        "fenced": ["primary-p0", "standby-p0-c"], "gateways": ["gateway-head"], "open_s": 0.25, "forced": False}


def test_members_on_a_dead_host_are_neither_asked_nor_waited_for(scene):
    rt = scene.rt
    rt.kill_host("a")
    result = failover.promote("p0", rt=rt)
    assert rt.methods_called("ping") == ["standby-p0-b", "standby-p0-c"]
    assert rt.methods_called("fence") == ["primary-p0", "standby-p0-c"]  # the term is sent to the dead one too
    assert rt.clock == 0  # ... but nobody waits for it
    assert result["old_primary_alive"] is False and result["primary_position"] is None
    assert result["fenced"] == ["standby-p0-c"] and result["new_primary"] == "standby-p0-b"


def test_an_unreachable_primary_costs_one_ping_deadline_for_everyone(scene):
    rt = scene.rt
    rt.hang("primary-p0")  # its host is alive as far as Ray knows, but it does not answer
    result = failover.promote("p0", rt=rt)
    assert rt.methods_called("ping") == ["primary-p0", "standby-p0-b", "standby-p0-c"]
    assert rt.clock == failover.PING_TIMEOUT_S  # once, not once per member; its fencing is not waited for
    assert result["old_primary_alive"] is False and result["fenced"] == ["standby-p0-c"]


def test_a_member_that_died_is_skipped_everywhere(scene):
    rt = scene.rt
    rt.lose("standby-p0-c")
    rt.lose("gateway-head")
    result = failover.promote("p0", rt=rt)
    assert result["new_primary"] == "standby-p0-b" and result["fenced"] == ["primary-p0"]
    assert result["gateways"] == []  # it re-resolves by itself at its next failed call


def test_the_named_standby_is_promoted(scene):
    rt = scene.rt
    control = scene.control
    result = failover.promote("p0", "standby-p0-c", rt=rt)
    assert result["new_primary"] == "standby-p0-c" and control.route("p0")["primary"] == "standby-p0-c"
    assert rt.methods_called("fence") == ["primary-p0", "standby-p0-b"]


def test_a_refusal_changes_nothing(scene):
    rt = scene.rt
    control = scene.control
    members = scene.members
    members["standby-p0-b"].position = [GEN, 4, 10]
    members["standby-p0-c"].position = [GEN, 4, 20]
    with pytest.raises(PromoteError, match="standby standby-p0-c is behind the primary primary-p0"):
        failover.promote("p0", rt=rt)
    assert rt.methods_called("fence") == rt.methods_called("promote") == rt.methods_called("reroute") == []
    assert control.route("p0")["term"] == 3 and members["primary-p0"].role == "primary"

    result = failover.promote("p0", force=True, rt=rt)  # --force: the difference is lost
    assert result["forced"] is True and result["new_primary"] == "standby-p0-c"


def test_an_unknown_standby_is_refused_before_anyone_is_asked(scene):
    rt = scene.rt
    with pytest.raises(PromoteError, match="unknown standby 'standby-p0-zz'"):
        failover.promote("p0", "standby-p0-zz", rt=rt)
    assert rt.calls == [("control", "route", ("p0",))]


def test_watchdog_promotes_through_control_in_process(scene):
    rt = scene.rt
    control = scene.control
    entry = control.route("p0")
    entry["failover"] = {"auto": True, "after_s": 0.0}
    dog = failover.Watchdog(control, rt=rt)

    dog.round()  # the primary answers: nothing happens
    assert rt.methods_called("promote") == [] and "p0" not in dog.down_since

    rt.hang("primary-p0")
    dog.round()
    assert control.route("p0")["primary"] == "standby-p0-b" and control.route("p0")["term"] == 4
    # control's own methods were called in-process, never through its actor handle
    assert [m for name, m, _ in rt.calls if name == "control"] == []
    # the watchdog asked the primary twice; promote() knows it is unreachable and does not ask again
    assert rt.methods_called("ping") == ["primary-p0", "primary-p0", "standby-p0-b", "standby-p0-c"]
    assert "p0" not in dog.down_since


def test_watchdog_waits_for_failover_after_s(scene):
    rt = scene.rt
    control = scene.control
    control.route("p0")["failover"] = {"auto": True, "after_s": 3600.0}
    rt.hang("primary-p0")
    dog = failover.Watchdog(control, rt=rt)
    dog.round()
    assert "p0" in dog.down_since and rt.methods_called("promote") == []


def test_gateway_backend_follows_a_promotion_after_a_lost_primary(scene):
    rt = scene.rt
    control = scene.control
    members = scene.members

    async def run() -> dict:
        backend = RayBackend("p0", rt=rt)
        assert (await backend.admin("status", {}))["ok"]["served_by"] == "primary-p0"
        rt.lose("primary-p0")
        control.set_primary("p0", "standby-p0-b", 4)
        members["standby-p0-b"].role = "primary"
        return await backend.admin("status", {})

    answer = asyncio.run(run())
    assert answer["ok"]["served_by"] == "standby-p0-b"


def test_the_fake_and_ray_implement_the_same_interface():
    for name, declared in inspect.getmembers(Runtime, inspect.isfunction):
        if name.startswith("_"):
            continue
        for impl in (FakeRuntime, RayRuntime):
            method = getattr(impl, name)
            assert list(inspect.signature(method).parameters) == list(inspect.signature(declared).parameters), (impl, name)
            assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(declared), (impl, name)


def test_the_wrapper_and_the_cores_load_no_ray():
    code = ("import sys, vigo.actors.runtime, vigo.server.peer.promotion, vigo.server.peer.replication, "
            "vigo.server.peer.standby, vigo.server.topology, vigo.server.spanner.bolt, vigo.server.spanner.routing; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
