"""Check-in load on one gateway: many envoys on persistent mutual-TLS connections, stepped rates.

What an operator of a large fleet needs to know: how many check-ins per second one gateway and
its partition's primary sustain, at what latency, and what every connected-but-idle envoy costs
the gateway in memory. Everything runs on this machine (the dev server *and* the load
generator), so the figures are a floor for a real deployment, not a ceiling: the load generator
competes with the gateway and the primary for the same cores (its CPU is measured and shown).

1. A private dev server (``vigocli server start --dev``) on non-default ports with its own data
   dir and Ray temp dir, stopped again at the end (``vigocli server stop --data-dir``; never
   ``ray stop``, which would kill every other Ray cluster on the machine).
2. A join token with enough uses (``vigocli token create``), then ``--envoys`` real joins through
   the envoy's own client code (``EnvoyClient.join``: one anonymous TLS connection per join,
   bounded concurrency). Every join carries a real CSR; to save minutes of key generation all
   CSRs come from ONE EC key (the CA only checks that the CSR is signed by its key).
3. One persistent mutual-TLS connection per envoy (its client certificate from ``join_ok``,
   ``tls_client_context`` from the envoy). Gateway RSS before and after: memory per idle
   connected envoy (target <= 50 KB).
4. Stepped open-loop load (``--rates``, ``--step-seconds`` each): every check-in is a ``checkin``
   (traits shaped like ``vigo.agent.traits.collect()``, serial/term/queue fields) followed by a
   ``results`` message carrying one run report of 20 resources, on the same connection, as an
   envoy's run does. Check-ins are scheduled at the target rate and handed to idle envoys; when
   none is idle they wait in a local backlog and their latency still counts from the scheduled
   time (no coordinated omission). An envoy told ``overloaded`` rests ``retry_after_s`` (plus
   jitter) as the real envoy does; the refused check-in counts as an error. Per step: achieved
   check-ins/s, latency p50/p99 (schedule to ``results_ok``), errors by code, RSS and CPU of
   gateway, primary, load generator, the rest of the dev head, kernel/softirq and everything
   else on the machine, the gateway's batch statistics (``Gateway.status()`` through a Ray
   helper process), and the round trip of a ``ping`` sent every 20 ms on an extra connection
   (answered by the gateway alone: it shows stalls of the gateway's event loop).
5. A profiling step at the highest rate: ``py-spy record --format raw`` on the gateway, the
   primary and the load generator, summarised as top frames (self and inclusive).

Frames are built with a lean encoder (byte-identical to ``protocol.encode``, checked at start)
so that the load generator spends its CPU on TLS and sockets, not on client-side validation.
After connecting, the load generator ``gc.freeze()``s its long-lived objects: a full collection
over 10,000 client connections takes ~0.2 s and would otherwise read as server latency (its own
collections are reported per step).

Targets from the issue (informative, the exit code does not depend on them): >= 3,000
check-ins/s sustained with 10,000 connected envoys at p99 <= 250 ms; <= 50 KB gateway memory
per idle connected envoy.

Writes ``benchmarks/results/checkin_load.json``.

    .venv/bin/python benchmarks/checkin_load.py [--envoys 2000] [--rates 250,500,1000,1500,2000,3000,4000]
        [--step-seconds 10] [--ray-port 6411 --dashboard-port 8291 --port 7711] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import platform
import random
import resource
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout, without installing vigo into the interpreter.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack

import vigo
from vigo import protocol

RESULTS_PATH = Path(__file__).parent / "results" / "checkin_load.json"
TARGETS = {"envoys": 10_000, "checkins_per_s": 3000.0, "p99_ms": 250.0, "idle_kb_per_envoy": 50.0}
HOST = "127.0.0.1"  # all traffic stays on loopback
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
HELPER_MARK = "@@vigo-bench "
RESOURCES_PER_REPORT = 20
#: Most joins one token allows (the server refuses more).
MAX_TOKEN_USES = 10_000


def log(message: str) -> None:
    print(f"[checkin_load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchmarkError(Exception):
    """The benchmark cannot go on (server did not start, joins failed...)."""


# --------------------------------------------------------------------------------------------
# Processes: RSS and CPU from /proc


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """utime + stime of a process, seconds."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def machine_cpu_s() -> tuple[float, float, float]:
    """(busy, total, irq) CPU seconds of the whole machine, all cores, from /proc/stat; irq is
    interrupt and softirq time (loopback TCP is processed there), charged to no process."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return (total - values[3] - values[4]) / CLK_TCK, total / CLK_TCK, (values[5] + values[6]) / CLK_TCK


def kernel_thread_pids() -> list[int]:
    """Kernel threads (children of kthreadd): ksoftirqd and friends carry network work too."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == 2:
                    found.append(int(proc.name))
    return found


def head_pids(temp_dir: str | None, exclude: set[int]) -> list[int]:
    """PIDs of our dev head's processes (their command line names its private Ray temp dir):
    GCS, raylet, dashboard and its agents, idle workers. ``exclude``: the actors measured apart."""
    if not temp_dir:
        return []
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in exclude:
            continue
        with contextlib.suppress(OSError):
            if temp_dir.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


@dataclass
class CpuWindow:
    """CPU use of named processes (or groups of them) between ``start()`` and ``stop()``, in
    percent of one core; ``machine`` is the whole machine and ``other`` what none of the named
    processes used (other engineers' work, the kernel, py-spy...)."""

    pids: dict[str, int]
    groups: dict[str, list[int]] = field(default_factory=dict)
    t0: float = 0.0
    before: dict[str, float | None] = field(default_factory=dict)
    machine_before: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def _sample(self) -> dict[str, float | None]:
        out = {name: cpu_s(pid) for name, pid in self.pids.items()}
        for name, members in self.groups.items():
            # A member that exited counts 0 from then on (good enough for idle Ray workers).
            out[name] = sum(cpu_s(pid) or 0.0 for pid in members)
        return out

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.before = self._sample()
        self.machine_before = machine_cpu_s()

    def stop(self) -> dict[str, float | None]:
        wall = max(time.monotonic() - self.t0, 1e-6)
        now = self._sample()
        out: dict[str, float | None] = {}
        for name, value in now.items():
            then = self.before.get(name)
            out[name] = None if value is None or then is None else round(100 * (value - then) / wall, 1)
        busy, total, irq = machine_cpu_s()
        cores = os.cpu_count() or 1
        span = max(total - self.machine_before[1], 1e-6)
        # Busy share of all cores, scaled to "percent of one core" like the per-process figures.
        out["irq"] = round(100 * cores * (irq - self.machine_before[2]) / span, 1)
        out["machine"] = round(100 * cores * (busy - self.machine_before[0]) / span, 1)
        out["other"] = round(out["machine"] - sum(v or 0 for k, v in out.items() if k != "machine"), 1)
        return out


