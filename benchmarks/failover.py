"""Failover: the primary's host dies under result traffic; a standby takes over.

What an operator needs to know before trusting replication: how long the partition is without
a primary when its host dies, how many acknowledged results that costs, what the standbys'
lag is under steady writes, and what synchronous replication costs in write throughput.

Cluster: ``tests.raycluster.SimCluster``, a simulated 4-node Ray cluster on this machine (head
labelled ``vigo-host=head`` with control and the gateway; the primary on host ``a``, standbys
on ``b`` and ``c``), health checks tuned as docs recommend for fast failover (1000 ms x 3, no
initial delay: Ray marks a SIGKILLed node dead ~3 s later). Every scenario gets a fresh
cluster and data dirs, and every cluster is shut down at the end, also on errors (never
``ray stop``: it would kill every Ray cluster on the machine).

Traffic: ``--envoys`` real joins through the envoy's client code and one mutual-TLS connection
per envoy to the real gateway (helpers from ``checkin_load.py``); every write is a ``results``
message carrying one run report (``--resources`` entries), acknowledged when ``results_ok``
lists its run id. An envoy has one request in flight; a refused or lost request is resent
(same run id: the server stores it once) after ``--retry-pause`` seconds, on a new connection
if the old one broke. Each acknowledged run id is kept with its acknowledgement time and the
term the server answered with, so "first acknowledged result on the new primary" is the first
ack carrying the new term.

Scenarios (``--scenarios``), each on its own cluster:

* ``sync``: ``replication.sync_standbys: 1``. Closed-loop write throughput (every envoy sends
  its next report as soon as the last one is acknowledged), then open-loop traffic at
  ``--failover-rate``; host ``a`` is killed (SIGKILL of the primary, raylet removed without a
  graceful shutdown); ``ray.nodes()`` is polled every 20 ms and ``promote()`` is called the
  moment Ray reports the node dead (the script an operator would run).
* ``async``: ``sync_standbys: 0``. The same closed-loop throughput phase (the sync/async ratio
  compares the two), then open-loop steps at ``--lag-rates`` writes/s (``--lag-seconds`` each)
  while the primary is sampled every ``--sample-ms`` for replication lag (``--profile-seconds``
  adds a py-spy profile of the highest step), then the same scripted failover.
* ``auto``: ``auto_failover: true`` with ``failover_after_s = --failover-after-s`` (default
  2.0 s, see below) in ``--auto-mode`` (default sync: auto failover is only safe from lost
  acknowledgements when writes wait for a standby); nobody calls promote: control's watchdog
  does.

Figures: detection (kill -> Ray reports the node dead), promotion (``promote()`` call ->
return, split into asking the members, fencing, the standby's promotion and the gateway
reroute: the benchmark times vigo's helpers around the call, changing nothing), promotion ->
serving (``promote()`` call -> first acknowledged result at the new term; also from the
standby being told to promote), RTO (kill -> first acknowledged result at the new term), RPO
(acknowledged run ids missing from the new primary's database, read read-only from
``ROOT/<host>/state.db`` after the traffic stopped; retention is raised so no run is deleted
meanwhile), replication lag p50/p99 (async), throughput ratio sync/async, and CPU per process
(primary, standbys, gateway, load generator, this cluster's Ray processes, everything else on
the machine: other users of a shared machine show up there). In auto mode the watchdog's own
``promote()`` figures are read from control's log.

Replication lag is measured per commit, not only read from vigo's gauge. Every sample is one
``__ray_call__`` into the primary (no vigo code added) returning what ``ping()`` and
``replication_status()`` answer, both lock-free there, so the writes are not held up: the
newest commit (position, commit time) and each standby's acknowledged position with the time
the primary received that acknowledgement. For a commit C seen as the newest in a sample, its
lag to a standby is the time from C's commit until the primary learned the standby holds it:
the upper bound is ``acked_at`` of the first sample whose standby position covers C, the lower
bound the sending time of the last sample that did not (they differ by at most one sampling
period). The verdict uses the upper bound of the worse standby; vigo's own ``lag_s`` (age of
the oldest commit a standby lacks, sampled) is shown beside it.

Why ``failover_after_s = 2.0`` by default: the watchdog pings the primary every 0.5 s with a
timeout of ``min(1.5, failover_after_s / 2)`` and promotes once the primary has answered no
ping for ``failover_after_s``. At 1.0 s a ping may take only 0.5 s, which a loaded 2-core
machine (or a long GC pause in the primary) can exceed with nothing dead; at 2.0 s each ping
may take 1 s and at least two in a row must fail, which leaves ~2 s of the 5 s RTO budget for
the promotion and the first write.

Targets from the issue (informative, the exit code only says whether the benchmark ran):
promotion -> serving <= 1 s; RTO with auto failover <= 5 s; RPO 0 in synchronous mode;
asynchronous lag p99 <= 100 ms at 1,000 result writes/s. Writes
``benchmarks/results/failover.json``. About 5 minutes with the defaults; ``--quick`` ~2.

    .venv/bin/python benchmarks/failover.py [--quick] [--scenarios sync,async,auto] [--envoys 50]
        [--lag-rates 500,1000 --lag-seconds 15] [--throughput-seconds 10] [--failover-after-s 2.0]
        [--profile-seconds 10]
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import bisect
import collections
import contextlib
import itertools
import json
import os
import platform
import random
import re
import shutil
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout: the repo (vigo, tests.raycluster) and this folder
# (checkin_load's client helpers, importable without side effects).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import apsw
import ray
from checkin_load import (
    CpuWindow,
    FleetFacts,
    SimEnvoy,
    base_traits,
    check_encoder,
    connect_all,
    head_pids,
    join_all,
    make_resources,
    percentile,
    profile_processes,
    report_body,
    summarise_raw_profile,
)

import vigo
from tests.raycluster import HEALTH_CHECKS, SimCluster, free_port
from vigo.actors.failover import promote
from vigo.errors import ConfigError

RESULTS_PATH = Path(__file__).parent / "results" / "failover.json"
TARGETS = {"promotion_to_serving_s": 1.0, "auto_rto_s": 5.0, "sync_rpo": 0, "async_lag_p99_ms": 100.0,
           "lag_rate_per_s": 1000.0}
#: How often Ray's node table (and in auto mode control's route) is polled after the kill, s.
POLL_S = 0.02
#: Retention raised for the benchmark: every acknowledged run must still be there for the RPO
#: count (the default keeps 200 runs per envoy and deletes older ones with every batch).
RUNS_PER_ENVOY = 1_000_000
#: Longest wait for the new primary's first acknowledgement after the kill, seconds.
SERVING_TIMEOUT_S = 90.0


def log(message: str) -> None:
    print(f"[failover {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchmarkError(Exception):
    """The benchmark cannot go on (cluster did not start, joins failed, no promotion...)."""


def rnd(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def pcts(values: list[float], scale: float = 1000.0) -> dict[str, Any]:
    """p50/p90/p99/max of ``values`` (seconds) in milliseconds, and their count."""
    s = sorted(values)

    def f(v: float | None) -> float | None:
        return None if v is None else round(v * scale, 1)

    return {"n": len(s), "p50": f(percentile(s, 0.5)), "p90": f(percentile(s, 0.9)), "p99": f(percentile(s, 0.99)),
            "max": f(s[-1] if s else None)}


# --------------------------------------------------------------------------------------------
# Result traffic


class Traffic:
    """Result writes from real envoy identities over their mutual-TLS connections.

    Every acknowledged run id lands in ``acks`` (run id -> (ack time, term answered)), whatever
    phase sent it: the RPO check compares all of them with the new primary's database."""

    def __init__(self, envoys: list[SimEnvoy], facts: FleetFacts, key_pem: bytes, *, request_timeout_s: float,
                 retry_pause_s: float) -> None:
        self.envoys = [e for e in envoys if e.writer is not None]
        self.facts = facts
        self.key_pem = key_pem
        self.request_timeout_s = request_timeout_s
        self.retry_pause_s = retry_pause_s
        self.acks: dict[str, tuple[float, int]] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.reconnects = 0
        self.abort = False  # set when a phase's drain time is over: resending stops
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._inflight: set[SimEnvoy] = set()  # mid-request: its stream is at no known frame if cancelled
        host, port = facts.gateway.rsplit(":", 1)
        self._host, self._port = host, int(port)

    async def _connect(self, envoy: SimEnvoy) -> None:
        from vigo.agent.enrolment import tls_client_context

        ctx = self._contexts.get(envoy.envoy_id)
        if ctx is None:
            ctx = self._contexts[envoy.envoy_id] = tls_client_context(envoy.ca_pem, envoy.cert_pem, self.key_pem)
        async with asyncio.timeout(self.request_timeout_s):
            envoy.reader, envoy.writer = await asyncio.open_connection(
                self._host, self._port, ssl=ctx, server_hostname=self._host)
        envoy.next_id = 0
        self.reconnects += 1

    async def deliver(self, envoy: SimEnvoy) -> float | None:
        """Send one new report until it is acknowledged; the ack time (None: aborted)."""
        report = report_body(envoy, self.facts, time.time())
        run_id = report["run_id"]
        body = {"envoy_id": envoy.envoy_id, "reports": [report]}
        while not self.abort:
            if envoy.writer is None:
                try:
                    await self._connect(envoy)
                except (TimeoutError, OSError, ssl.SSLError) as exc:
                    self.errors[f"connect:{type(exc).__name__}"] += 1
                    await asyncio.sleep(self.retry_pause_s * random.uniform(1, 2))
                    continue
            self._inflight.add(envoy)
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    kind, answer = await envoy.request("results", body)
                self._inflight.discard(envoy)
            except TimeoutError:
                self._inflight.discard(envoy)
                self.errors["timeout"] += 1
                envoy.close()  # a late reply may still come: the stream is at no known frame
                continue
            except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError) as exc:
                self._inflight.discard(envoy)
                self.errors[f"connection:{type(exc).__name__}"] += 1
                envoy.close()
                await asyncio.sleep(self.retry_pause_s * random.uniform(1, 2))
                continue
            if kind == "error":
                self.errors[f"error:{answer.get('code')}"] += 1
                await asyncio.sleep(self.retry_pause_s * random.uniform(1, 2))
                continue
            if run_id in answer.get("acked", ()):
                at = time.time()
                self.acks[run_id] = (at, int(answer.get("term") or 0))
                return at
            self.errors["not_acked"] += 1
            await asyncio.sleep(self.retry_pause_s)
        return None

    async def closed_loop(self, seconds: float, warmup_s: float) -> dict[str, Any]:
        """Every envoy writes back to back; acknowledged writes/s over ``seconds`` after ``warmup_s``."""
        self.abort = False
        errors_before = collections.Counter(self.errors)
        t0 = time.time()
        start, end = t0 + warmup_s, t0 + warmup_s + seconds
        latencies: list[float] = []

        async def worker(envoy: SimEnvoy) -> None:
            while time.time() < end:
                sent = time.time()
                at = await self.deliver(envoy)
                if at is not None and start <= at <= end:
                    latencies.append(at - sent)

        tasks = [asyncio.create_task(worker(e)) for e in self.envoys]
        await asyncio.wait(tasks, timeout=warmup_s + seconds + self.request_timeout_s + 5)
        self.abort = True
        await self.cancel(tasks)
        self.abort = False
        return {"concurrency": len(self.envoys), "seconds": seconds, "warmup_s": warmup_s, "acked": len(latencies),
                "per_s": round(len(latencies) / seconds, 1), "latency_ms": pcts(latencies),
                "errors": dict(self.errors - errors_before)}

    async def open_loop(self, rate: float, *, seconds: float | None = None, stop: asyncio.Event | None = None,
                        drain_s: float = 30.0) -> dict[str, Any]:
        """Writes scheduled at ``rate``/s (for ``seconds``, or until ``stop``), handed to idle
        envoys in order; latency counts from the scheduled time (no coordinated omission)."""
        self.abort = False
        errors_before = collections.Counter(self.errors)
        queue: asyncio.Queue[float | None] = asyncio.Queue()
        latencies: list[float] = []
        acked_at: list[float] = []

        async def worker(envoy: SimEnvoy) -> None:
            while (scheduled := await queue.get()) is not None:
                at = await self.deliver(envoy)
                if at is not None:
                    latencies.append(at - scheduled)
                    acked_at.append(at)

        tasks = [asyncio.create_task(worker(e)) for e in self.envoys]
        start = time.time()
        issued = 0
        while (seconds is None or issued < rate * seconds) and not (stop is not None and stop.is_set()):
            due = int((time.time() - start) * rate) + 1
            if seconds is not None:
                due = min(due, int(rate * seconds))
            while issued < due:
                queue.put_nowait(start + issued / rate)
                issued += 1
            await asyncio.sleep(max(0.0, start + issued / rate - time.time()))
        window_end = time.time()
        for _ in tasks:
            queue.put_nowait(None)
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        not_done = queue.qsize() - len(tasks) + len(pending)  # sentinels left behind are not writes
        self.abort = True
        await self.cancel(tasks)
        self.abort = False
        span = max(window_end - start, 1e-6)
        in_window = sum(1 for at in acked_at if at <= window_end)
        return {"target_per_s": rate, "seconds": round(span, 2), "scheduled": issued, "acked": len(latencies),
                "achieved_per_s": round(in_window / span, 1), "latency_ms": pcts(latencies),
                "unfinished_after_drain": max(0, not_done), "errors": dict(self.errors - errors_before)}

    def first_ack(self, min_term: int, after: float = 0.0) -> float | None:
        times = [at for at, term in self.acks.values() if term >= min_term and at >= after]
        return min(times) if times else None

    def close(self) -> None:
        for e in self.envoys:
            e.close()

    async def cancel(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Stop the phase's workers; an envoy cancelled mid-request reconnects before its next one."""
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for envoy in self._inflight:
            envoy.close()
        self._inflight.clear()


# --------------------------------------------------------------------------------------------
# Replication lag


def _probe(member: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs inside the primary's actor (``__ray_call__``): what ``ping()`` and
    ``replication_status()`` answer, in one call and one moment. Both are lock-free there."""
    return member.member_info(), member.replication_status()


class LagSampler(threading.Thread):
    """Samples the primary every ``period_s``: its newest commit (position and commit time, as
    ``ping()`` tells) and ``replication_status()`` (standby positions and ack times), in one
    ``__ray_call__`` so both describe the same moment; nothing is added to vigo."""

    def __init__(self, primary: Any, period_s: float) -> None:
        super().__init__(name="lag-sampler", daemon=True)
        self.primary = primary
        self.period_s = period_s
        self.samples: list[dict[str, Any]] = []
        self.failures = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            sent = time.time()
            try:
                info, status = ray.get(self.primary.__ray_call__.remote(_probe), timeout=2)
                self.samples.append({"sent": sent, "received": time.time(), "head": info.get("position"),
                                     "head_at": info.get("committed_at"), "standbys": status.get("standbys", [])})
            except Exception:  # the primary is being killed, or a slow answer: a gap in the samples
                self.failures += 1
            self._stop_event.wait(max(0.0, self.period_s - (time.time() - sent)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def window(self, start: float, end: float) -> list[dict[str, Any]]:
        return [s for s in self.samples if start <= s["sent"] <= end]


def _key(pos: Any) -> tuple[int, int]:
    return (int(pos[1]), int(pos[2]))


def commit_lags(samples: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per standby, per commit seen as a head: lag bounds (seconds), see the module docstring."""
    out: dict[str, dict[str, list[float]]] = {}
    names = sorted({s["name"] for smp in samples for s in smp["standbys"]})
    for name in names:
        rows = []  # (sent, position key, generation, acked_at), in sending order (monotonic)
        for smp in samples:
            for s in smp["standbys"]:
                if s["name"] == name and s.get("position") and s.get("acked_at"):
                    rows.append((smp["sent"], _key(s["position"]), s["position"][0], float(s["acked_at"])))
        upper, lower, uncovered = [], [], 0
        keys = [r[1] for r in rows]
        seen: set[tuple[int, int]] = set()
        for smp in samples:
            head, head_at = smp.get("head"), smp.get("head_at")
            if not head or not head_at or _key(head) in seen:
                continue
            seen.add(_key(head))
            k = bisect.bisect_left(keys, _key(head))
            while k < len(rows) and rows[k][2] != head[0]:  # another generation: not comparable
                k += 1
            if k >= len(rows):
                uncovered += 1  # committed at the very end of the window
                continue
            upper.append(max(0.0, rows[k][3] - float(head_at)))
            lower.append(max(0.0, rows[k - 1][0] - float(head_at)) if k > 0 else 0.0)
        out[name] = {"upper": upper, "lower": lower, "uncovered": [uncovered]}
    return out


def lag_figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    per = commit_lags(samples)
    standbys = {}
    for name, v in per.items():
        reported = [float(s["lag_s"]) for smp in samples for s in smp["standbys"]
                    if s["name"] == name and s.get("lag_s") is not None]
        commits = [int(s["lag_commits"]) for smp in samples for s in smp["standbys"] if s["name"] == name]
        standbys[name] = {
            "commit_lag_ms": pcts(v["upper"]),
            "commit_lag_lower_bound_ms": pcts(v["lower"]),
            "commits_measured": len(v["upper"]), "commits_not_yet_covered_at_end": v["uncovered"][0],
            "vigo_lag_s_sampled_ms": pcts(reported),
            "vigo_lag_commits_sampled": {"p50": percentile(sorted(commits), 0.5),
                                         "p99": percentile(sorted(commits), 0.99),
                                         "max": max(commits) if commits else None},
        }
    worst = max(standbys.values(), key=lambda s: s["commit_lag_ms"]["p99"] or 0.0) if standbys else None
    gaps = [b["sent"] - a["sent"] for a, b in itertools.pairwise(samples)]
    return {"samples": len(samples), "sample_interval_ms": pcts(gaps), "standbys": standbys,
            "worst_p50_ms": worst["commit_lag_ms"]["p50"] if worst else None,
            "worst_p99_ms": worst["commit_lag_ms"]["p99"] if worst else None}


# --------------------------------------------------------------------------------------------
# Cluster, kill and promotion


def start_cluster(root: Path, mode: str, auto: bool, args: argparse.Namespace) -> SimCluster:
    """A fresh SimCluster with vigo deployed; the caller shuts it down (also when this raises)."""
    sim = SimCluster(root)
    try:
        t0 = time.monotonic()
        sim.start()
        for attempt in range(1, 4):
            # SimCluster picks the gateway port when it is built; the Ray processes started
            # since may have taken it (they bind random ports): pick it now, retry if lost.
            sim.port = free_port()
            cfg = sim.config(standbys=["b", "c"], sync_standbys=1 if mode == "sync" else 0,
                             sync_timeout_s=args.sync_timeout_s, auto_failover=auto,
                             failover_after_s=args.failover_after_s)
            cfg.retention.runs_per_envoy = RUNS_PER_ENVOY
            try:
                sim.deploy(cfg)
                break
            except ConfigError as exc:
                if "did not start on port" not in str(exc) or attempt == 3:
                    raise
                log(f"  {exc}; retrying on another port")
        sim.wait("standbys in sync", sim.all_in_sync, timeout_s=120)
        log(f"  cluster up and deployed ({mode}{', auto failover' if auto else ''}) in "
            f"{time.monotonic() - t0:.1f} s; gateway 127.0.0.1:{sim.port}")
    except BaseException:
        sim.shutdown()
        raise
    return sim


def member_pids(sim: SimCluster) -> dict[str, int]:
    pids = {"loadgen": os.getpid()}
    route = sim.route()
    for name in [route["primary"], *route.get("standbys", [])]:
        with contextlib.suppress(Exception):
            role = "primary" if name == route["primary"] else f"standby-{name.rsplit('-', 1)[1]}"
            pids[role] = int(ray.get(sim.actor(name).ping.remote(), timeout=10)["pid"])
    with contextlib.suppress(Exception):
        pids["gateway"] = int(ray.get(sim.actor("gateway-head").__ray_call__.remote(lambda _self: os.getpid()),
                                      timeout=10))
    return pids


def ray_pids(sim: SimCluster, exclude: set[int]) -> list[int]:
    """This cluster's own Ray processes (GCS, raylets, agents: their command lines name its
    session dir) and the control actor: their CPU is ours, not another user's."""
    found = []
    with contextlib.suppress(Exception):
        found = head_pids(str(sim.cluster.head_node.get_session_dir_path()), exclude)
    with contextlib.suppress(Exception):
        found.append(int(ray.get(sim.control().__ray_call__.remote(lambda _self: os.getpid()), timeout=10)))
    return found


def gateway_status(sim: SimCluster) -> dict[str, Any] | None:
    try:
        return ray.get(sim.actor("gateway-head").status.remote(), timeout=10)
    except Exception:  # figures only: the phase goes on without them
        return None


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def kill_and_fail_over(sim: SimCluster, auto: bool, sampler: LagSampler | None) -> dict[str, Any]:
    """On a thread: kill host a; scripted mode promotes the moment Ray reports it dead, auto
    mode waits for control's watchdog to move the route."""
    node_id = sim.nodes["a"].node_id
    old_route = sim.route()
    if sampler is not None:
        sampler.stop()
    killed_at = sim.kill_host("a")
    out: dict[str, Any] = {"killed_at": killed_at, "old_primary": old_route["primary"], "old_term": old_route["term"]}
    dead_at = route_seen_at = None
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    while time.monotonic() < deadline:
        now = time.time()
        if dead_at is None and not node_alive(node_id):
            dead_at = now
            if not auto:
                break
        if auto and route_seen_at is None:
            route = sim.route()
            if route["primary"] != old_route["primary"]:
                route_seen_at = now
                out["route"] = route
        if auto and dead_at is not None and route_seen_at is not None:
            break
        time.sleep(POLL_S)
    out["ray_dead_at"] = dead_at
    if dead_at is None and not auto:
        raise BenchmarkError(f"Ray did not report host a's node dead within {SERVING_TIMEOUT_S:.0f} s")
    if auto:
        if route_seen_at is None:
            raise BenchmarkError(f"the watchdog did not promote a standby within {SERVING_TIMEOUT_S:.0f} s")
        out["route_seen_at"] = route_seen_at
        out["promoted_at"] = float(out["route"]["history"][-1]["at"])  # control's set_primary
        out["new_primary"], out["new_term"] = out["route"]["primary"], int(out["route"]["term"])
        return out
    out["promote_called_at"] = time.time()
    with timed_promote_steps() as steps:
        result = promote("p0")
    out["promote_returned_at"] = time.time()
    out["promote_steps"] = steps
    out["promote"] = result
    out["new_primary"], out["new_term"] = result["new_primary"], int(result["term"])
    out["promoted_at"] = float(sim.route()["history"][-1]["at"])
    return out


@contextlib.contextmanager
def timed_promote_steps():
    """Time the steps of a scripted ``promote()`` (it runs in this process): each member it asks
    where it is, and the gateway reroute. Wraps the module's helpers for the duration only;
    nothing in vigo changes. What is left of promote()'s time is the fencing."""
    import vigo.actors.failover as failover

    steps: dict[str, Any] = {"ask_s": {}, "reroute_s": None}
    ask, reroute = failover._ask, failover._reroute_gateways
    ask_all = getattr(failover, "_ask_all", None)  # with the proposed fix: every member at once

    def timed_ask(name: str, *a: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return ask(name, *a, **kw)
        finally:
            steps["ask_s"][name] = round(time.monotonic() - t0, 3)

    def timed_ask_all(names: list[str], *a: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return ask_all(names, *a, **kw)
        finally:
            steps["ask_s"][" + ".join(names) or "nobody"] = round(time.monotonic() - t0, 3)

    def timed_reroute(*a: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return reroute(*a, **kw)
        finally:
            steps["reroute_s"] = round(time.monotonic() - t0, 3)

    failover._ask, failover._reroute_gateways = timed_ask, timed_reroute
    if ask_all is not None:
        failover._ask_all = timed_ask_all
    try:
        yield steps
    finally:
        failover._ask, failover._reroute_gateways = ask, reroute
        if ask_all is not None:
            failover._ask_all = ask_all


def watchdog_result(sim: SimCluster, since: float) -> dict[str, Any] | None:
    """The watchdog's own promote() result, from control's worker log (best effort)."""
    try:
        logs = Path(sim.cluster.head_node.get_logs_dir_path())
    except Exception:
        return None
    found = None
    for path in logs.glob("worker-*"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < since:
                continue
            for m in re.finditer(r"auto failover: (\{.*\})", path.read_text(errors="replace")):
                with contextlib.suppress(ValueError, SyntaxError):
                    found = ast.literal_eval(m.group(1))
    return found


def stored_run_ids(sim: SimCluster, member: str) -> set[str]:
    topology = ray.get(sim.control().get_topology.remote(), timeout=30)
    host = topology["partitions"]["p0"]["hosts"][member]
    conn = apsw.Connection(str(sim.root / host / "state.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {r[0] for r in conn.execute("SELECT run_id FROM runs")}
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# One scenario


async def connect_fleet(sim: SimCluster, args: argparse.Namespace) -> Traffic:
    from vigo.agent.enrolment import make_envoy_key_and_csr

    gateway = f"127.0.0.1:{sim.port}"
    facts = FleetFacts(gateway, None, 0, base_traits(), make_resources()[:args.resources])
    check_encoder(facts)
    token = (await asyncio.to_thread(sim.admin, "token.create", {"uses": args.envoys, "note": "failover benchmark"}))["token"]
    key_pem, csr_pem = make_envoy_key_and_csr("bench-envoy")  # one key for every CSR, as checkin_load
    envoys, join_errors, join_s = await join_all(args.envoys, facts, [token], csr_pem, 16, args.request_timeout)
    if len(envoys) < args.envoys:
        raise BenchmarkError(f"only {len(envoys)} of {args.envoys} envoys joined (errors: {join_errors})")
    connect_errors, _ = await connect_all(envoys, key_pem, gateway, 16, args.request_timeout)
    traffic = Traffic(envoys, facts, key_pem, request_timeout_s=args.request_timeout, retry_pause_s=args.retry_pause)
    if len(traffic.envoys) < len(envoys):
        raise BenchmarkError(f"only {len(traffic.envoys)} of {len(envoys)} envoys connected ({connect_errors})")
    log(f"  {len(envoys)} envoys joined in {join_s:.1f} s and connected over mutual TLS")
    return traffic


async def throughput_phase(sim: SimCluster, traffic: Traffic, pids: dict[str, int], groups: dict[str, list[int]],
                           args: argparse.Namespace) -> dict[str, Any]:
    log(f"  closed-loop write throughput: {len(traffic.envoys)} envoys, {args.warmup_seconds:g} s warm-up "
        f"+ {args.throughput_seconds:g} s ...")
    window = CpuWindow(pids, groups)
    gw_before = await asyncio.to_thread(gateway_status, sim)
    window.start()
    res = await traffic.closed_loop(args.throughput_seconds, args.warmup_seconds)
    res["cpu_pct"] = window.stop()
    gw_after = await asyncio.to_thread(gateway_status, sim)
    if gw_before and gw_after:
        batches = gw_after["batches"] - gw_before["batches"]
        items = gw_after["mean_batch"] * gw_after["batches"] - gw_before["mean_batch"] * gw_before["batches"]
        res["gateway"] = {"batches": batches, "mean_batch": round(items / batches, 1) if batches else None,
                          "batches_per_s": round(batches / (args.throughput_seconds + args.warmup_seconds), 1)}
    # Writes per CPU-second of this cluster's own processes: less sensitive than writes/s to
    # whatever else the machine runs meanwhile.
    c = res["cpu_pct"]
    ours = sum(v or 0.0 for k, v in c.items() if k not in ("machine", "other", "irq"))
    res["writes_per_cpu_s"] = round(res["per_s"] / (ours / 100), 1) if ours else None
    log(f"  {res['per_s']} acknowledged writes/s, latency p50 {res['latency_ms']['p50']} ms "
        f"p99 {res['latency_ms']['p99']} ms, gateway batches {res.get('gateway')}, errors {res['errors'] or 'none'}")
    return res


async def lag_phase(sim: SimCluster, traffic: Traffic, pids: dict[str, int], groups: dict[str, list[int]],
                    args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Open-loop steps at ``--lag-rates`` with the lag sampler running; the highest step may
    be profiled (``--profile-seconds``)."""
    sampler = LagSampler(await asyncio.to_thread(sim.primary), args.sample_ms / 1000)
    sampler.start()
    steps = []
    try:
        await asyncio.sleep(0.5)
        for rate in args.lag_rates:
            log(f"  replication lag: {rate:g} writes/s open loop for {args.lag_seconds:g} s, "
                f"sampling every {args.sample_ms:g} ms ...")
            profiling = None
            if args.profile_seconds > 0 and rate == max(args.lag_rates):
                targets = {k: v for k, v in pids.items() if k in ("primary", "standby-b", "gateway", "loadgen")}
                profiling = asyncio.create_task(profile_processes(
                    targets, int(min(args.profile_seconds, args.lag_seconds)), work))
            window = CpuWindow(pids, groups)
            window.start()
            t0 = time.time()
            res = await traffic.open_loop(rate, seconds=args.lag_seconds, drain_s=args.lag_drain_seconds)
            res["cpu_pct"] = window.stop()
            await asyncio.sleep(0.5)  # the window's last commits reach the standbys
            res["lag"] = lag_figures(sampler.window(t0, t0 + res["seconds"] + 0.5))
            if profiling is not None:
                written = await profiling
                res["profile"] = {name: summarise_raw_profile(path, 20) for name, path in written.items()}
            steps.append(res)
            lag = res["lag"]
            log(f"  achieved {res['achieved_per_s']} writes/s (ack latency p99 {res['latency_ms']['p99']} ms, "
                f"{res['unfinished_after_drain']} unfinished); commit -> standby ack lag p50 {lag['worst_p50_ms']} ms, "
                f"p99 {lag['worst_p99_ms']} ms (worse standby); cpu {res['cpu_pct']}")
    finally:
        await asyncio.to_thread(sampler.stop)
    return {"steps": steps, "sampler_failures": sampler.failures}


async def failover_phase(sim: SimCluster, traffic: Traffic, auto: bool, args: argparse.Namespace) -> dict[str, Any]:
    log(f"  failover: {args.failover_rate:g} writes/s open loop; killing host a after {args.before_kill_seconds:g} s"
        f" ({'auto failover by the watchdog' if auto else 'promote() the moment Ray reports the node dead'}) ...")
    sampler = LagSampler(await asyncio.to_thread(sim.primary), args.sample_ms / 1000)
    sampler.start()
    stop = asyncio.Event()
    load = asyncio.create_task(traffic.open_loop(args.failover_rate, stop=stop, drain_s=args.request_timeout))
    try:
        await asyncio.sleep(args.before_kill_seconds)
        ev = await asyncio.to_thread(kill_and_fail_over, sim, auto, sampler)
        killed_at, new_term = ev["killed_at"], ev["new_term"]
        deadline = time.time() + SERVING_TIMEOUT_S
        while (first_new := traffic.first_ack(new_term)) is None and time.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(args.after_serving_seconds)
    finally:
        stop.set()
        load_stats = await load
    at_kill = [s for s in sampler.samples if s["sent"] < killed_at]
    last = at_kill[-1]["standbys"] if at_kill else []
    acked_old = [at for at, term in traffic.acks.values() if term < new_term]
    res: dict[str, Any] = {
        "old_primary": ev["old_primary"], "new_primary": ev["new_primary"], "new_term": new_term,
        "traffic": load_stats,
        "ray_detection_s": rnd(ev["ray_dead_at"] - killed_at) if ev.get("ray_dead_at") else None,
        "route_moved_after_kill_s": rnd(ev["promoted_at"] - killed_at),
        "first_ack_new_primary_after_kill_s": rnd(first_new - killed_at) if first_new else None,
        "last_ack_old_primary_after_kill_s": rnd(max(acked_old) - killed_at) if acked_old else None,
        "standbys_at_kill": [{k: s.get(k) for k in ("name", "lag_commits", "lag_bytes", "lag_s", "in_sync")}
                             for s in last],
    }
    if first_new is None:
        raise BenchmarkError(f"no result was acknowledged at term {new_term} within {SERVING_TIMEOUT_S:.0f} s")
    res["rto_s"] = res["first_ack_new_primary_after_kill_s"]
    if auto:
        w = res["watchdog_promote"] = await asyncio.to_thread(watchdog_result, sim, killed_at - 60)
        # Nobody here called promote(): the watchdog's decision is not observable, only the
        # route change (control's set_primary, the end of the promotion step).
        res["promotion_to_serving_s"] = rnd(first_new - ev["promoted_at"])
        if w and w.get("promotion_s") is not None:
            res["standby_promotion_to_serving_s"] = rnd(first_new - (ev["promoted_at"] - float(w["promotion_s"])))
            # promote() started total_s before its end; its end is the route change plus the
            # gateway reroute (~0.1 s, not in control's log): a lower bound, off by that.
            res["watchdog_decided_after_kill_s"] = rnd(ev["promoted_at"] - float(w.get("total_s") or 0) - killed_at)
    else:
        p, steps = ev["promote"], ev["promote_steps"]
        ask_total = sum(steps["ask_s"].values())
        reroute = steps["reroute_s"] or 0.0
        res.update({
            "promote_call_s": rnd(ev["promote_returned_at"] - ev["promote_called_at"]),
            "promote": {k: p.get(k) for k in ("detect_s", "promotion_s", "open_s", "total_s", "old_primary_alive",
                                              "fenced", "gateways", "held")},
            "promote_steps": {
                "ask_members_s": steps["ask_s"],  # ping of each member, one after the other
                # What promote() spends besides asking, promoting and rerouting: fencing every
                # member other than the chosen standby, one after the other.
                "fence_s": rnd((p.get("total_s") or 0) - ask_total - (p.get("promotion_s") or 0) - reroute),
                "promotion_s": p.get("promotion_s"),
                "reroute_gateways_s": steps["reroute_s"],
            },
            "promotion_to_serving_s": rnd(first_new - ev["promote_called_at"]),
            "promote_returned_to_serving_s": rnd(first_new - ev["promote_returned_at"]),
            # From the chosen standby being told to promote (control's route change minus
            # promote()'s promotion step) to the first acknowledged write at the new term.
            "standby_promotion_to_serving_s": rnd(first_new - (ev["promoted_at"] - float(p.get("promotion_s") or 0))),
        })
    # RPO: every acknowledged run id must be in the new primary's database.
    stored = await asyncio.to_thread(stored_run_ids, sim, ev["new_primary"])
    lost = [(rid, at, term) for rid, (at, term) in traffic.acks.items() if rid not in stored]
    res["rpo"] = {"acknowledged": len(traffic.acks), "lost": len(lost),
                  "lost_acked_before_kill_s": sorted(round(killed_at - at, 3) for _, at, _ in lost)[:20],
                  "lost_sample": [rid for rid, _, _ in lost[:5]]}
    log(f"  {ev['new_primary']} serves at term {new_term}: Ray detection {res['ray_detection_s']} s, "
        f"RTO {res['rto_s']} s, promotion -> serving {res['promotion_to_serving_s']} s, "
        f"acknowledged lost {len(lost)} of {len(traffic.acks)}")
    return res


def run_scenario(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    mode = args.auto_mode if name == "auto" else name
    auto = name == "auto"
    log(f"scenario {name}: {mode} replication, {'auto failover' if auto else 'scripted promote'}")
    t0 = time.monotonic()
    sim = start_cluster(root, mode, auto, args)
    try:
        return asyncio.run(_scenario(sim, name, mode, auto, args, root)) | {
            "mode": mode, "auto_failover": auto, "seconds": round(time.monotonic() - t0, 1)}
    finally:
        log(f"  shutting the cluster down ({name})")
        sim.shutdown()


async def _scenario(sim: SimCluster, name: str, mode: str, auto: bool, args: argparse.Namespace,
                    work: Path) -> dict[str, Any]:
    traffic = await connect_fleet(sim, args)
    try:
        pids = await asyncio.to_thread(member_pids, sim)
        groups = {"ray": ray_pids(sim, set(pids.values()))}
        res: dict[str, Any] = {}
        if name in ("sync", "async"):
            res["throughput"] = await throughput_phase(sim, traffic, pids, groups, args)
        if name == "async":
            res["lag"] = await lag_phase(sim, traffic, pids, groups, args, work)
        res["failover"] = await failover_phase(sim, traffic, auto, args)
        res["reconnects"] = traffic.reconnects  # connections reopened after a failed request
        return res
    finally:
        traffic.close()


# --------------------------------------------------------------------------------------------
# Verdicts and report


def verdicts(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sc = res["scenarios"]
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, measured: Any, target: float | None, met: bool | None, note: str = "") -> None:
        out[name] = {"measured": measured, "target": target, "met": met, "note": note}

    for name in ("sync", "async"):
        f = sc.get(name, {}).get("failover")
        if f:
            v = f["promotion_to_serving_s"]
            add(f"{name}: promotion -> serving (s)", v, TARGETS["promotion_to_serving_s"],
                v is not None and v <= TARGETS["promotion_to_serving_s"], "promote() call -> first ack at new term")
            v = f.get("standby_promotion_to_serving_s")
            add(f"{name}: standby promotion step -> serving (s)", v, TARGETS["promotion_to_serving_s"],
                v is not None and v <= TARGETS["promotion_to_serving_s"],
                "standby told to promote -> first ack at new term (excludes asking/fencing the dead primary)")
    f = sc.get("auto", {}).get("failover")
    if f:
        add("auto: RTO kill -> first ack on new primary (s)", f["rto_s"], TARGETS["auto_rto_s"],
            f["rto_s"] is not None and f["rto_s"] <= TARGETS["auto_rto_s"],
            f"failover_after_s {res['settings']['failover_after_s']}, health checks 1000 ms x 3")
    for name in ("sync", "auto"):
        f = sc.get(name, {}).get("failover")
        if f and sc[name]["mode"] == "sync":
            add(f"{name}: RPO acknowledged results lost", f["rpo"]["lost"], TARGETS["sync_rpo"],
                f["rpo"]["lost"] == 0, f"of {f['rpo']['acknowledged']} acknowledged")
    steps = sc.get("async", {}).get("lag", {}).get("steps") or []
    for name in ("sync", "async", "auto"):
        f = sc.get(name, {}).get("failover")
        if f:
            add(f"{name}: Ray node-death detection (s)", f["ray_detection_s"], None, None, "kill -> Alive False")
            if name != "auto":
                add(f"{name}: RTO kill -> first ack, scripted promote (s)", f["rto_s"], None, None,
                    "detection + promote() + first write")
    f = sc.get("async", {}).get("failover")
    if f:
        lagk = ", ".join(f"{x['name'].rsplit('-', 1)[1]} {x['lag_commits']}" for x in f["standbys_at_kill"])
        add("async: RPO acknowledged results lost", f["rpo"]["lost"], None, None,
            f"of {f['rpo']['acknowledged']}; lag at the last sample before the kill (commits): {lagk}")
    if res.get("sync_async_throughput_ratio") is not None:
        add("sync / async write throughput (ratio)", res["sync_async_throughput_ratio"], None, None,
            f"per CPU-second: {res.get('sync_async_per_cpu_ratio')}")
    lag = next((x for x in steps if x["target_per_s"] == TARGETS["lag_rate_per_s"]), steps[-1] if steps else None)
    if lag:
        rate_ok = lag["achieved_per_s"] >= 0.95 * TARGETS["lag_rate_per_s"]
        v = lag["lag"]["worst_p99_ms"]
        add("async: replication lag p99 (ms)", v, TARGETS["async_lag_p99_ms"],
            v is not None and v <= TARGETS["async_lag_p99_ms"] and rate_ok,
            f"at {lag['achieved_per_s']} writes/s achieved (target rate {TARGETS['lag_rate_per_s']:g})"
            + ("" if rate_ok else "; NOT at the target rate"))
    return out


def print_report(res: dict[str, Any]) -> None:
    sc = res["scenarios"]
    print(f"\nfailover on a simulated 4-node Ray cluster (health checks {HEALTH_CHECKS['health_check_period_ms']} ms x "
          f"{HEALTH_CHECKS['health_check_failure_threshold']}), {res['settings']['envoys']} envoys, reports of "
          f"{res['settings']['resources']} resources, {res['machine']['cpus']} CPUs shared by everything")
    tp = {n: sc[n]["throughput"] for n in ("sync", "async") if sc.get(n, {}).get("throughput")}
    if tp:
        print(f"\nwrite throughput, closed loop, {res['settings']['envoys']} envoys, one write in flight each:")
        print(f"  {'mode':6} {'acked/s':>8} {'per cpu-s':>9} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6}  "
              "cpu % of one core: primary / standbys / gateway / loadgen / Ray / other users / machine")
        for n, t in tp.items():
            c = t["cpu_pct"]
            stb = "+".join(str(c.get(k)) for k in sorted(c) if k.startswith("standby"))
            print(f"  {n:6} {t['per_s']:>8} {t.get('writes_per_cpu_s')!s:>9} {t['latency_ms']['p50']!s:>7} "
                  f"{t['latency_ms']['p99']!s:>7} {(t.get('gateway') or {}).get('mean_batch')!s:>6}  "
                  f"{c.get('primary')} / {stb} / {c.get('gateway')} / {c.get('loadgen')} / {c.get('ray')} / "
                  f"{c.get('other')} / {c.get('machine')}")
        ratio, per_cpu = res.get("sync_async_throughput_ratio"), res.get("sync_async_per_cpu_ratio")
        if ratio is not None:
            cost = (f"synchronous mode costs {100 * (1 - ratio):.0f}% of write throughput" if ratio < 1 else
                    f"synchronous mode cost no write throughput in this run (+{100 * (ratio - 1):.0f}%)")
            print(f"  sync / async = {ratio:.2f}: {cost}; per CPU-second of the cluster's own processes "
                  f"{per_cpu if per_cpu is not None else '-'} (acked/s: whole windows; per cpu-s: acked/s over the CPU of"
                  " vigo's and this cluster's Ray processes, less sensitive to other users of the machine; batch: mean"
                  " envoy requests per gateway call to the primary)")
    for lag in sc.get("async", {}).get("lag", {}).get("steps") or []:
        c = lag["cpu_pct"]
        print(f"\nasync replication lag at {lag['target_per_s']:g} writes/s target, {lag['achieved_per_s']} achieved "
              f"(ack latency p50 {lag['latency_ms']['p50']} p99 {lag['latency_ms']['p99']} ms, "
              f"{lag['unfinished_after_drain']} unfinished), {lag['lag']['samples']} samples every "
              f"~{lag['lag']['sample_interval_ms']['p50']} ms; cpu % primary {c.get('primary')}, standbys "
              f"{c.get('standby-b')}+{c.get('standby-c')}, gateway {c.get('gateway')}, loadgen {c.get('loadgen')}, "
              f"Ray {c.get('ray')}, other users {c.get('other')}, machine {c.get('machine')}:")
        print(f"  {'standby':16} {'commits':>7} {'lag p50':>8} {'p99':>7} {'max':>7} {'(lower p50':>11} {'p99)':>6}"
              f"   vigo lag_s p50 / p99 / max ms")
        for n, s in lag["lag"]["standbys"].items():
            cl, lo, v = s["commit_lag_ms"], s["commit_lag_lower_bound_ms"], s["vigo_lag_s_sampled_ms"]
            print(f"  {n:16} {s['commits_measured']:>7} {cl['p50']!s:>8} {cl['p99']!s:>7} {cl['max']!s:>7} "
                  f"{lo['p50']!s:>11} {lo['p99']!s:>6}   {v['p50']} / {v['p99']} / {v['max']}")
        for name, prof in (lag.get("profile") or {}).items():
            if not prof.get("busy_samples"):
                continue
            print(f"  profile {name}: {prof['busy_samples']} busy of {prof['samples']} samples; top self frames:")
            for row in prof["top_self"][:8]:
                print(f"    {row['pct']:5.1f}%  {row['frame']}")
    rows = [(n, sc[n]) for n in ("sync", "async", "auto") if sc.get(n, {}).get("failover")]
    if rows:
        print("\nfailover, seconds (after the kill where it says so):")
        print(f"  {'scenario':11} {'Ray dead':>8} {'promote':>8} {'ask':>8} {'fence':>6} {'promo':>6} {'reroute':>7} "
              f"{'call->srv':>9} {'stby->srv':>9} {'route':>6} {'RTO':>6} {'lost/acked':>11}  lag at kill (commits)")
        for n, s in rows:
            f = s["failover"]
            st = f.get("promote_steps") or {}
            w = f.get("watchdog_promote") or {}
            if st:
                promote_s, ask_old = f["promote_call_s"], rnd(sum(st["ask_members_s"].values()))
                fence, promo, reroute = st["fence_s"], st["promotion_s"], st["reroute_gateways_s"]
            else:  # auto: the watchdog's own figures, from control's log
                promote_s, ask_old, fence, promo, reroute = w.get("total_s"), w.get("detect_s"), None, w.get("promotion_s"), None
            lagk = ", ".join(f"{x['name'].rsplit('-', 1)[1]}:{x['lag_commits']}" for x in f["standbys_at_kill"])
            label = n if n != "auto" else f"auto ({s['mode']})"

            def c(v: Any, width: int) -> str:
                return f"{'-' if v is None else v!s:>{width}}"

            print(f"  {label:11} {c(f['ray_detection_s'], 8)} {c(promote_s, 8)} {c(ask_old, 8)} {c(fence, 6)} "
                  f"{c(promo, 6)} {c(reroute, 7)} {c(f.get('promotion_to_serving_s') if st else None, 9)} "
                  f"{c(f.get('standby_promotion_to_serving_s'), 9)} {c(f['route_moved_after_kill_s'], 6)} "
                  f"{c(f['rto_s'], 6)} {str(f['rpo']['lost']) + '/' + str(f['rpo']['acknowledged']):>11}  {lagk}")
        print("  Ray dead: kill -> ray.nodes() says Alive False (scripted promote() starts then). promote: promote()"
              " call -> return (auto: the watchdog's total_s). ask: promote() asking the members where they are,"
              " the dead primary included (auto: its detect_s). fence: promote() fencing the other members. promo: the standby opening its"
              " database + control's new route. reroute: telling the gateways. call->srv: promote() call -> first"
              " ack at the new term. stby->srv: the standby told to promote -> first ack at the new term. route: kill"
              " -> control's new route. RTO: kill -> first ack at the new term.")
    print("\ntargets (informative; the exit code does not depend on them):")
    for name, v in sorted(res["verdicts"].items(), key=lambda kv: kv[1]["met"] is None):  # targets first
        state = "-" if v["met"] is None else "met" if v["met"] else "NOT met"
        target = "-" if v["target"] is None else v["target"]
        print(f"  {name:50} measured {v['measured']!s:<8} target {target!s:<6} {state:8} {v['note']}")


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Failover of a vigo partition on a simulated multi-node Ray cluster under result traffic: "
                    "detection, promotion, RTO, RPO, async replication lag, sync/async write throughput. "
                    "Starts and stops its own clusters; all traffic stays on 127.0.0.1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 envoys, short phases (3 s throughput, 4 s lag, 1 s before the kill)")
    parser.add_argument("--scenarios", default="sync,async,auto", help="which scenarios, comma-separated")
    parser.add_argument("--envoys", type=int, default=50, help="envoys writing results (one write in flight each)")
    parser.add_argument("--resources", type=int, default=20, help="resource entries per run report (1..20)")
    parser.add_argument("--throughput-seconds", type=float, default=10.0, help="closed-loop measuring window")
    parser.add_argument("--warmup-seconds", type=float, default=2.0, help="closed-loop warm-up, not measured")
    parser.add_argument("--lag-rates", default="500,1000",
                        help="open-loop writes/s of the lag steps (async scenario), comma-separated; the verdict "
                             "uses the 1000/s step")
    parser.add_argument("--lag-seconds", type=float, default=15.0, help="length of each lag step")
    parser.add_argument("--lag-drain-seconds", type=float, default=5.0,
                        help="after a lag step, how long its backlog may still be written before it is dropped "
                             "(counted as unfinished)")
    parser.add_argument("--profile-seconds", type=float, default=0.0,
                        help="py-spy the primary, standby b, gateway and load generator for this long during the "
                             "highest lag step (0: no profile)")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="replication status sampling period")
    parser.add_argument("--failover-rate", type=float, default=200.0, help="open-loop writes/s around the kill")
    parser.add_argument("--before-kill-seconds", type=float, default=3.0, help="traffic before host a is killed")
    parser.add_argument("--after-serving-seconds", type=float, default=3.0,
                        help="traffic kept running once the new primary acknowledged its first write")
    parser.add_argument("--failover-after-s", type=float, default=2.0,
                        help="replication.failover_after_s of the auto scenario (why 2.0: see the module docstring)")
    parser.add_argument("--auto-mode", choices=("sync", "async"), default="sync",
                        help="replication mode of the auto-failover scenario")
    parser.add_argument("--sync-timeout-s", type=float, default=5.0, help="replication.sync_timeout_s (sync mode)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds for one request before resending")
    parser.add_argument("--retry-pause", type=float, default=0.1,
                        help="seconds (x1..2 jitter) before resending a refused write (the real envoy waits "
                             "retry_after_s; the benchmark measures when the server can serve again)")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs, print where")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="where the JSON results go")
    args = parser.parse_args()
    if args.quick:
        args.envoys, args.throughput_seconds, args.warmup_seconds = 20, 3.0, 1.0
        args.lag_seconds, args.before_kill_seconds, args.after_serving_seconds = 4.0, 1.0, 1.0
        args.lag_rates = "1000"
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - {"sync", "async", "auto"}
    if unknown or not scenarios:
        parser.error(f"--scenarios takes sync, async, auto (comma-separated), got {args.scenarios!r}")
    try:
        args.lag_rates = [float(r) for r in str(args.lag_rates).split(",") if r.strip()]
    except ValueError:
        parser.error(f"--lag-rates must be numbers separated by commas, got {args.lag_rates!r}")
    if not args.lag_rates or min(args.lag_rates) <= 0:
        parser.error("--lag-rates must be positive numbers")
    if not 1 <= args.resources <= 20 or args.envoys < 1 or args.failover_rate <= 0:
        parser.error("--resources must be 1..20; --envoys and --failover-rate must be positive")

    work = Path(tempfile.mkdtemp(prefix="vigo-failover-", dir="/tmp"))
    started = time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, Any] = {}
    failed: str | None = None
    try:
        for name in scenarios:
            try:
                results[name] = run_scenario(name, args, work / name)
            except Exception as exc:  # reported, and the other scenarios still run
                failed = f"scenario {name}: {type(exc).__name__}: {str(exc).strip()[-600:]}"
                log(f"FAILED: {failed}")
                results[name] = {"error": failed}
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    res: dict[str, Any] = {
        "benchmark": "failover",
        "started_at": started,
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                    "loadavg_at_start": load_at_start, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "4 Ray nodes, gateway, primary, 2 standbys and the load generator share these cores"},
        "vigo_version": vigo.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output",)} | {
            "health_checks": HEALTH_CHECKS, "runs_per_envoy": RUNS_PER_ENVOY, "output": str(args.output)},
        "targets": TARGETS,
        "scenarios": results,
    }
    s_tp = results.get("sync", {}).get("throughput", {}).get("per_s")
    a_tp = results.get("async", {}).get("throughput", {}).get("per_s")
    res["sync_async_throughput_ratio"] = round(s_tp / a_tp, 3) if s_tp and a_tp else None
    s_eff = results.get("sync", {}).get("throughput", {}).get("writes_per_cpu_s")
    a_eff = results.get("async", {}).get("throughput", {}).get("writes_per_cpu_s")
    res["sync_async_per_cpu_ratio"] = round(s_eff / a_eff, 3) if s_eff and a_eff else None
    res["verdicts"] = verdicts(res)
    print_report(res)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"\nwrote {args.output}")
    if failed:
        print(f"failover: FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
