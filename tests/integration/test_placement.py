"""Deploying onto a cluster whose nodes come later, actors that come back by themselves, and
redeploys that apply a changed server.yaml (issue 18), on a simulated Ray cluster: the head
(control) and host a (the primary) at first; host b (the standby's) joins after the deploy.
Every node has its own loopback address and runs a gateway (``listen.host: node-ip``).

The tests run in order on one cluster, each starting where the previous left it:
1. deploy succeeds with b absent and says what is pending;
2. b joins: control starts its standby and its gateway, nobody deploys again;
3. control and a gateway killed together, the gateway first (control frozen): it comes back
   and serves; then control, the primary and a gateway killed at once: all serve again;
4. an unchanged deploy restarts nothing; a changed one restarts each actor once, one at a time,
   and never leaves envoys without a gateway;
   b away during a changed deploy: when it returns, control restarts its actors with the new
   settings;
5. teardown leaves no actor process and nothing is placed again.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import ray

from tests.raycluster import SimCluster, envoy_status, join_envoy, run_envoy_once
from tests.serverharness import stack_files
from vigo.actors.control import NODE_POLL_S
from vigo.actors.deploy import deploy, teardown
from vigo.actors.placement import running_revision, wanted_revision
from vigo.actors.runtime import RAY
from vigo.server.topology import wanted_actors

pytestmark = pytest.mark.timeout(600)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stack"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    cluster = SimCluster(root, hosts=("a",), node_ips=True).start()
    try:
        yield cluster
    finally:
        print("\ntimings:", {k: round(v, 2) for k, v in TIMINGS.items()})
        cluster.shutdown()


def config(sim: SimCluster, **changes):
    cfg = sim.config(standbys=["b"])
    cfg.listen.host = "node-ip"  # each node's gateway on that node's own address
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def do_deploy(sim: SimCluster, cfg) -> dict:
    return deploy(cfg, host="a", control_host="head", control_dir=str(sim.root / "control"), timeout_s=90)


def status(name: str) -> dict:
    return ray.get(ray.get_actor(name, namespace="vigo").status.remote(), timeout=30)


def serving(name: str) -> dict | None:
    st = status(name)
    return st if st.get("state") == "serving" else None


def ping(name: str) -> dict:
    return ray.get(ray.get_actor(name, namespace="vigo").ping.remote(), timeout=30)


def control_pid() -> int:
    return ray.get(ray.get_actor("control", namespace="vigo").pid.remote(), timeout=30)


def pids(names: list[str]) -> dict[str, int]:
    out = {}
    for name in names:
        out[name] = control_pid() if name == "control" else (
            status(name)["pid"] if name.startswith("gateway-") else ping(name)["pid"])
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def listening(endpoint: str) -> bool:
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def test_1_deploy_succeeds_with_nodes_absent_and_says_what_is_pending(sim):
    t0 = time.monotonic()
    cfg = config(sim)
    result = sim._with_free_port(cfg, lambda: do_deploy(sim, cfg))  # another port if a Ray process took it
    TIMINGS["deploy (head + a, b absent)"] = time.monotonic() - t0
    assert result["pending"] == [{"kind": "standby", "name": "standby-p0-b", "host": "b",
                                  "reason": "waiting for a node labelled vigo-host=b"}]
    assert sorted(result["gateways"]) == ["gateway-a", "gateway-head"]  # one per labelled node
    assert result["gateways"]["gateway-a"] == f"127.0.0.11:{sim.port}"
    assert result["standbys"] == ["standby-p0-b"] and result["primary"] == "primary-p0"
    with pytest.raises(ValueError):
        ray.get_actor("standby-p0-b", namespace="vigo")  # not created where it cannot run
    placement = ray.get(sim.control().placement_status.remote(), timeout=30)
    assert [p["name"] for p in placement["pending"]] == ["standby-p0-b"]
    # `server status` carries control's view through the gateway
    assert [p["name"] for p in sim.gateway_admin("status")["placement"]["pending"]] == ["standby-p0-b"]
    sim.admin("secrets.set", {"name": "api_token", "value": b"placement-secret"})
    sim.admin("stack.push", {"files": stack_files(EXAMPLE)})


def test_2_a_node_that_joins_gets_its_standby_and_gateway_without_a_deploy(sim):
    t0 = time.monotonic()
    sim.restore_host("b")  # joins for the first time
    alive_at = time.monotonic()
    sim.wait("gateway-b serving", lambda: serving("gateway-b"), timeout_s=60, every_s=0.1)
    TIMINGS["node b alive -> gateway-b serving"] = time.monotonic() - alive_at
    TIMINGS["add_node b"] = alive_at - t0
    assert TIMINGS["node b alive -> gateway-b serving"] < NODE_POLL_S + 10
    assert status("gateway-b")["advertise"] == f"127.0.0.12:{sim.port}"
    sim.wait("standby-p0-b in sync", sim.all_in_sync, timeout_s=90)
    TIMINGS["node b alive -> standby in sync"] = time.monotonic() - alive_at
    placement = ray.get(sim.control().placement_status.remote(), timeout=30)
    assert placement["pending"] == [] and {"gateway-b", "standby-p0-b"} <= {p["name"] for p in placement["placed"]}


def test_2b_envoys_learn_every_gateway_and_status_shows_each_ones_node_and_connections(sim, tmp_path):
    """Issue 19: a check-in answer lists every gateway control knows alive (b's included,
    placed by control), so an envoy joined through one learns them all; `server status` gives
    each gateway's node, since when it serves and its connections."""
    names = ["gateway-a", "gateway-b", "gateway-head"]
    endpoints = sorted(status(n)["advertise"] for n in names)
    assert sorted(ray.get(sim.control().gateway_endpoints.remote(), timeout=30)) == endpoints
    token = sim.admin("token.create", {"uses": 1})["token"]
    envoy = join_envoy(tmp_path / "learner", f"127.0.0.11:{sim.port}", token)

    def learned() -> list[str] | None:
        assert run_envoy_once(envoy)["exit_code"] == 0
        got = sorted((envoy_status(envoy).get("gateways") or {}).get("list") or [])
        return got if got == endpoints else None

    sim.wait("the envoy's list naming every gateway", learned, timeout_s=30, every_s=1)  # gateways re-read every 2 s
    assert envoy_status(envoy)["servers"] == [f"127.0.0.11:{sim.port}"]  # joined with one
    view = sim.gateway_admin("status")["placement"]["gateways"]
    assert sorted(view) == names
    for name in names:
        g = view[name]
        assert g["listed"] is True and g["state"] == "serving" and isinstance(g["connections"], int), g
        assert g["serving_since"] and g["node"], g