# --------------------------------------------------------------------------------------------
# The dev server and the Ray helper


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def vigocli(args: list[str], *, timeout_s: float, extra_env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token", **(extra_env or {})}
    return subprocess.run([str(BIN / "vigocli"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@dataclass
class DevServer:
    data_dir: Path
    port: int
    dashboard_port: int
    ray_port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    ray_temp_dir: str | None = None

    @property
    def address(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    def start(self) -> dict[str, Any]:
        busy = [p for p in (self.port, self.dashboard_port, self.ray_port) if not port_free(p)]
        if busy:
            raise BenchmarkError(f"port(s) {busy} already in use on {HOST}; pick others (--port/--dashboard-port/--ray-port)")
        log(f"starting a dev server: data dir {self.data_dir}, gateway :{self.port}, "
            f"dashboard :{self.dashboard_port}, Ray GCS :{self.ray_port}")
        proc = vigocli(["server", "start", "--dev", "--data-dir", str(self.data_dir), "--port", str(self.port),
                        "--dashboard-port", str(self.dashboard_port), "--ray-port", str(self.ray_port), "--json"],
                       timeout_s=300, extra_env=self.extra_env)
        with contextlib.suppress(OSError, ValueError):
            self.ray_temp_dir = json.loads((self.data_dir / "dev-head.json").read_text())["temp_dir"]
        if proc.returncode != 0:
            raise BenchmarkError(f"`vigocli server start --dev` failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
        self.info = json.loads(proc.stdout)
        return self.info

    def create_tokens(self, uses: int) -> list[str]:
        """Join tokens for ``uses`` joins: one per MAX_TOKEN_USES (the server's cap per token)."""
        return [self.create_token(min(MAX_TOKEN_USES, uses - done)) for done in range(0, uses, MAX_TOKEN_USES)]

    def create_token(self, uses: int) -> str:
        proc = vigocli(["token", "create", "--uses", str(uses), "--ttl", "3600", "--note", "checkin_load benchmark",
                        "--json", "--address", self.address], timeout_s=60)
        if proc.returncode != 0:
            raise BenchmarkError(f"`vigocli token create` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        return json.loads(proc.stdout)["token"]

    def stop(self) -> None:
        if not (self.data_dir / "dev-head.json").exists():
            # No head of ours: `server stop` without its marker would fall back to
            # ray.init("auto") and could reach another engineer's cluster. Nothing to stop.
            log("no dev head was started: nothing to stop")
            return
        log(f"stopping the dev server (vigocli server stop --data-dir {self.data_dir})")
        try:
            proc = vigocli(["server", "stop", "--data-dir", str(self.data_dir)], timeout_s=120)
            if proc.returncode != 0:
                log(f"WARNING: `vigocli server stop` exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
        except subprocess.TimeoutExpired:
            log("WARNING: `vigocli server stop` timed out")


def actor_pids(address: str) -> dict[str, int]:
    """Alive actors by name -> worker PID, from the dashboard's State API (as vigocli asks it)."""
    import urllib.parse
    import urllib.request

    from vigo.cli.client import cluster_token

    query = urllib.parse.urlencode({"filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE",
                                    "detail": "true", "limit": "1000"})
    request = urllib.request.Request(f"{address}/api/v0/actors?{query}",
                                     headers={"Authorization": f"Bearer {cluster_token()}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        actors = json.load(response)["data"]["result"]["result"]
    return {a["name"]: int(a["pid"]) for a in actors if a.get("name") and a.get("pid")}


class RayHelper:
    """A child process (this script, ``--ray-helper``) attached to the dev head as a Ray driver:
    actor PIDs and ``Gateway.status()`` on request. Ray stays out of the load generator's process
    and event loop."""

    def __init__(self, ray_port: int, log_path: Path) -> None:
        self.ray_port = ray_port
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        with self.log_path.open("ab") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--ray-helper", "--ray-port", str(self.ray_port),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env)
        await self._answer("start", 120)  # the helper says "ready" once attached to the cluster

    async def call(self, command: str, timeout_s: float = 60.0) -> Any:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._answer(command, timeout_s)

    async def _answer(self, command: str, timeout_s: float) -> Any:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise BenchmarkError(f"the Ray helper process ended (its stderr: {self.log_path})")
                if line.startswith(HELPER_MARK):
                    reply = json.loads(line[len(HELPER_MARK):])
                    if "error" in reply:
                        raise BenchmarkError(f"Ray helper: {command}: {reply['error']}")
                    return reply["ok"]

    async def status(self) -> dict[str, Any] | None:
        try:
            return await self.call("status", 30)
        except (BenchmarkError, TimeoutError) as exc:
            log(f"WARNING: gateway status unavailable: {exc}")
            return None

    async def close(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def ray_helper_main(ray_port: int) -> int:
    """The helper's side: one JSON answer line per command line on stdin."""
    from vigo.actors.runtime import RAY

    # The dev head listens on loopback only: RAY.connect keeps this driver there too.
    RAY.connect(f"{HOST}:{ray_port}")
    import ray

    gateway = ray.get_actor(f"gateway-{socket.gethostname()}", namespace="vigo")

    def answer(payload: dict[str, Any]) -> None:
        print(HELPER_MARK + json.dumps(payload), flush=True)

    answer({"ok": "ready"})
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        try:
            if command == "status":
                answer({"ok": ray.get(gateway.status.remote(), timeout=30)})
            else:
                answer({"error": f"unknown command {command!r}"})
        except Exception as exc:  # reported to the parent, which decides
            answer({"error": f"{type(exc).__name__}: {exc}"})
    ray.shutdown()
    return 0


# --------------------------------------------------------------------------------------------
# Messages


_HEADER = struct.Struct(">I")


def frame_bytes(type_: str, id_: int, body: dict[str, Any]) -> bytes:
    """The same bytes as ``protocol.encode`` (checked in ``check_encoder``) without its
    validation round trip: the load generator's CPU belongs to the sockets."""
    payload = msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": type_, "id": id_, "b": body}, use_bin_type=True)
    return _HEADER.pack(len(payload)) + payload


def base_traits() -> dict[str, Any]:
    from vigo.agent.traits import collect

    return collect(None)


def make_resources() -> list[dict[str, Any]]:
    """20 entries shaped like vigo.agent.engine's report entries: 17 ok, 2 changed, 1 skipped."""
    out = []
    for i in range(RESOURCES_PER_REPORT):
        kind = ("file", "directory", "package", "service")[i % 4]
        name = f"/etc/app/conf.d/{i:02d}-app.conf" if kind == "file" else f"{kind}-{i:02d}"
        entry: dict[str, Any] = {"id": f"{kind}:{name}", "type": kind, "policy": f"policy-{i // 5}",
                                 "status": "ok", "message": "in desired state", "duration_s": 0.000412 + i * 1e-5}
        if i in (3, 11):
            entry.update(status="changed", message="content updated (412 bytes)", changes=["content", "mode 0644"])
        elif i == 19:
            entry.update(status="skipped", message="when is false: os.family == \"redhat\"")
        out.append(entry)
    return out


@dataclass
class FleetFacts:
    gateway: str
    bundle_version: str | None
    serial: int
    traits: dict[str, Any]
    resources: list[dict[str, Any]]


def report_body(envoy: SimEnvoy, facts: FleetFacts, now: float) -> dict[str, Any]:
    counts = {"ok": 17, "changed": 2, "failed": 0, "skipped": 1}
    return {
        "kind": "run", "run_id": uuid.uuid4().hex, "envoy_id": envoy.envoy_id, "started_at": now - 0.42,
        "finished_at": now, "duration_s": 0.42, "bundle_version": facts.bundle_version, "serial": facts.serial,
        "term": envoy.term, "noop": False, "offline": False, "traits_digest": envoy.traits_digest,
        "vigo_version": vigo.__version__, "counts": counts, "policy_errors": 0,
        "policies": [{"name": f"policy-{i}", "active": True} for i in range(4)],
        "resources": facts.resources,
    }


def checkin_body(envoy: SimEnvoy, facts: FleetFacts, now: float) -> dict[str, Any]:
    return {
        "envoy_id": envoy.envoy_id, "traits": {**facts.traits, "hostname": envoy.hostname, "fqdn": envoy.hostname,
                                              "collected_at": now},
        "bundle_version": facts.bundle_version, "serial": facts.serial, "term": envoy.term,
        "queue_depth": 0, "oldest_queued_at": None, "last_run": envoy.last_run, "offline_runs": 0,
    }


def check_encoder(facts: FleetFacts) -> None:
    """The lean frames must be exactly what the real encoder sends (and pass its schemas)."""
    probe = SimEnvoy(0, "probe", uuid.uuid4().hex, 1, b"", b"")
    now = time.time()
    for type_, body in (("checkin", checkin_body(probe, facts, now)),
                        ("results", {"envoy_id": probe.envoy_id, "reports": [report_body(probe, facts, now)]})):
        if frame_bytes(type_, 7, body) != protocol.encode(type_, 7, body):
            raise BenchmarkError(f"the lean {type_} frame differs from protocol.encode's")


# --------------------------------------------------------------------------------------------
# Simulated envoys


@dataclass(eq=False)
class SimEnvoy:
    index: int
    hostname: str
    envoy_id: str
    term: int
    cert_pem: bytes
    ca_pem: bytes
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    next_id: int = 0
    last_run: dict[str, Any] | None = None
    traits_digest: str = ""

    async def request(self, type_: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """One request on the persistent connection; (reply type, reply body). Unsolicited
        frames (notify) are skipped; a connection-level error (id 0) answers the request."""
        assert self.reader is not None and self.writer is not None
        self.next_id += 1
        id_ = self.next_id
        self.writer.write(frame_bytes(type_, id_, body))
        await self.writer.drain()
        while True:
            (size,) = _HEADER.unpack(await self.reader.readexactly(4))
            envelope = msgpack.unpackb(await self.reader.readexactly(size), raw=False)
            if envelope["id"] == id_ or (envelope["id"] == 0 and envelope["t"] == "error"):
                return envelope["t"], envelope["b"]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def join_all(n: int, facts: FleetFacts, tokens: list[str], csr_pem: bytes, concurrency: int,
                   timeout_s: float) -> tuple[list[SimEnvoy], dict[str, int], float]:
    """``n`` real joins through the envoy's client code, at most ``concurrency`` at once; join
    ``i`` spends ``tokens[i // MAX_TOKEN_USES]``."""
    from vigo.agent.transport import EnvoyClient, anonymous_context
    from vigo.errors import ServerError, TransportError

    ctx = anonymous_context()
    joined: list[SimEnvoy] = []
    errors: collections.Counter[str] = collections.Counter()
    next_index = iter(range(n))
    t0 = time.monotonic()

    async def worker() -> None:
        for index in next_index:
            hostname = f"bench-{index:05d}.example.net"
            for attempt in range(3):  # bounded retries for overloaded/unavailable
                try:
                    async with asyncio.timeout(timeout_s):
                        async with await EnvoyClient.open(facts.gateway, ctx) as client:
                            answer = await client.join(tokens[index // MAX_TOKEN_USES], csr_pem, hostname, {**facts.traits, "hostname": hostname})
                    joined.append(SimEnvoy(index, hostname, answer["envoy_id"], int(answer["term"]),
                                           bytes(answer["certificate_pem"]), bytes(answer["ca_pem"]),
                                           traits_digest=uuid.uuid4().hex * 2))
                    break
                except (ServerError, TransportError) as exc:
                    errors[exc.code] += 1
                    if exc.code not in ("overloaded", "unavailable"):
                        break
                except TimeoutError:
                    errors["timeout"] += 1
                await asyncio.sleep(0.5 * (attempt + 1))
            if len(joined) % 1000 == 0 and joined:
                log(f"  {len(joined)}/{n} joined ({len(joined) / (time.monotonic() - t0):.0f}/s)")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    joined.sort(key=lambda e: e.index)
    return joined, dict(errors), time.monotonic() - t0


async def connect_all(envoys: list[SimEnvoy], key_pem: bytes, gateway: str, concurrency: int,
                      timeout_s: float) -> tuple[dict[str, int], float]:
    """One mutual-TLS connection per envoy with its own certificate, kept open."""
    from vigo.agent.enrolment import tls_client_context

    host, port = gateway.rsplit(":", 1)
    errors: collections.Counter[str] = collections.Counter()
    pending = iter(envoys)
    t0 = time.monotonic()
    done = 0

    async def worker() -> None:
        nonlocal done
        for envoy in pending:
            ctx = tls_client_context(envoy.ca_pem, envoy.cert_pem, key_pem)
            try:
                async with asyncio.timeout(timeout_s):
                    envoy.reader, envoy.writer = await asyncio.open_connection(
                        host, int(port), ssl=ctx, server_hostname=host, ssl_handshake_timeout=timeout_s)
            except TimeoutError:
                errors["timeout"] += 1
            except (OSError, ssl.SSLError) as exc:
                errors[type(exc).__name__] += 1
            done += 1
            if done % 2000 == 0:
                log(f"  {done}/{len(envoys)} connected ({done / (time.monotonic() - t0):.0f}/s)")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return dict(errors), time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# Load steps


class PingProbe:
    """Gateway event-loop responsiveness: a ``ping`` every ``interval_s`` on one extra connection
    (answered by the gateway itself, no primary involved). Its round trips show stalls of the
    gateway's loop (long callbacks, garbage collection) apart from batching and the primary."""

    def __init__(self, gateway: str, interval_s: float = 0.02) -> None:
        self.gateway = gateway
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.errors = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: SimEnvoy | None = None

    async def start(self) -> None:
        from vigo.agent.transport import anonymous_context

        host, port = self.gateway.rsplit(":", 1)
        self._conn = SimEnvoy(-1, "ping-probe", "", 0, b"", b"")
        async with asyncio.timeout(30):
            self._conn.reader, self._conn.writer = await asyncio.open_connection(
                host, int(port), ssl=anonymous_context(), server_hostname=host)
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        assert self._conn is not None
        loop = asyncio.get_running_loop()
        while True:
            sent = loop.time()
            try:
                async with asyncio.timeout(30):
                    await self._conn.request("ping", {})
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                self.errors += 1
                return
            self.samples.append(loop.time() - sent)
            await asyncio.sleep(self.interval_s)

    def figures(self) -> dict[str, Any]:
        values = sorted(self.samples)
        self.samples = []

        def ms(v: float | None) -> float | None:
            return None if v is None else round(1000 * v, 1)

        return {"pings": len(values), "p50_ms": ms(percentile(values, 0.5)), "p99_ms": ms(percentile(values, 0.99)),
                "max_ms": ms(values[-1] if values else None), "errors": self.errors}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None:
            self._conn.close()


class GcMonitor:
    """Garbage-collection pauses of this process (``gc.callbacks``), per generation."""

    def __init__(self) -> None:
        self._started = 0.0
        self.reset()
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)

    def figures(self) -> dict[str, Any]:
        every = [p for pauses in self.pauses.values() for p in pauses]
        full = self.pauses[2]
        return {"collections": len(every), "total_ms": round(1000 * sum(every), 1),
                "full_collections": len(full), "full_max_ms": round(1000 * max(full), 1) if full else 0.0}


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


@dataclass
class StepStats:
    ok: int = 0
    latencies: list[float] = field(default_factory=list)  # schedule -> results_ok, seconds
    checkin_latencies: list[float] = field(default_factory=list)  # checkin sent -> checkin_ok
    lags: list[float] = field(default_factory=list)  # schedule -> checkin sent (client-side wait)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    bundles_sent: int = 0
    last_done: float = 0.0


class LoadRunner:
    """Open-loop check-ins over the envoys' persistent connections. An envoy does one check-in
    at a time; told ``overloaded``/``unavailable`` it rests ``retry_after_s`` (plus up to 50%
    jitter, as the envoy's back-off does) before taking work again. The refused check-in counts
    as an error and is not retried (open loop)."""

    def __init__(self, envoys: list[SimEnvoy], facts: FleetFacts, request_timeout_s: float, drain_s: float) -> None:
        self.facts = facts
        self.request_timeout_s = request_timeout_s
        self.drain_s = drain_s
        self.idle: collections.deque[SimEnvoy] = collections.deque(e for e in envoys if e.writer is not None)
        self.live = len(self.idle)
        self.resting = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.backlog: collections.deque[float] = collections.deque()  # scheduled times waiting for an envoy
        self.stats = StepStats()

    def _refused(self, stage: str, body: dict[str, Any]) -> float:
        """Count an error answer; the seconds the envoy rests before its next check-in."""
        code = body.get("code")
        self.stats.errors[f"{stage}:{code}"] += 1
        if code in ("overloaded", "unavailable"):
            return min(30.0, float(body.get("retry_after_s") or 1.0) * random.uniform(1.0, 1.5))
        return 0.0

    async def _checkin(self, envoy: SimEnvoy, scheduled: float) -> float | None:
        """One check-in with its results: seconds to rest after it (0: none), None if the
        envoy's connection is gone."""
        stats = self.stats
        loop = asyncio.get_running_loop()
        sent = loop.time()
        stats.lags.append(sent - scheduled)
        wall = time.time()
        try:
            async with asyncio.timeout(self.request_timeout_s):
                kind, body = await envoy.request("checkin", checkin_body(envoy, self.facts, wall))
                if kind == "error":
                    return self._refused("checkin", body)
                stats.checkin_latencies.append(loop.time() - sent)
                if body.get("bundle") is not None:
                    stats.bundles_sent += 1
                report = report_body(envoy, self.facts, wall)
                kind, body = await envoy.request("results", {"envoy_id": envoy.envoy_id, "reports": [report]})
                if kind == "error":
                    return self._refused("results", body)
                if report["run_id"] not in body.get("acked", ()):
                    stats.errors["results:not_acked"] += 1
                    return 0.0
        except TimeoutError:
            stats.errors["timeout"] += 1
            return None  # a reply may still arrive: the stream is no longer at a known frame
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError) as exc:
            stats.errors[f"connection:{type(exc).__name__}"] += 1
            return None
        done = loop.time()
        stats.ok += 1
        stats.latencies.append(done - scheduled)
        stats.last_done = done
        envoy.last_run = {"run_id": report["run_id"], "started_at": report["started_at"], "duration_s": 0.42,
                          "bundle_version": self.facts.bundle_version, "serial": self.facts.serial, "noop": False,
                          "offline": False, "counts": report["counts"]}
        return 0.0

    def _dispatch(self, envoy: SimEnvoy, scheduled: float) -> None:
        task = asyncio.create_task(self._envoy_loop(envoy, scheduled))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _wake(self, envoy: SimEnvoy) -> None:
        self.resting -= 1
        if self.backlog:
            self._dispatch(envoy, self.backlog.popleft())
        else:
            self.idle.append(envoy)

    async def _envoy_loop(self, envoy: SimEnvoy, scheduled: float) -> None:
        while True:
            rest = await self._checkin(envoy, scheduled)
            if rest is None:
                envoy.close()
                self.live -= 1
                return
            if rest > 0:
                self.resting += 1
                asyncio.get_running_loop().call_later(rest, self._wake, envoy)
                return
            if not self.backlog:
                self.idle.append(envoy)
                return
            scheduled = self.backlog.popleft()

    async def step(self, rate: float, seconds: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        stats = self.stats = StepStats()
        backlog = self.backlog
        backlog.clear()
        total = max(1, int(rate * seconds))
        start = loop.time()
        issued = 0
        while issued < total:
            due = min(total, int((loop.time() - start) * rate) + 1)
            while issued < due:
                scheduled = start + issued / rate
                issued += 1
                if self.idle:
                    self._dispatch(self.idle.popleft(), scheduled)
                else:
                    backlog.append(scheduled)
            await asyncio.sleep(max(0.0, start + issued / rate - loop.time()))
        window_end = loop.time()
        # Drain: what was scheduled in the window may finish late (that is the latency), but
        # only for so long; what never started by then counts as not_started.
        deadline = window_end + self.drain_s
        while (self.tasks or backlog) and loop.time() < deadline and self.live > 0:
            await asyncio.sleep(0.05)
        if backlog:
            stats.errors["not_started"] += len(backlog)
            backlog.clear()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=self.request_timeout_s + 5)
        end = loop.time()
        lat = sorted(stats.latencies)
        chk = sorted(stats.checkin_latencies)
        lags = sorted(stats.lags)

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 1)

        span = max((stats.last_done or end) - start, 1e-6)
        return {
            "target_per_s": rate,
            "scheduled": total,
            "ok": stats.ok,
            "achieved_per_s": round(stats.ok / max(span, seconds), 1),
            "seconds_until_drained": round(end - start, 2),
            "latency_ms": {"p50": ms(percentile(lat, 0.5)), "p90": ms(percentile(lat, 0.9)),
                           "p99": ms(percentile(lat, 0.99)), "max": ms(lat[-1] if lat else None)},
            "checkin_only_ms": {"p50": ms(percentile(chk, 0.5)), "p99": ms(percentile(chk, 0.99))},
            "client_wait_ms": {"p50": ms(percentile(lags, 0.5)), "p99": ms(percentile(lags, 0.99))},
            "errors": dict(stats.errors),
            "bundles_sent": stats.bundles_sent,
            "live_connections": self.live,
            "envoys_resting_at_end": self.resting,
        }


# --------------------------------------------------------------------------------------------
# Profiles


#: Leaf frames where a thread waits rather than works (py-spy still samples some of them):
#: the event loop's epoll, and the Ray worker's main loop (its C++ core worker, mostly waiting).
IDLE_LEAVES = ("EpollSelector.select (", "Worker.main_loop (", "Condition.wait (", "Event.wait (")


def summarise_raw_profile(path: Path, top: int) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks as top functions: self (leaf) and inclusive, as shares
    of the busy samples (idle leaves, see IDLE_LEAVES, are counted apart)."""
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {"samples": 0, "error": f"no profile written to {path}"}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(f) for f in stack.split(";") if f]
        if frames and frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        if frames:
            leaf[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count

    busy = max(total - idle, 1)

    def rows(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": name, "samples": n, "pct": round(100 * n / busy, 1)} for name, n in counter.most_common(top)]

    return {"samples": total, "idle_samples": idle, "busy_samples": total - idle,
            "top_self": rows(leaf), "top_inclusive": rows(inclusive)}


def _short_frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (to/file.py)``: lines merged, paths shortened."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


async def profile_processes(pids: dict[str, int], seconds: int, out_dir: Path) -> dict[str, Path]:
    """Start ``py-spy record`` on each process; returns when they have all finished."""
    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if py_spy is None:
        log("py-spy not found: no profile")
        return {}
    procs = {}
    for name, pid in pids.items():
        out = out_dir / f"{name}.raw.txt"
        procs[name] = (out, await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100", "--format", "raw",
            "--nonblocking", "--output", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE))
    written = {}
    for name, (out, proc) in procs.items():
        try:
            _, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            err = b"timed out"
        if proc.returncode != 0:
            log(f"WARNING: py-spy on {name} exited {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}")
        written[name] = out
    return written


# --------------------------------------------------------------------------------------------
# The run


async def measure_step(runner: LoadRunner, helper: RayHelper, pids: dict[str, int], ray_head: list[int],
                       kernel_threads: list[int], rate: float, seconds: float, gc_monitor: GcMonitor, probe: PingProbe) -> dict[str, Any]:
    before = await helper.status()
    window = CpuWindow(pids, {"ray_head": ray_head, "kernel": kernel_threads})
    window.start()
    gc_monitor.reset()
    probe.figures()  # drop what came before the step
    result = await runner.step(rate, seconds)
    result["cpu_pct"] = window.stop()
    result["loadgen_gc"] = gc_monitor.figures()
    result["gateway_ping"] = probe.figures()
    after = await helper.status()
    result["rss_mb"] = {name: round((rss_kb(pid) or 0) / 1024, 1) for name, pid in pids.items()}
    if before and after:
        batches = after["batches"] - before["batches"]
        # status() gives the running mean; items batched in this step follow from it (to ~0.01).
        items = after["mean_batch"] * after["batches"] - before["mean_batch"] * before["batches"]
        result["gateway"] = {
            "batches": batches,
            "requests": after["requests"] - before["requests"],
            "mean_batch": round(items / batches, 1) if batches else None,
            "overloaded": after["overloaded"] - before["overloaded"],
            "queue_at_end": after["queue"],
            "connections": after["connections"],
        }
    return result


async def settle_rss(pid: int, seconds: float) -> int:
    """RSS after ``seconds`` of quiet (sampled; the last value)."""
    value = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = rss_kb(pid) or 0
        await asyncio.sleep(0.5)
    return rss_kb(pid) or value


async def run(args: argparse.Namespace, server: DevServer, work: Path) -> dict[str, Any]:
    info = server.start()
    log(f"dev server up in {info['seconds']} s: gateway {info['gateway']}, bundle serial {info['bundle']['serial']}")
    tokens = server.create_tokens(args.envoys)
    helper = RayHelper(args.ray_port, work / "ray-helper.log")
    await helper.start()
    try:
        names = actor_pids(server.address)
        host = socket.gethostname()
        gw_name, primary_name = f"gateway-{host}", "primary-p0"
        if gw_name not in names or primary_name not in names:
            raise BenchmarkError(f"actors not found: {sorted(names)}")
        pids = {"gateway": int(names[gw_name]), "primary": int(names[primary_name]), "loadgen": os.getpid()}
        log(f"pids: gateway {pids['gateway']}, primary {pids['primary']}, load generator {pids['loadgen']}")
        return await run_with_server(args, server, helper, pids, tokens, work)
    finally:
        await helper.close()


async def run_with_server(args: argparse.Namespace, server: DevServer, helper: RayHelper, pids: dict[str, int],
                          tokens: list[str], work: Path) -> dict[str, Any]:
    from vigo.agent.enrolment import make_envoy_key_and_csr

    facts = FleetFacts(server.info["gateway"], server.info["bundle"]["version"], int(server.info["bundle"]["serial"]),
                       base_traits(), make_resources())
    check_encoder(facts)
    key_pem, csr_pem = make_envoy_key_and_csr("bench-envoy")  # ONE key for every CSR (see module doc)
    memory: dict[str, Any] = {"rss_kb_at_start": {n: rss_kb(p) for n, p in pids.items()}}
    ray_head = head_pids(server.ray_temp_dir, set(pids.values()))
    kernel_threads = kernel_thread_pids()

    log(f"joining {args.envoys} envoys ({args.join_concurrency} at a time) ...")
    window = CpuWindow(pids, {"ray_head": ray_head, "kernel": kernel_threads})
    window.start()
    envoys, join_errors, join_s = await join_all(args.envoys, facts, tokens, csr_pem, args.join_concurrency,
                                                 args.request_timeout)
    join = {"joined": len(envoys), "seconds": round(join_s, 1), "per_s": round(len(envoys) / join_s, 1),
            "errors": join_errors, "cpu_pct": window.stop()}
    log(f"joined {len(envoys)} in {join_s:.1f} s ({join['per_s']}/s), errors {join_errors or 'none'}")
    if not envoys:
        raise BenchmarkError("no envoy could join")

    gw_before = await settle_rss(pids["gateway"], 3)
    gen_before = rss_kb(pids["loadgen"]) or 0
    memory["rss_kb_after_joins"] = {"gateway": gw_before, "primary": rss_kb(pids["primary"]), "loadgen": gen_before}
    status = await helper.status()
    conns_before = status["connections"] if status else 0

    log(f"opening {len(envoys)} persistent mutual-TLS connections ({args.connect_concurrency} at a time) ...")
    window.start()
    connect_errors, connect_s = await connect_all(envoys, key_pem, facts.gateway, args.connect_concurrency,
                                                  args.request_timeout)
    connected = sum(1 for e in envoys if e.writer is not None)
    connect = {"connected": connected, "seconds": round(connect_s, 1), "per_s": round(connected / connect_s, 1),
               "errors": connect_errors, "cpu_pct": window.stop()}
    log(f"{connected} connected in {connect_s:.1f} s, errors {connect_errors or 'none'}")
    gw_after = await settle_rss(pids["gateway"], args.settle_seconds)
    gen_after = rss_kb(pids["loadgen"]) or 0
    status = await helper.status()
    gw_conns = (status["connections"] if status else 0) - conns_before
    per_conn = (gw_after - gw_before) / max(gw_conns or connected, 1)
    memory.update({
        "gateway_connections": gw_conns,
        "rss_kb_after_connect": {"gateway": gw_after, "primary": rss_kb(pids["primary"]), "loadgen": gen_after},
        "gateway_kb_per_idle_envoy": round(per_conn, 1),
        "loadgen_kb_per_connection": round((gen_after - gen_before) / max(connected, 1), 1),
    })
    log(f"gateway RSS {gw_before / 1024:.0f} -> {gw_after / 1024:.0f} MB for {gw_conns} connections: "
        f"{per_conn:.1f} KB per idle envoy (target <= {TARGETS['idle_kb_per_envoy']:.0f})")

    # The load generator holds every client connection: a full collection over them takes
    # hundreds of milliseconds at 10,000 and would read as server latency. Its long-lived objects
    # are frozen out of the collector (what each check-in allocates is still collected).
    gc_monitor = GcMonitor()
    gc.collect()
    t0 = time.perf_counter()
    gc.collect()
    memory["loadgen_full_gc_ms_before_freeze"] = round(1000 * (time.perf_counter() - t0), 1)
    memory["loadgen_gc_tracked_objects"] = len(gc.get_objects())
    if not args.no_gc_freeze:
        gc.freeze()
    runner = LoadRunner(envoys, facts, args.request_timeout, args.drain_seconds)
    probe = PingProbe(facts.gateway)
    await probe.start()
    await asyncio.sleep(3)
    memory["gateway_ping_idle"] = probe.figures()
    steps = []
    for rate in args.rates:
        log(f"step: {rate:g} check-ins/s for {args.step_seconds:g} s on {runner.live} connections ...")
        result = await measure_step(runner, helper, pids, ray_head, kernel_threads, rate, args.step_seconds, gc_monitor, probe)
        steps.append(result)
        log(f"  achieved {result['achieved_per_s']}/s, p50 {result['latency_ms']['p50']} ms, "
            f"p99 {result['latency_ms']['p99']} ms, errors {result['errors'] or 'none'}, "
            f"cpu {result['cpu_pct']}, mean batch {result.get('gateway', {}).get('mean_batch')}")
        await asyncio.sleep(args.pause_seconds)
        if not args.keep_going and result["achieved_per_s"] < 0.7 * rate:
            log("  saturated (achieved < 70% of target): higher steps would measure the same ceiling; stopping the ramp")
            break
        if runner.live == 0:
            break

    gw_idle_after = await settle_rss(pids["gateway"], args.settle_seconds)
    memory["rss_kb_after_load_idle"] = {"gateway": gw_idle_after, "primary": rss_kb(pids["primary"]),
                                        "loadgen": rss_kb(pids["loadgen"])}
    memory["gateway_kb_per_envoy_after_load"] = round((gw_idle_after - gw_before) / max(gw_conns or connected, 1), 1)

    profile: dict[str, Any] = {}
    if args.profile_seconds > 0 and runner.live:
        rate = args.profile_rate or max(s["target_per_s"] for s in steps)
        log(f"profiling step: {rate:g} check-ins/s, py-spy {args.profile_seconds} s on gateway, primary, load generator ...")
        out_dir = work / "profiles"
        out_dir.mkdir(exist_ok=True)
        spy = asyncio.create_task(profile_processes(pids, args.profile_seconds, out_dir))
        result = await measure_step(runner, helper, pids, ray_head, kernel_threads, rate, args.profile_seconds + 1, gc_monitor,
                                    probe)
        files = await spy
        profile = {"step": result, "py_spy_rate_hz": 100, "seconds": args.profile_seconds,
                   "note": "py-spy --nonblocking, all threads, Python frames only (time in C extensions, "
                           "OpenSSL, SQLite, fsync and the kernel is charged to the Python frame that called "
                           "them); percentages are of busy samples (idle leaves: " + ", ".join(IDLE_LEAVES) + ")",
                   "processes": {name: summarise_raw_profile(path, args.profile_top) for name, path in files.items()}}

    await probe.close()
    for envoy in envoys:
        envoy.close()
    await asyncio.sleep(0.5)
    return {"join": join, "connect": connect, "memory": memory, "steps": steps, "profile": profile}


# --------------------------------------------------------------------------------------------
# Output


def verdicts(res: dict[str, Any]) -> dict[str, Any]:
    good = [s for s in res["steps"] if s["latency_ms"]["p99"] is not None and s["latency_ms"]["p99"] <= TARGETS["p99_ms"]
            and not s["errors"] and s["achieved_per_s"] >= 0.95 * s["target_per_s"]]
    best = max(good, key=lambda s: s["achieved_per_s"], default=None)
    connected = res["connect"]["connected"]
    per_conn = res["memory"]["gateway_kb_per_idle_envoy"]
    sustained = best["achieved_per_s"] if best else 0.0
    return {
        "connected_envoys": {"measured": connected, "target": TARGETS["envoys"], "met": connected >= TARGETS["envoys"]},
        "sustained_checkins_per_s_at_p99_target": {
            "measured": sustained, "target": TARGETS["checkins_per_s"],
            "met": sustained >= TARGETS["checkins_per_s"] and connected >= TARGETS["envoys"],
            "definition": "highest step with achieved >= 95% of target, no errors and p99 <= 250 ms"},
        "gateway_kb_per_idle_envoy": {"measured": per_conn, "target": TARGETS["idle_kb_per_envoy"],
                                      "met": per_conn <= TARGETS["idle_kb_per_envoy"]},
    }


def print_report(res: dict[str, Any]) -> None:
    m, j, c, mem = res["machine"], res["join"], res["connect"], res["memory"]
    print(f"\ncheck-in load: {c['connected']} envoys on one gateway; server and load generator on the same "
          f"{m['cpus']}-cpu machine ({m['memory_gb']} GiB)")
    print(f"joins: {j['joined']} in {j['seconds']} s ({j['per_s']}/s), errors {j['errors'] or 'none'}; "
          f"mTLS connects: {c['connected']} in {c['seconds']} s ({c['per_s']}/s), errors {c['errors'] or 'none'}")
    gw = mem["rss_kb_after_joins"]["gateway"], mem["rss_kb_after_connect"]["gateway"]
    print(f"gateway RSS {gw[0] / 1024:.0f} MB -> {gw[1] / 1024:.0f} MB with {mem['gateway_connections']} idle "
          f"connections: {mem['gateway_kb_per_idle_envoy']} KB per idle envoy "
          f"({mem['gateway_kb_per_envoy_after_load']} KB after the load, connections idle again); "
          f"load generator {mem['loadgen_kb_per_connection']} KB per connection; a full GC in the load generator "
          f"took {mem['loadgen_full_gc_ms_before_freeze']} ms over {mem['loadgen_gc_tracked_objects']} objects; "
          f"gateway ping with all connections idle: p50 {mem['gateway_ping_idle']['p50_ms']} ms, "
          f"max {mem['gateway_ping_idle']['max_ms']} ms")
    header = (f"{'target/s':>8} {'achieved/s':>10} {'ok':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
              f"{'wait p99':>8} {'ping p99/max':>13} {'errors':>7} {'batch':>6} {'gw MB':>6} {'gw CPU%':>7} {'pri MB':>6} "
              f"{'pri CPU%':>8} {'gen CPU%':>8} {'ray CPU%':>8} {'krn CPU%':>8} {'oth CPU%':>8} {'all CPU%':>8}")
    print("\n" + header)
    print("-" * len(header))
    rows = list(res["steps"])
    if res["profile"]:
        rows.append({**res["profile"]["step"], "label": " (profiled)"})
    for s in rows:
        cpu, rss, lat = s["cpu_pct"], s["rss_mb"], s["latency_ms"]
        errors = sum(s["errors"].values())

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

        print(f"{s['target_per_s']:>8g} {s['achieved_per_s']:>10g} {s['ok']:>7} {f(lat['p50']):>8} "
              f"{f(lat['p99']):>8} {f(lat['max']):>8} {f(s['client_wait_ms']['p99']):>8} "
              f"{f(s['gateway_ping']['p99_ms']) + '/' + f(s['gateway_ping']['max_ms']):>13} {errors:>7} "
              f"{f(s.get('gateway', {}).get('mean_batch')):>6} {rss['gateway']:>6g} {f(cpu['gateway']):>7} "
              f"{rss['primary']:>6g} {f(cpu['primary']):>8} {f(cpu['loadgen']):>8} {f(cpu['ray_head']):>8} "
              f"{f((cpu.get('kernel') or 0) + (cpu.get('irq') or 0)):>8} {f(cpu['other']):>8} "
              f"{f(cpu['machine']):>8}"
              f"{s.get('label', '')}")
    print("(latency: scheduled time -> results_ok, checkin + results; 'wait p99': time a check-in waited in the load "
          "generator for a free envoy or the event loop; 'ping': round trip of a ping every 20 ms on an extra "
          "connection, answered by the gateway alone (its event-loop stalls); CPU% of one core (machine max 200%): 'ray' = the rest of "
          "this dev head (GCS, raylet, dashboard, idle workers), 'krn' = kernel threads and irq/softirq time "
          "(loopback TCP), 'oth' = everything else on the machine (other engineers' work, the Ray helper, py-spy), "
          "'all' = whole machine)")
    print("load generator GC per step (collections / total ms / full collections, longest ms): "
          + "; ".join(f"{s['target_per_s']:g}/s {g['collections']}/{g['total_ms']:g}/{g['full_collections']},"
                      f"{g['full_max_ms']:g}" for s in rows if (g := s.get("loadgen_gc"))))
    for s in rows:
        if s["errors"]:
            print(f"errors at {s['target_per_s']:g}/s{s.get('label', '')}: {s['errors']}")
    if res["profile"]:
        for name, prof in res["profile"]["processes"].items():
            if not prof.get("samples"):
                print(f"\nprofile {name}: {prof.get('error', 'no samples')}")
                continue
            busy = prof["busy_samples"] / (res["profile"]["py_spy_rate_hz"] * res["profile"]["seconds"])
            print(f"\nprofile {name}: {prof['busy_samples']} busy samples of {prof['samples']} "
                  f"(~{100 * busy:.0f}% of one thread's time); % of busy samples, top self frames:")
            for row in prof["top_self"][:12]:
                print(f"  {row['pct']:5.1f}%  {row['frame']}")
            print("  top inclusive:")
            for row in prof["top_inclusive"][:12]:
                print(f"  {row['pct']:5.1f}%  {row['frame']}")
    print("\ntargets (informative; the exit code does not depend on them):")
    for name, v in res["verdicts"].items():
        print(f"  {name:40} measured {v['measured']:<10g} target {v['target']:<8g} {'met' if v['met'] else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Check-in load on one vigo gateway: N simulated envoys on persistent mutual-TLS connections, "
                    "stepped check-in rates, memory per idle connection, py-spy profile. Starts and stops its own "
                    "dev server on non-default ports; all traffic stays on 127.0.0.1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--envoys", type=int, default=2000, help="simulated envoys (the issue's target is 10000)")
    parser.add_argument("--rates", default="250,500,1000,1500,2000,3000,4000",
                        help="check-in rates per second, comma-separated, one step each")
    parser.add_argument("--step-seconds", type=float, default=10.0, help="length of each rate step")
    parser.add_argument("--keep-going", action="store_true",
                        help="run every step even after one achieved < 70%% of its target")
    parser.add_argument("--pause-seconds", type=float, default=2.0, help="quiet time between steps")
    parser.add_argument("--drain-seconds", type=float, default=30.0,
                        help="after a step's window, how long its backlog may still be served before the rest "
                             "counts as not_started")
    parser.add_argument("--request-timeout", type=float, default=30.0,
                        help="seconds for one check-in (checkin + results), one join or one connect")
    parser.add_argument("--join-concurrency", type=int, default=32, help="joins in flight at once")
    parser.add_argument("--connect-concurrency", type=int, default=64, help="TLS handshakes in flight at once")
    parser.add_argument("--settle-seconds", type=float, default=5.0, help="quiet time before an RSS reading")
    parser.add_argument("--profile-seconds", type=int, default=10,
                        help="py-spy duration of the extra profiling step (0: no profiling step)")
    parser.add_argument("--profile-rate", type=float, default=None,
                        help="rate of the profiling step (default: the highest step run)")
    parser.add_argument("--profile-top", type=int, default=25, help="frames kept per profile summary")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="do not gc.freeze() the load generator's connections (its own full collections "
                             "then add to the measured latency)")
    parser.add_argument("--port", type=int, default=7711, help="gateway port of the private dev server")
    parser.add_argument("--dashboard-port", type=int, default=8291, help="Ray dashboard port of the private dev server")
    parser.add_argument("--ray-port", type=int, default=6411, help="Ray GCS port of the private dev server")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data dir of the private dev server (default: a fresh /tmp/vigo-checkin-load-*)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the dev server (Ray head and actors inherit it), e.g. "
                             "PYTHONPATH=DIR to try a package without installing it; repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and the raw profiles, print where")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="where the JSON results go")
    parser.add_argument("--ray-helper", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_helper:
        return ray_helper_main(args.ray_port)
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates must be numbers separated by commas, got {args.rates!r}")
    if not args.rates or min(args.rates) <= 0 or args.envoys < 1 or args.step_seconds <= 0:
        parser.error("--rates, --envoys and --step-seconds must be positive")

    # One socket per envoy here (and one per envoy in the gateway, under its own limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.envoys + args.join_concurrency + 512
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        parser.error(f"{args.envoys} envoys need ~{need} file descriptors; the limit is {soft} (ulimit -n)")

    extra_env = {}
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--server-env wants NAME=VALUE, got {item!r}")
        extra_env[name] = value

    own_dir = args.data_dir is None
    work = Path(tempfile.mkdtemp(prefix="vigo-checkin-load-", dir="/tmp"))
    data_dir = (args.data_dir or work / "data").resolve()
    server = DevServer(data_dir, args.port, args.dashboard_port, args.ray_port, extra_env)
    started = time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    try:
        res = asyncio.run(run(args, server, work))
    except (BenchmarkError, subprocess.TimeoutExpired) as exc:
        print(f"checkin_load: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        if args.keep:
            log(f"kept {work} (data dir {data_dir}, profiles {work / 'profiles'})")
        else:
            if own_dir:
                shutil.rmtree(work, ignore_errors=True)
            if server.ray_temp_dir and Path(server.ray_temp_dir).name.startswith("vigo-ray-"):
                shutil.rmtree(server.ray_temp_dir, ignore_errors=True)  # this head's own Ray temp dir only

    res = {
        "benchmark": "checkin_load",
        "started_at": started,
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "python": platform.python_version(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "dev server (Ray head, gateway, primary) and load generator share these cores"},
        "vigo_version": vigo.__version__,
        "settings": {"envoys": args.envoys, "rates": args.rates, "step_seconds": args.step_seconds,
                     "resources_per_report": RESOURCES_PER_REPORT, "join_concurrency": args.join_concurrency,
                     "connect_concurrency": args.connect_concurrency, "request_timeout_s": args.request_timeout,
                     "server_env": extra_env, "loadgen_gc_freeze": not args.no_gc_freeze},
        "targets": TARGETS,
        **res,
    }
    res["verdicts"] = verdicts(res)
    print_report(res)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
