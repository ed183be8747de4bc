"""The envoy daemon (`vigo-envoy run`) against servers that go away, come back, lie and flap.

The six scenarios of the offline-first issue, each asserting outcomes counted server-side by run
id (nothing lost, nothing stored twice), plus config reload and survival of broken traits:

1. outage            a real Ray dev server (`vigocli server start --dev`, `vigocli server stop`,
                     started again on the same data dir and ports) and subprocess daemons.
2. lost acks         the in-process harness below (real TLS gateway, real partition, no Ray) with
                     the gateway's test hook that drops the connection after a results batch
                     committed and before its ack is written.
3. flapping          the harness gateway restarted ten times on the same port under three
                     subprocess daemons.
4. rollback refusal  a harness server restored from an older copy of the data dir, made to
                     present its (older) bundle to an envoy that is ahead.
5. kill -9           subprocess daemons killed mid-run and mid-flush, over and over.
6. herd              200 envoys reconnecting at once. Not 200 subprocess daemons (they would not
                     fit this 2-core machine): 200 in-process ``vigo.agent.link.Link`` objects,
                     the daemon's real connection, backoff and paced-flush code, each with its
                     own state dir, certificate and LMDB cache, in one event loop.

The harness (``Fleet``) is ``tests/serverharness.py``'s pieces (InProcessBackend, a real
GatewayServer, a real Partition) arranged so the gateway can stop and start again on the same
port while the partition stays.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    EXAMPLE_STACK,
    SECRET,
    cli,
    example_stack_copy,
    many_files_stack,
    write_policy,
)
from tests.serverharness import ADMIN_TOKEN, InProcessBackend, stack_files
from vigo.agent import runner
from vigo.agent.cache import Cache
from vigo.agent.config import EnvoyConfig
from vigo.agent.daemon import CacheThread
from vigo.agent.link import Link
from vigo.config import ServerConfig
from vigo.server.gateway import GatewayServer
from vigo.server.partition import Partition

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent
RUN_LINE = re.compile(r"vigo\.agent\.runner: run ([0-9a-f]{32}) bundle \S+ serial (\d+)( \(offline\))?:")
#: Short backoff so tests see reconnects within seconds (the defaults are 1 s / 60 s).
FAST = {"reconnect_base_s": 0.2, "reconnect_cap_s": 1.0, "keepalive_s": 5.0, "run_checkin_budget_s": 3.0}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the in-process server ----------------------------------------------------------------------


class Fleet:
    """A real partition and a real TLS gateway on a fixed port of 127.0.0.1; the gateway can be
    stopped and started again (same port) while envoys run. No Ray."""

    def __init__(self, data_dir: Path, *, port: int | None = None, backend_cls: type = InProcessBackend,
                 **gateway_overrides: Any) -> None:
        self.cfg = ServerConfig.local(data_dir, port=0)
        for key, value in gateway_overrides.items():
            setattr(self.cfg.gateway, key, value)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.partition = Partition(data_dir, self.cfg)
        self.backend = backend_cls(self.partition)
        self.port = port or free_port()
        self.gateway: GatewayServer | None = None
        self.stats: list[dict[str, Any]] = []  # status() of every gateway that was stopped

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, **attrs: Any) -> None:
        material = self.partition.gateway_material()

        async def go() -> GatewayServer:
            gw = GatewayServer(self.backend, ca_pem=material["ca_pem"], cert_pem=material["cert_pem"],
                               key_pem=material["key_pem"], cfg=self.cfg.gateway, host="127.0.0.1",
                               port=self.port, admin_token=lambda: ADMIN_TOKEN,
                               revocations=material["revocations"], **attrs)
            await gw.start()
            return gw

        self.gateway = self.call(go())

    def stop(self) -> None:
        if self.gateway is not None:
            gw, self.gateway = self.gateway, None
            self.call(gw.stop())
            self.stats.append(gw.status() | {"acks_dropped": gw.stats.acks_dropped})

    def close(self) -> None:
        self.stop()
        self.partition.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def admin(self, op: str, args: dict[str, Any] | None = None) -> Any:
        answer = self.call(self.backend.admin(op, args or {}))
        if "error" in answer:
            raise AssertionError(f"admin {op}: {answer['error']}")
        return answer["ok"]

    def push(self, stack_dir: Path) -> dict[str, Any]:
        return self.admin("stack.push", {"files": stack_files(stack_dir)})

    def token(self, uses: int = 10) -> str:
        return self.admin("token.create", {"uses": uses})["token"]

    def stored(self, envoy_id: str) -> dict[str, Any]:
        return self.admin("envoys.show", {"envoy_id": envoy_id, "runs": 1000})


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "server")
    try:
        f.admin("secrets.set", {"name": "api_token", "value": SECRET})
        f.push(EXAMPLE_STACK)
        f.start()
        yield f
    finally:
        f.close()


# --- subprocess envoys --------------------------------------------------------------------------


class Envoy:
    """One envoy: a state dir, a traits dir, a root, a config file, and its daemon process."""

    def __init__(self, base: Path, name: str, *, interval_s: float = 1.0, config: dict[str, Any] | None = None) -> None:
        self.dir = base / name
        self.state = self.dir / "state"
        self.root = self.dir / "root"
        self.traits = self.dir / "traits.d"
        self.traits.mkdir(parents=True, exist_ok=True)
        (self.traits / "roles.yaml").write_text("roles: [web]\n")
        self.config = self.dir / "envoy.yaml"
        self.config.write_text(yaml.safe_dump({**FAST, **(config or {})}))
        self.log = self.dir / "daemon.log"
        self.interval_s = interval_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.id = ""

    def join(self, server: str, token: str) -> str:
        proc = subprocess.run([cli("vigo-envoy"), "join", "--server", server, "--token", token, "--state-dir",
                               self.state, "--traits-dir", self.traits, "--json"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        self.id = json.loads(proc.stdout)["envoy_id"]
        return self.id

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        assert self.proc is None or self.proc.poll() is not None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [cli("vigo-envoy"), "run", "--state-dir", str(self.state), "--root", str(self.root),
                 "--traits-dir", str(self.traits), "--config", str(self.config), "--interval", str(self.interval_s),
                 "--splay", "0", *extra], stdout=out, stderr=subprocess.STDOUT)
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"daemon {self.dir.name} did not exit within 30 s of SIGTERM\n{self.log_text()[-3000:]}") from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def runs(self) -> list[tuple[str, int, bool]]:
        """(run id, serial, offline) of every run the daemon queued, in order, from its log."""
        return [(m[1], int(m[2]), bool(m[3])) for m in RUN_LINE.finditer(self.log_text())]

    def run_ids(self) -> list[str]:
        return [r[0] for r in self.runs()]

    def queued(self) -> list[dict[str, Any]]:
        with Cache(self.state, readonly=True) as cache:
            return cache.pending(limit=100_000, max_bytes=1 << 40)

    def status(self) -> dict[str, Any]:
        proc = subprocess.run([cli("vigo-envoy"), "status", "--json", "--state-dir", self.state],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def stop_if_running(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def envoys(tmp_path: Path) -> Iterator[Callable[..., Envoy]]:
    made: list[Envoy] = []

    def make(name: str, **kwargs: Any) -> Envoy:
        envoy = Envoy(tmp_path / "envoys", name, **kwargs)
        made.append(envoy)
        return envoy

    try:
        yield make
    finally:
        for envoy in made:
            envoy.stop_if_running()


def assert_stored_exactly_once(stored: dict[str, Any], expected: list[str] | set[str]) -> list[dict[str, Any]]:
    runs = stored["runs"]
    ids = [r["run_id"] for r in runs]
    assert len(ids) == len(set(ids)) == stored["run_count"], "a run id is stored twice"
    missing, extra = set(expected) - set(ids), set(ids) - set(expected)
    assert not missing, f"{len(missing)} run(s) never reached the server: {sorted(missing)[:5]}"
    assert not extra, f"the server holds {len(extra)} run(s) nobody made: {sorted(extra)[:5]}"
    return runs


def no_traceback(envoy: Envoy) -> None:
    text = envoy.log_text()
    assert "Traceback" not in text, text[-4000:]


# --- 1. outage on a real dev server -------------------------------------------------------------


def _run(*args: object, env: dict[str, str] | None = None, check: bool = True,
         timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN / str(args[0])), *map(str, args[1:])], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


FLIP_POLICY = {
    "name": "flip",
    "resources": [
        {"file": "/etc/vigo-demo/mode-blue", "content": "blue\n", "when": 'custom.mode == "blue"'},
        {"file": "/etc/vigo-demo/mode-green", "content": "green\n", "when": 'custom.mode == "green"'},
    ],
}


@pytest.mark.faults
def test_outage_of_the_whole_server_runs_offline_and_flushes_every_report_once(tmp_path: Path, envoys):
    """Scenario 1 on a real Ray dev server: converged envoys, `vigocli server stop`, a trait file
    changes on one envoy, its offline runs converge against the new value (a `when:` flips a
    resource), several offline runs queue up, the server starts again on the same data dir and
    ports, and every queued report arrives exactly once, in order, offline runs marked, with
    their true run times."""
    data = tmp_path / "server"
    dash, ray_port, gw_port = free_port(), free_port(), free_port()
    env = {"VIGO_ADDRESS": f"http://127.0.0.1:{dash}"}
    start_args = ("vigocli", "server", "start", "--dev", "--data-dir", data, "--dashboard-port", dash,
                  "--ray-port", ray_port, "--port", gw_port, "--json")
    info = json.loads(_run(*start_args, env=env).stdout)
    try:
        # The stack the dev server re-pushes on every start (so a restart keeps the same serial).
        stack = Path(info["stack_dir"])
        (stack / "flip.yaml").write_text(yaml.safe_dump(FLIP_POLICY, sort_keys=False))
        pushed = json.loads(_run("vigocli", "stack", "push", stack, "--json", env=env).stdout)
        a, b = envoys("a", interval_s=1.5), envoys("b", interval_s=1.5)
        for envoy in (a, b):
            (envoy.traits / "mode.yaml").write_text("mode: blue\n")
            envoy.join(info["gateway"], info["join_token"])
            envoy.start()

        def shown(envoy: Envoy) -> dict[str, Any]:
            return json.loads(_run("vigocli", "envoys", "show", envoy.id, "--runs", "1000", "--json", env=env).stdout)

        for envoy in (a, b):
            wait_for(lambda e=envoy: any(s == pushed["serial"] and not off for _, s, off in e.runs()), 60,
                     f"{envoy.dir.name} to converge serial {pushed['serial']} online")
            wait_for(lambda e=envoy: not e.queued(), 30, f"{envoy.dir.name}'s queue to drain")
        assert (a.root / "etc/vigo-demo/mode-blue").read_text() == "blue\n"
        listed = {e["id"]: e for e in json.loads(_run("vigocli", "envoys", "list", "--json", env=env).stdout)}
        assert listed[a.id]["status"] == "converged" and listed[b.id]["status"] == "converged"

        stopping_at = time.time()
        _run("vigocli", "server", "stop", "--data-dir", data, env=env)
        (a.traits / "mode.yaml").write_text("mode: green\n")  # the host changes while nobody watches
        for envoy in (a, b):
            already = len(envoy.runs())
            wait_for(lambda e=envoy, n=already: sum(1 for r in e.runs()[n:] if r[2]) >= 3, 60,
                     f"3 more offline runs on {envoy.dir.name}")
        assert (a.root / "etc/vigo-demo/mode-green").read_text() == "green\n"  # converged against the new trait
        assert not (b.root / "etc/vigo-demo/mode-green").exists()
        status = a.status()
        assert status["daemon"]["running"] and status["link"]["connected"] is False
        assert status["offline_since"] and stopping_at < status["offline_since"] <= time.time()
        assert status["queue"]["runs"] >= 3 and status["queue"]["offline_runs"] >= 3
        offline_queued = {r["run_id"] for r in a.queued() if r["offline"]}
        flipped = [r for r in a.queued() if r["offline"] and any(
            res["id"] == "file:/etc/vigo-demo/mode-green" and res["status"] == "changed" for res in r["resources"])]
        assert flipped, "no offline report shows the mode-green file being created"

        restarting_at = time.time()
        info2 = json.loads(_run(*start_args, env=env).stdout)
        assert info2["gateway"] == info["gateway"] and info2["bundle"]["serial"] == pushed["serial"]
        for envoy in (a, b):
            wait_for(lambda e=envoy: not e.queued() and e.status()["link"]["connected"], 60,
                     f"{envoy.dir.name} to reconnect and flush")
        for envoy in (a, b):
            assert envoy.alive()
            assert envoy.terminate() == 0
            no_traceback(envoy)

        for envoy in (a, b):
            stored = shown(envoy)
            runs = assert_stored_exactly_once(stored, envoy.run_ids())
            by_id = {r["run_id"]: r for r in runs}
            logged_offline = {rid for rid, _serial, off in envoy.runs() if off}
            assert logged_offline and {rid for rid, r in by_id.items() if r["offline"]} == logged_offline
            # In order: oldest first, so arrival order follows run order.
            ordered = sorted(runs, key=lambda r: r["started_at"])
            received = [r["received_at"] for r in ordered]
            assert received == sorted(received)
            # True run times, not the arrival time: runs made while the server was away keep
            # their start time and arrived after it came back.
            during = [by_id[rid] for rid in logged_offline if by_id[rid]["started_at"] < restarting_at]
            assert len(during) >= 3
            assert all(r["received_at"] > restarting_at for r in during)
        assert offline_queued <= {r["run_id"] for r in shown(a)["runs"] if r["offline"]}
        status = a.status()
        assert status["offline_since"] is None and status["last_flush"]["acked"] >= 1
        assert status["daemon"]["running"] is False
    finally:
        _run("vigocli", "server", "stop", "--data-dir", data, env=env, check=False)


# --- 2. lost acknowledgements -------------------------------------------------------------------


@pytest.mark.faults
def test_a_batch_whose_ack_was_lost_is_resent_and_stored_once(fleet: Fleet, envoys):
    envoy = envoys("lost-ack")
    envoy.join(fleet.address, fleet.token())
    envoy.start()
    wait_for(lambda: len(envoy.runs()) >= 2 and not envoy.queued(), 30, "two online runs flushed")
    fleet.stop()
    wait_for(lambda: sum(1 for r in envoy.runs() if r[2]) >= 4, 30, "four offline runs")
    queued_before = [r["run_id"] for r in envoy.queued()]
    assert len(queued_before) >= 4
    # The gateway commits the next two results batches and drops the connection before each ack.
    fleet.start(drop_results_acks=2)
    wait_for(lambda: fleet.gateway.stats.acks_dropped == 2, 30, "two acks dropped")
    stored_then = {r["run_id"] for r in fleet.stored(envoy.id)["runs"]}
    assert set(queued_before) <= stored_then  # committed although the envoy never heard so
    wait_for(lambda: not envoy.queued(), 30, "the queue to drain after resending")
    assert envoy.terminate() == 0
    assert_stored_exactly_once(fleet.stored(envoy.id), envoy.run_ids())
    assert fleet.stored(envoy.id)["offline_runs"] == 0
    assert envoy.log_text().count("connection to 127.0.0.1") >= 2 or "flush to" in envoy.log_text()
    no_traceback(envoy)


# --- 3. flapping ---------------------------------------------------------------------------------


@pytest.mark.faults
def test_a_gateway_restarting_ten_times_loses_and_duplicates_nothing(fleet: Fleet, envoys):
    fleet_envoys = [envoys(f"flap{i}") for i in range(3)]
    token = fleet.token()
    for envoy in fleet_envoys:
        envoy.join(fleet.address, token)
        envoy.start()
    for envoy in fleet_envoys:
        wait_for(lambda e=envoy: e.runs(), 30, "a first run")
    rng = random.Random(4)
    for _cycle in range(10):
        fleet.stop()
        time.sleep(rng.uniform(0.2, 1.2))
        fleet.start()
        time.sleep(rng.uniform(0.3, 1.5))
        assert all(e.alive() for e in fleet_envoys), "a daemon exited while the gateway flapped"
    for envoy in fleet_envoys:
        wait_for(lambda e=envoy: not e.queued() and e.status()["link"]["connected"], 40, "queues to drain")
    for envoy in fleet_envoys:
        assert envoy.terminate() == 0
        runs = assert_stored_exactly_once(fleet.stored(envoy.id), envoy.run_ids())
        assert len(runs) >= 8
        # It really lost and regained the gateway again and again (a gateway that was up for
        # less than the envoy's backoff may be missed, so not necessarily all eleven times).
        assert envoy.log_text().count("INFO vigo.agent.daemon: connected to") >= 6
        no_traceback(envoy)


# --- 4. rollback refusal -------------------------------------------------------------------------


class StaleBackend(InProcessBackend):
    """A server restored from an old copy that presents its newest bundle to every envoy, even
    one that is ahead of it (the real partition only sends bundles to envoys behind)."""

    async def handle_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answers = await super().handle_batch(items)
        for item, answer in zip(items, answers, strict=True):
            if item["type"] == "checkin" and "ok" in answer:
                answer["ok"]["bundle_serial"] = self.partition.current_serial()
        return answers


@pytest.mark.faults
def test_a_stale_server_presenting_an_older_serial_is_refused(tmp_path: Path, envoys):
    data, old_copy = tmp_path / "server", tmp_path / "server-backup"
    fleet = Fleet(data)
    envoy = envoys("ahead")
    try:
        fleet.admin("secrets.set", {"name": "api_token", "value": SECRET})
        fleet.push(EXAMPLE_STACK)
        fleet.start()
        envoy.join(fleet.address, fleet.token())
        port = fleet.port
        fleet.close()
        shutil.copytree(data, old_copy)  # a backup taken while serial 1 was current

        fleet = Fleet(data, port=port)
        stack = example_stack_copy(tmp_path / "stack2")
        (stack / "templates" / "motd.j2").write_text("serial two\n")
        assert fleet.push(stack)["serial"] == 2
        fleet.start()
        envoy.start()
        motd = envoy.root / "etc/vigo-demo/motd"
        wait_for(lambda: motd.exists() and motd.read_text() == "serial two\n", 30, "serial 2 enforced")
        wait_for(lambda: not envoy.queued(), 30, "flushed")
        fleet.close()

        # The old copy comes back on the same address and presents serial 1.
        fleet = Fleet(old_copy, port=port, backend_cls=StaleBackend)
        fleet.start()
        wait_for(lambda: "already accepted serial 2" in envoy.log_text(), 30, "the refusal")
        refused_at = len(envoy.runs())
        wait_for(lambda: len(envoy.runs()) >= refused_at + 3 and not envoy.queued(), 30, "runs after the refusal")
        assert envoy.terminate() == 0
        assert motd.read_text() == "serial two\n"
        after = envoy.runs()[refused_at:]
        assert after and all(serial == 2 for _, serial, _ in after)
        with Cache(envoy.state, readonly=True) as cache:
            assert cache.meta("highest_serial") == 2 and cache.bundle_info("current")["serial"] == 2
        # The stale server got the reports (they are true), stating serial 2.
        stored = {r["run_id"]: r for r in fleet.stored(envoy.id)["runs"]}
        assert all(stored[rid]["serial"] == 2 for rid, _, _ in after)
        assert envoy.status()["highest_serial"] == 2
        no_traceback(envoy)
    finally:
        fleet.close()


# --- 5. kill -9 mid-run and mid-flush ------------------------------------------------------------


class SlowResultsBackend(InProcessBackend):
    """Results batches commit, then the answer takes a while: a wide window for a kill between
    the server's commit and the envoy's delete."""

    async def handle_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answers = await super().handle_batch(items)
        if any(item["type"] == "results" for item in items):
            await asyncio.sleep(0.4)
        return answers


def _last_event(log: str) -> str:
    for line in reversed(log.splitlines()):
        if "converging bundle" in line:
            return "converging"
        if "sending " in line and "queued report" in line:
            return "sending"
        if RUN_LINE.search(line) or "flushed " in line:
            return "idle"
    return "none"


@pytest.mark.faults
def test_kill_9_mid_run_and_mid_flush_never_loses_or_duplicates(tmp_path: Path, envoys):
    fleet = Fleet(tmp_path / "server", backend_cls=SlowResultsBackend)
    envoy = envoys("killed", interval_s=0.5)
    try:
        fleet.admin("secrets.set", {"name": "api_token", "value": SECRET})
        fleet.push(many_files_stack(tmp_path / "big", 300))
        fleet.start()
        envoy.join(fleet.address, fleet.token())
        seen: set[str] = set()  # every run id ever seen in the queue or the log
        kinds: list[str] = []
        for i in range(10):
            if i == 4:
                fleet.stop()  # a few rounds offline: the queue grows, later flushes are long
            if i == 7:
                fleet.start()
            envoy.start()
            want = "converging" if i % 2 == 0 or fleet.gateway is None else "sending"
            try:
                wait_for(lambda w=want: _last_event(envoy.log_text()) == w, 20, f"the daemon {want}", every=0.01)
            except AssertionError:
                want = "anywhere"
                time.sleep(random.uniform(0.2, 1.0))
            envoy.kill9()
            kinds.append(want)
            with Cache(envoy.state, readonly=True) as cache:
                assert cache.check() == []
                seen |= {r["run_id"] for r in cache.pending(limit=100_000, max_bytes=1 << 40)}
            seen |= set(envoy.run_ids())
        assert "converging" in kinds and "sending" in kinds, kinds
        envoy.start()
        wait_for(lambda: not envoy.queued() and len(envoy.runs()) > len(seen) - 1, 60, "the final flush")
        assert envoy.terminate() == 0
        seen |= set(envoy.run_ids())
        with Cache(envoy.state, readonly=True) as cache:
            assert cache.check() == [] and cache.queue_stats().runs == 0
        assert_stored_exactly_once(fleet.stored(envoy.id), seen)
    finally:
        fleet.close()


# --- 6. the herd -----------------------------------------------------------------------------------


HERD = 200
QUEUED_EACH = 10


@pytest.mark.faults
def test_a_herd_of_200_envoys_reconnecting_at_once_flushes_everything(tmp_path: Path):
    """200 in-process envoys (the daemon's Link: real TLS connections, backoff, checkin and paced
    flush; each its own state dir, certificate and LMDB cache) with 10 queued reports each,
    waiting in backoff for a gateway that comes back. Every report is stored exactly once and
    the only errors the server answered are retry-afters (`overloaded`)."""
    fleet = Fleet(tmp_path / "server")
    try:
        fleet.admin("secrets.set", {"name": "api_token", "value": SECRET})
        stack = tmp_path / "tiny"
        write_policy(stack, "tiny", [{"file": "/etc/tiny", "content": "tiny\n"}])
        fleet.push(stack)
        fleet.start()
        token = fleet.token(uses=HERD)
        states = [tmp_path / "herd" / f"e{i:03d}" for i in range(HERD)]
        asyncio.run(_join_all(fleet.address, token, states))
        fleet.stop()
        # The gateway that comes back sheds load early: at most 8 requests may wait for the
        # primary, the rest are answered `overloaded` with a 1 s retry-after.
        fleet.cfg.gateway.queue_max, fleet.cfg.gateway.retry_after_s = 8, 1.0
        expected = _queue_offline_reports(fleet, states)
        result = asyncio.run(_herd(fleet, states, expected))
    finally:
        fleet.close()
    print("herd:", result)
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert set(result["envoy_errors"]) <= {"overloaded"}, result
    assert set(result["gateway_errors"]) <= {"overloaded"}, result
    assert result["seconds"] < 60, result


async def _join_all(server: str, token: str, states: list[Path]) -> None:
    from vigo.agent.join import join_fleet

    gate = asyncio.Semaphore(16)

    async def one(state: Path) -> None:
        async with gate:
            await join_fleet(state, [server], token)

    await asyncio.gather(*(one(s) for s in states))


def _queue_offline_reports(fleet: Fleet, states: list[Path]) -> dict[str, set[str]]:
    """Ten real offline runs per envoy (the fleet's bundle, from a fetch of it, converged
    against fresh traits into the envoy's own root), queued in its cache."""
    from vigo.agent import traits
    from vigo.crypto.keys import parse_public_key
    from vigo.policy import bundle as bundle_mod

    data = fleet.partition.bundle_bytes(fleet.partition.current_serial())
    host_traits = traits.collect(None)
    expected: dict[str, set[str]] = {}
    for state in states:
        with runner.open_cache(state) as cache:
            trusted = parse_public_key(cache.meta("trusted_key"))
            cache.accept_bundle(bundle_mod.decode(data, trusted))
            bundle = cache.bundle_in_force(trusted)
            cache.store_traits(host_traits)
            opts = runner.RunOptions(state_dir=state, root=state / "root")
            ids = set()
            for _ in range(QUEUED_EACH):
                report = runner.converge_and_queue(cache, bundle, opts, offline=True, host_traits=host_traits)
                ids.add(report["run_id"])
            expected[cache.envoy_id] = ids
    return expected


async def _herd(fleet: Fleet, states: list[Path], expected: dict[str, set[str]]) -> dict[str, Any]:
    executor = ThreadPoolExecutor(1, thread_name_prefix="herd-cache")
    caches = [CacheThread(lambda s=s: runner.open_cache(s), executor) for s in states]
    for cache in caches:
        await cache.open()
    config = EnvoyConfig(reconnect_base_s=0.5, reconnect_cap_s=4.0, splay_s=3.0, keepalive_s=30.0)
    links = [Link(s, c, config, rng=random.Random(i), persist=False) for i, (s, c) in enumerate(zip(states, caches, strict=True))]
    tasks = [asyncio.create_task(link.run()) for link in links]
    try:
        await asyncio.sleep(3.0)  # everyone is in backoff now
        assert not any(link.connected for link in links)
        await asyncio.to_thread(fleet.start)
        back = time.monotonic()

        async def all_flushed() -> bool:
            depths = await asyncio.gather(*(c(lambda cache: cache.queue_stats().runs) for c in caches))
            return not any(depths)

        while not await all_flushed():
            assert time.monotonic() - back < 90, "the herd did not flush within 90 s"
            await asyncio.sleep(0.25)
        seconds = time.monotonic() - back
    finally:
        for link in links:
            await link.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for cache in caches:
            await cache.close()
        executor.shutdown()
    lost = duplicated = 0
    for envoy_id, ids in expected.items():
        stored = await asyncio.to_thread(fleet.stored, envoy_id)
        got = [r["run_id"] for r in stored["runs"]]
        lost += len(ids - set(got))
        duplicated += len(got) - len(set(got)) + (stored["run_count"] - len(got))
    envoy_errors: dict[str, int] = {}
    for link in links:
        for code, n in link.counters.errors.items():
            envoy_errors[code] = envoy_errors.get(code, 0) + n
    gw_errors = fleet.gateway.status()["errors"] if fleet.gateway else {}
    return {"lost": lost, "duplicated": duplicated, "seconds": round(seconds, 2), "envoy_errors": envoy_errors,
            "gateway_errors": gw_errors, "reports": sum(len(v) for v in expected.values())}


# --- config, signals, and what must not end the daemon --------------------------------------------


@pytest.mark.faults
def test_broken_traits_failing_resources_and_a_dead_gateway_do_not_end_the_daemon(fleet: Fleet, envoys, tmp_path: Path):
    """A trait script that crashes, one that prints garbage, a resource that fails, a first gateway in
    the list that refuses connections (the daemon goes on to the next): the daemon keeps
    running and reporting. SIGHUP reloads the config (a new interval); a broken config file
    on SIGHUP is logged and the running config kept."""
    stack = example_stack_copy(tmp_path / "failing")
    write_policy(stack, "broken", [{"exec": "always-fails", "command": "exit 3"}])
    fleet.push(stack)
    envoy = envoys("survivor", interval_s=1.0)
    (envoy.traits / "crash.sh").write_text("#!/bin/sh\necho boom >&2\nexit 7\n")
    (envoy.traits / "garbage.sh").write_text("#!/bin/sh\necho '{not json'\n")
    for script in ("crash.sh", "garbage.sh"):
        (envoy.traits / script).chmod(0o755)
    envoy.join(fleet.address, fleet.token())
    dead = f"127.0.0.1:{free_port()}"
    envoy.config.write_text(yaml.safe_dump({**FAST, "servers": [dead, fleet.address]}))
    proc = envoy.start("--interval", "1")
    wait_for(lambda: len(envoy.runs()) >= 2 and not envoy.queued(), 60, "two runs flushed via the second gateway")
    stored = fleet.stored(envoy.id)
    latest = stored["runs"][0]
    failed = [r for r in latest["resources"] if r["status"] == "failed"]
    assert [r["id"] for r in failed] == ["exec:always-fails"]
    assert f"gateway {dead}" in envoy.log_text()

    # SIGHUP with a broken file: logged, the running config stays.
    envoy.config.write_text("servers: [not an address\n")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: keeping the running configuration" in envoy.log_text(), 10, "the refusal")
    # SIGHUP with a good file: the new settings are used (the flag --interval still wins).
    envoy.config.write_text(yaml.safe_dump({**FAST, "servers": [fleet.address], "splay_s": 0}))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: configuration reloaded" in envoy.log_text(), 10, "the reload")
    before = len(envoy.runs())
    wait_for(lambda: len(envoy.runs()) >= before + 2, 30, "runs after the reload")
    assert envoy.alive()
    assert envoy.terminate() == 0
    assert_stored_exactly_once(fleet.stored(envoy.id), envoy.run_ids())
    assert "SIGTERM: finishing the current run" in envoy.log_text()


def test_one_daemon_per_state_dir_and_status_without_a_daemon(fleet: Fleet, envoys):
    envoy = envoys("single")
    envoy.join(fleet.address, fleet.token())
    envoy.start()
    wait_for(lambda: envoy.runs(), 30, "a run")
    second = subprocess.run([cli("vigo-envoy"), "run", "--state-dir", envoy.state, "--config", envoy.config],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1 and "already runs for" in second.stderr
    status = envoy.status()
    assert status["daemon"]["running"] and status["daemon"]["pid"] == envoy.proc.pid
    assert status["link"]["connected"] and status["link"]["server"] == fleet.address
    human = subprocess.run([cli("vigo-envoy"), "status", "--state-dir", envoy.state], capture_output=True,
                           text=True, timeout=30).stdout
    assert "connected" in human and f"yes, to {fleet.address}" in human and "last successful flush" in human
    assert envoy.terminate() == 0
    human = subprocess.run([cli("vigo-envoy"), "status", "--state-dir", envoy.state], capture_output=True,
                           text=True, timeout=30).stdout
    assert "not running" in human
    bad = subprocess.run([cli("vigo-envoy"), "run", "--state-dir", envoy.state, "--config", envoy.dir / "nope.yaml"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_a_revoked_envoy_stops_converging_but_the_daemon_stays_up(fleet: Fleet, envoys):
    envoy = envoys("revoked")
    envoy.join(fleet.address, fleet.token())
    envoy.start()
    motd = envoy.root / "etc/vigo-demo/motd"
    wait_for(lambda: motd.exists() and not envoy.queued(), 30, "a converged, flushed run")
    fleet.admin("envoys.revoke", {"envoy_id": envoy.id})
    wait_for(lambda: "was revoked by the fleet" in envoy.log_text(), 30, "the daemon to learn it was revoked")
    time.sleep(1.5)  # a run that was converging at that moment finishes
    runs_then = len(envoy.runs())
    motd.write_text("edited by hand\n")
    time.sleep(3)  # three intervals
    assert envoy.alive() and len(envoy.runs()) == runs_then
    assert motd.read_text() == "edited by hand\n"  # nothing converged any more
    assert envoy.status()["revoked"] is not None
    assert envoy.terminate() == 0
    # Runs made before the daemon learned it was revoked stay queued (the fleet refuses them);
    # everything else arrived, once.
    still_queued = {r["run_id"] for r in envoy.queued()}
    assert_stored_exactly_once(fleet.stored(envoy.id), set(envoy.run_ids()) - still_queued)
    no_traceback(envoy)
