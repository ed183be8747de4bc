"""Envoys follow the topology (issue 19), without a network or Ray: which gateways an envoy
knows and in which order it dials them (vigo/agent/gateways.py), what a check-in answer's list
does to the cache, the socket options that notice a dead link, the daemon connection's reaction
to a missed answer (vigo/agent/link.py, with a fake connection), and control's list of live
gateways (vigo/actors/control.py, with the fake runtime)."""

from __future__ import annotations

import asyncio
import collections
import socket
from pathlib import Path
from typing import Any

from tests.fakeruntime import FakeRuntime
from vigo.actors.control import Control
from vigo.agent import gateways, link, transport
from vigo.agent.cache import Cache
from vigo.agent.config import EnvoyConfig
from vigo.agent.session import take_checkin_answer
from vigo.protocol import validate_body

GWS = ["10.0.0.1:7700", "10.0.0.2:7700", "10.0.0.3:7700", "10.0.0.4:7700"]


# --- the dial order ---------------------------------------------------------------------------


def test_rendezvous_order_is_per_envoy_and_stable():
    a = gateways.dial_order("envoy-a", [], GWS, now=0)
    assert sorted(a) == sorted(GWS)
    assert gateways.dial_order("envoy-a", [], list(reversed(GWS)), now=0) == a  # the list's order is no input
    firsts = {gateways.dial_order(f"envoy-{i}", [], GWS, now=0)[0] for i in range(50)}
    assert firsts == set(GWS)  # envoys do not all start with the same gateway


def test_a_dead_gateways_envoys_spread_over_the_others_and_nobody_else_moves():
    ids = [f"envoy-{i}" for i in range(4000)]
    first = {e: gateways.dial_order(e, [], GWS, now=0)[0] for e in ids}
    dead = GWS[1]
    after = {e: gateways.dial_order(e, [], [g for g in GWS if g != dead], now=0)[0] for e in ids}
    moved = [e for e in ids if first[e] != after[e]]
    assert {first[e] for e in moved} == {dead}  # only the dead gateway's envoys move
    spread = collections.Counter(after[e] for e in moved)
    assert set(spread) == set(GWS) - {dead}
    share = len(moved) / 3
    assert all(abs(n - share) < share * 0.2 for n in spread.values()), spread  # evenly, within 20 %


def test_joined_addresses_are_kept_after_the_listed_ones_and_failures_go_last():
    joined = ["gw.example.com:7700", GWS[0]]
    order = gateways.dial_order("envoy-a", joined, GWS[:3], now=100.0)
    assert order[:3] == gateways.dial_order("envoy-a", [], GWS[:3], now=100.0)
    assert order[3:] == ["gw.example.com:7700"]  # not listed by the server: last, never dropped
    assert gateways.dial_order("envoy-a", joined, None, now=0) == gateways.dial_order("envoy-a", [], joined, now=0)
    top = order[0]
    failed = {top: 90.0}
    order2 = gateways.dial_order("envoy-a", joined, GWS[:3], failed, now=100.0)
    assert order2[-1] == top and order2[:2] == order[1:3]  # suspect: after every other one
    later = gateways.dial_order("envoy-a", joined, GWS[:3], failed, now=90.0 + gateways.SUSPECT_S + 1)
    assert later == order  # a failure long ago no longer counts


def test_a_local_servers_list_pins_its_order():
    assert gateways.pinned_order(["b:1", "a:1", "b:1"], now=0) == ["b:1", "a:1"]
    assert gateways.pinned_order(["b:1", "a:1"], {"b:1": 5.0}, now=10.0) == ["a:1", "b:1"]


def test_learn_keeps_the_newest_non_empty_list_of_dialable_addresses():
    assert gateways.learn(None, None, "s") is None  # an older server's answer: nothing changes
    assert gateways.learn(None, [], "s") is None
    assert gateways.learn(None, ["not an address", 7], "s") is None
    first = gateways.learn(None, [GWS[1], GWS[0], GWS[1], "bad", "[::1]:7700"], "s1", now=10.0)
    assert first == {"list": [GWS[1], GWS[0], "[::1]:7700"], "at": 10.0, "server": "s1", "since": 10.0}
    same = gateways.learn(first, [GWS[1], GWS[0], "[::1]:7700"], "s2", now=20.0)
    assert same["since"] == 10.0 and same["at"] == 20.0 and same["server"] == "s2"
    changed = gateways.learn(same, [GWS[2]], "s2", now=30.0)
    assert changed["since"] == 30.0 and changed["list"] == [GWS[2]]
    assert len(gateways.learn(None, [f"10.1.{i // 250}.{i % 250}:1" for i in range(1000)], "s")["list"]) \
        == gateways.MAX_GATEWAYS