def test_3_a_gateway_restarted_before_control_comes_back_and_serves(sim, tmp_path):
    token = sim.admin("token.create", {"uses": 2})["token"]
    envoy = join_envoy(tmp_path / "e1", f"127.0.0.11:{sim.port}", token)
    assert run_envoy_once(envoy)["exit_code"] == 0

    # Control frozen (its calls hang, like a control still restarting), the gateway killed: Ray
    # restarts the gateway while control cannot answer.
    control, gateway = control_pid(), status("gateway-a")["pid"]
    os.kill(control, signal.SIGSTOP)
    try:
        killed_at = time.monotonic()
        os.kill(gateway, signal.SIGKILL)
        time.sleep(6)
    finally:
        os.kill(control, signal.SIGCONT)
    resumed_at = time.monotonic()
    back = sim.wait("gateway-a serving again", lambda: serving("gateway-a"), timeout_s=60, every_s=0.1)
    TIMINGS["control resumed -> restarted gateway serving"] = time.monotonic() - resumed_at
    TIMINGS["gateway killed -> serving (control frozen 6 s)"] = time.monotonic() - killed_at
    assert back["pid"] != gateway
    assert run_envoy_once(envoy)["exit_code"] == 0

    # Control, the primary and the gateway killed at the same moment: whoever comes first waits
    # for the others, nobody dies for good.
    before = pids(["control", "primary-p0", "gateway-a"])
    killed_at = time.monotonic()
    for pid in before.values():
        os.kill(pid, signal.SIGKILL)
    sim.wait("gateway-a serving after all three died", lambda: serving("gateway-a"), timeout_s=90, every_s=0.1)
    sim.wait("primary back", lambda: ping("primary-p0")["role"] == "primary", timeout_s=90)
    TIMINGS["control+primary+gateway killed -> all serving"] = time.monotonic() - killed_at
    after = pids(["control", "primary-p0", "gateway-a"])
    assert all(after[n] != before[n] for n in before), (before, after)
    report = sim.wait("an envoy run through gateway-a", lambda: (r := run_envoy_once(envoy))["exit_code"] == 0 and r,
                      timeout_s=60, every_s=1)
    assert report["exit_code"] == 0


def test_4_redeploys_apply_changes_one_actor_at_a_time(sim):
    names = ["control", "primary-p0", "standby-p0-b", "gateway-a", "gateway-b", "gateway-head"]
    before = pids(names)
    result = do_deploy(sim, config(sim))
    assert (result["started"], result["restarted"], result["stopped"], result["pending"]) == ([], [], [], [])
    assert pids(names) == before  # an unchanged deploy changes nothing

    endpoints = {n: status(n)["advertise"] for n in names if n.startswith("gateway-")}
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # what an envoy sees: how many gateways accept a connection
        while not stop.is_set():
            seen.append(sum(listening(e) for e in endpoints.values()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        result = do_deploy(sim, config(sim, checkin__interval_s=45.0, gateway__retry_after_s=7.0))
    finally:
        stop.set()
        watcher.join()
    TIMINGS["changed deploy (2 members + 3 gateways restarted)"] = time.monotonic() - t0
    restarted = result["restarted"]
    assert sorted(restarted) == sorted(names[1:]) and result["started"] == []
    assert restarted.index("standby-p0-b") < restarted.index("primary-p0") < restarted.index("gateway-a")
    after = pids(names)
    assert after["control"] == before["control"]  # control has nothing to apply
    assert all(after[n] != before[n] for n in names[1:])
    assert min(seen) >= len(endpoints) - 1, seen  # one gateway down at a time, never all
    assert max(seen) == len(endpoints)
    sim.wait("standby in sync after the restarts", sim.all_in_sync, timeout_s=90)
    assert sim.admin("status")["term"] == 1  # restarts are not promotions
    again = do_deploy(sim, config(sim, checkin__interval_s=45.0, gateway__retry_after_s=7.0))
    assert again["restarted"] == [] and pids(names) == after


def test_4b_a_node_away_during_a_deploy_gets_the_new_settings_when_it_returns(sim):
    gateway_b = status("gateway-b")["advertise"]
    sim.kill_host("b")
    sim.wait("b gone", lambda: "b" not in ray.get(sim.control().placement_status.remote(), timeout=30)["hosts"],
             timeout_s=60)
    sim.wait("gateway-b left out of the list envoys receive",
             lambda: gateway_b not in ray.get(sim.control().gateway_endpoints.remote(), timeout=30), timeout_s=30)
    result = do_deploy(sim, config(sim, checkin__interval_s=50.0))  # b is away
    assert "standby-p0-b" not in result["restarted"] and "gateway-b" not in result["restarted"]
    assert {p["name"] for p in result["pending"]} == {"standby-p0-b"}
    spec = ray.get(sim.control().deployment.remote(), timeout=30)
    wanted = wanted_actors(spec, {"b"})
    assert {i["name"] for i in wanted} == {"standby-p0-b", "gateway-b"}

    def current() -> bool:
        return all(running_revision(i, RAY) == wanted_revision(spec, i) for i in wanted)

    t0 = time.monotonic()
    sim.restore_host("b")  # Ray restarts b's actors with their old arguments; control fixes that
    sim.wait("b's actors at the deployed revision", current, timeout_s=120, every_s=0.5)
    TIMINGS["b back -> its actors at the new revision"] = time.monotonic() - t0
    sim.wait("gateway-b listed again", lambda: gateway_b in ray.get(sim.control().gateway_endpoints.remote(), timeout=30),
             timeout_s=30)
    sim.wait("standby in sync again", sim.all_in_sync, timeout_s=90)


def test_5_teardown_leaves_no_actor_process(sim):
    names = ["control", "primary-p0", "standby-p0-b", "gateway-a", "gateway-b", "gateway-head"]
    before = pids(names)
    killed = teardown()
    assert set(killed) == set(names) | {"console"}  # deploy starts the console too (console.enabled)
    sim.wait("every actor process gone", lambda: not any(alive(p) for p in before.values()), timeout_s=30)
    time.sleep(NODE_POLL_S * 2)  # control is gone; nothing places the actors again
    for name in names:
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace="vigo")