def test_a_checkin_answer_with_or_without_a_list(tmp_path: Path):
    answer = validate_body("checkin_ok", {"term": 1, "interval_s": 30, "splay_s": 3, "bundle": None,
                                          "bundle_version": None, "serial": 0})
    assert answer["gateways"] is None  # the field is optional: an older server's answer is fine
    with Cache(tmp_path / "state") as cache:
        cache.update_meta({"servers": [GWS[0]], "envoy_id": "envoy-a"})
        assert take_checkin_answer(cache, GWS[0], answer, None) == (None, False)
        assert cache.meta("gateways") is None
        assert take_checkin_answer(cache, GWS[0], {**answer, "gateways": GWS[:2]}, None) == (None, False)
        assert cache.meta("gateways")["list"] == GWS[:2]
        take_checkin_answer(cache, GWS[0], answer, None)  # without a list again: the list stays
        assert cache.meta("gateways")["list"] == GWS[:2]
        assert cache.meta("servers") == [GWS[0]]  # the joined address is never rewritten
        stale = take_checkin_answer(cache, GWS[1], {**answer, "term": 0, "gateways": ["1.2.3.4:1"]}, None)
        assert stale[0] is not None and cache.meta("gateways")["list"] == GWS[:2]  # a stale answer teaches nothing


# --- the socket -------------------------------------------------------------------------------


def test_the_envoys_socket_notices_a_dead_link_within_the_bound():
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.connect(server.getsockname())
        assert transport.tune_socket(client)
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == transport.TCP_KEEPALIVE_IDLE_S
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == transport.TCP_USER_TIMEOUT_S * 1000
    # Idle: the first probe after KEEPIDLE, and the user timeout counted from the last ACK.
    assert transport.TCP_KEEPALIVE_IDLE_S < transport.TCP_USER_TIMEOUT_S
    assert transport.DEAD_LINK_S + 1 + 1 <= 10  # + connect and check in, + first flush delay: the bound
    assert transport.tune_socket(None) is False


# --- the daemon's connection, with a fake gateway connection ----------------------------------


class FakeConn:
    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def receive(self) -> Any:
        await self.closed.wait()
        return None


class FakeClient:
    """A connection whose gateway answers nothing (a vanished host, as the envoy sees it)."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.conn = FakeConn()
        self.requests: list[str] = []

    async def request(self, type: str, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(type)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self.conn.closed.set()


async def _no_cache(fn):  # persist=False: the link never needs the cache in these paths
    raise AssertionError("the cache was used")


def _link(tmp_path: Path, **config: Any) -> link.Link:
    return link.Link(tmp_path, _no_cache, EnvoyConfig(**config), persist=False)


def test_an_unanswered_ping_drops_the_link_and_the_next_gateway_is_tried_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(link, "PING_TIMEOUT_S", 0.2)
    monkeypatch.setattr(link, "STABLE_S", 0.0)

    async def main() -> None:
        lk = _link(tmp_path, keepalive_s=0.5)
        client = FakeClient(GWS[0])
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(lk._serve(client, False), 5)
        took = asyncio.get_running_loop().time() - started
        assert client.requests == ["ping"] and 0.6 < took < 2.0
        assert GWS[0] in lk.failed and lk._at_once and not lk.connected
        assert "keepalive ping" in (lk.state.error or "")

    asyncio.run(main())


def test_a_connection_lost_at_once_waits_the_backoff(tmp_path, monkeypatch):
    monkeypatch.setattr(link, "STABLE_S", 60.0)

    async def main() -> None:
        lk = _link(tmp_path, keepalive_s=60)
        client = FakeClient(GWS[0])
        task = asyncio.create_task(lk._serve(client, False))
        await asyncio.sleep(0.05)
        client.conn.closed.set()  # the gateway closed it right after the check-in
        await asyncio.wait_for(task, 5)
        assert GWS[0] in lk.failed and not lk._at_once  # no hot loop against a flapping gateway

    asyncio.run(main())


def test_abandon_after_a_missed_checkin_answer(tmp_path, monkeypatch):
    monkeypatch.setattr(link, "STABLE_S", 0.0)

    async def main() -> None:
        lk = _link(tmp_path, keepalive_s=60)
        client, other = FakeClient(GWS[0]), FakeClient(GWS[1])
        task = asyncio.create_task(lk._serve(client, False))
        await asyncio.sleep(0.05)
        await lk.abandon("no checkin answer within 5 s", other)  # not the live one: nothing happens
        assert lk.connected and not lk.failed
        await lk.abandon("no checkin answer within 5 s", client)
        await asyncio.wait_for(task, 5)
        assert not lk.connected and lk._at_once and list(lk.failed) == [GWS[0]]
        assert lk.state.error == "no checkin answer within 5 s"

    asyncio.run(main())


# --- control: the gateways envoys are told about ----------------------------------------------


def test_control_lists_the_gateways_whose_node_is_alive(tmp_path):
    rt = FakeRuntime()
    rt.alive_hosts |= {"head", "a", "b"}
    control = Control(str(tmp_path / "control"), rt=rt)
    control._stop.set()
    endpoints = {"head": GWS[0], "a": GWS[1], "b": GWS[2]}
    for host, endpoint in endpoints.items():
        control.register_gateway(f"gateway-{host}", endpoint, f"node-{host}")
    assert control.gateway_endpoints() == GWS[:3]  # before the first poll: every registered one
    control.poll_nodes(now=0.0)
    rt.alive_hosts.discard("b")  # b's node is gone (Ray declared it dead)
    control.poll_nodes(now=1.0)
    assert control.gateway_endpoints() == GWS[:2]
    view = control.placement_status()["gateways"]
    assert view["gateway-b"]["listed"] is False and view["gateway-a"]["listed"] is True
    rt.alive_hosts.add("b")  # back (a real raylet would come back with a new node id and re-register)
    control.poll_nodes(now=2.0)
    assert control.gateway_endpoints() == GWS[:3]
