"""How fast and how cheaply the spanner admissions roster replicates between bolts.

The default sections run the real roster code (``vigo.roster``) inside the seeded virtual-time
network of ``vigo.roster.sim``; no Ray. Its time model, printed with the results:

* one-way message latency ``--latency-ms`` (default 5 ms) plus a uniform extra delay (0-10 ms
  without loss, 0-100 ms with loss, which reorders messages), 5% duplication with loss;
* every bolt runs its loop every 50 ms; deltas are pushed every 250 ms (``SyncConfig``), a
  revocation at once; unacknowledged pushes are resent after 1 s; digests every 2 s;
* message processing takes no virtual time. "Wall" figures are the CPU time of simulating all
  five bolts in this one process, an upper bound on the protocol's own cost.

Sections (``--sections``, default all but ``ray_scaling``), each a function registered in ``SECTIONS``:

* ``convergence``: 10,000 operations over 1 s across 5 bolts (9,000 admissions of new envoys,
  1,000 revocations of envoys admitted earlier, each at a random bolt), at 0%, 10% and 30%
  message loss; virtual time from the last operation until every bolt holds equal digests for
  every shard; the final roster is checked (8,000 admitted, 1,000 revoked at every bolt).
* ``bytes``: the encoded size of one admission delta; bytes sent per operation by the delta
  protocol (by message kind) against a state-based baseline shipping whole rosters on the same
  schedule; push bytes against the deltas' own bytes times the peers.
* ``memory``: the in-memory roster per admitted envoy (tracemalloc, 100,000 envoys), with and
  without the agent id string, and the encoded (persisted) size per envoy.
* ``revocation``: time until a revocation reads Revoked at every bolt, over 500 revocations
  during background admissions, at 0% and 10% loss.

And, only when named in ``--sections`` (it needs Ray and takes minutes):

* ``ray_scaling``: check-ins/s with 1, 2 and 4 bolts (``--ray-bolts``), measured in one run:
  per configuration a fresh ``tests.raycluster.SimCluster`` (control and the gateway on the
  head, one raylet per bolt host), spanner deployed, ``--ray-envoys`` (200) real joins through
  the gateway with the envoy's client code and one mutual-TLS connection each (helpers from
  ``checkin_load.py`` and ``failover.py``); once every bolt's roster holds every envoy, a closed
  loop (every envoy checks in again as soon as its last check-in was answered; a check-in is
  ``checkin`` + ``results`` with a 20-resource run report, or ``checkin`` alone with
  ``--ray-checkin-only``) for ``--ray-warmup`` + ``--ray-seconds`` (3 + 15) seconds. Figures:
  check-ins/s, latency p50/p99, errors, CPU per process (each bolt, gateway, load generator,
  this cluster's Ray processes, kernel, everything else) and the ratios against 1 bolt. Every
  process shares this machine's cores and one gateway carries all traffic: the ratios say
  what this machine allows, the CPU columns say where the limit is. About 3-4 minutes; not in
  the default run so that the simulation sections stay quick and need no Ray.

Targets come from the issue and notes/roster-crdt.md; a missed one is printed as MISSED. The
exit code says whether the benchmark ran and its results were correct, not whether targets
were met. Writes ``benchmarks/results/roster.json``.

    .venv/bin/python benchmarks/roster.py [--sections convergence,bytes,memory,revocation]
                                          [--seeds 3] [--memory-envoys 100000]
    .venv/bin/python benchmarks/roster.py --sections ray_scaling [--ray-bolts 1,2,4] [--ray-envoys 200]
                                          [--ray-seconds 15] [--ray-warmup 3] [--ray-checkin-only]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import platform
import random
import ssl
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout, without installing vigo into the interpreter.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vigo
from vigo.roster import ReplicaId, Roster, State, SyncConfig, encode
from vigo.roster.sim import NetConfig, Simulation

RESULTS_PATH = Path(__file__).parent / "results" / "roster.json"

#: Targets (issue and notes/roster-crdt.md section 11), compared with the figures named.
TARGETS = {
    "converged_s@0%": 1.0,  # C1, worst seed
    "converged_s@10%": 3.0,  # C2, worst seed
    "converged_s@30%": 6.0,  # C3, worst seed
    "admission_delta_bytes": 200,  # D1
    "push_bytes_per_delta_byte_per_peer": 1.2,  # D2
    "revocation_visible_p99_s@0%": 0.5,  # R1 (issue)
    "revocation_visible_p99_s@10%": 3.0,  # R1 with 10% loss (notes)
    "memory_bytes_per_envoy": 100,  # issue; compared with the in-memory figure
}

BOLTS = 5
OPS = 10_000
REVOKE_EVERY = 10  # every tenth operation is a revocation
OPS_SPAN_S = 1.0
NOT_AFTER = 1_800_000_000  # certificate expiry carried by every admission, unix seconds
TICK_S = 0.05


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def envoy_id(i: int) -> str:
    return f"web-{i:06d}.eu-west-3.example.com"


def fingerprint(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


def net_for(loss: float, latency_ms: float) -> NetConfig:
    if loss == 0:
        return NetConfig(latency_s=latency_ms / 1000, reorder_s=0.01)
    return NetConfig(latency_s=latency_ms / 1000, reorder_s=0.1, loss=loss, duplicate=0.05)


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(values), "median": round(statistics.median(ordered), 4), "p99": round(p99, 4),
            "max": round(ordered[-1], 4)}


# --- sections ------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {}
#: The sections run when ``--sections`` is not given (``ray_scaling`` is not one: see there).
DEFAULT_SECTIONS: list[str] = []


def section(name: str, default: bool = True) -> Callable[[Callable[[argparse.Namespace], dict[str, Any]]], Callable[[argparse.Namespace], dict[str, Any]]]:
    def register(fn: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace], dict[str, Any]]:
        SECTIONS[name] = fn
        if default:
            DEFAULT_SECTIONS.append(name)
        return fn
    return register


def run_workload(seed: int, loss: float, latency_ms: float, *, record: bool = False) -> dict[str, Any]:
    """The 10,000-operation schedule on a warmed-up (ready) 5-bolt cluster."""
    rng = random.Random(seed)
    sim = Simulation(BOLTS, seed=seed, net=net_for(loss, latency_ms), tick_s=TICK_S, record=record,
                     persist=False)
    # A cold cluster: every bolt asks the others and is ready once they all answered.
    if sim.run_until_converged(timeout_s=30.0) is None:
        raise SystemExit(f"seed {seed}, loss {loss:.0%}: the empty cluster did not become ready in 30 s")
    start = sim.now
    admitted: list[str] = []
    for i in range(OPS):
        at = start + OPS_SPAN_S * i / OPS
        bolt = rng.choice(sim.names)
        if i % REVOKE_EVERY == REVOKE_EVERY - 1:
            sim.at(at, sim.revoke, bolt, admitted.pop(rng.randrange(len(admitted))))
        else:
            agent = envoy_id(i)
            admitted.append(agent)
            sim.at(at, sim.admit, bolt, agent, fingerprint(rng), not_after=NOT_AFTER)
    wall0 = time.perf_counter()
    sim.run_until(start + OPS_SPAN_S)
    took = sim.run_until_converged(timeout_s=60.0)
    wall = time.perf_counter() - wall0
    if took is None:
        raise SystemExit(f"seed {seed}, loss {loss:.0%}: not converged 60 s after the last operation")
    counts = sim.nodes[sim.names[0]].roster.counts()
    expected = {"admitted": OPS - OPS // REVOKE_EVERY - OPS // REVOKE_EVERY,
                "revoked": OPS // REVOKE_EVERY, "conflict": 0}
    if counts != expected:
        raise SystemExit(f"seed {seed}, loss {loss:.0%}: final roster {counts}, expected {expected}")
    return {"sim": sim, "converged_s": took, "wall_s": wall}


@section("convergence")
def convergence(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for loss in args.losses:
        runs = []
        for seed in range(args.seeds):
            log(f"convergence: loss {loss:.0%}, seed {seed} ...")
            run = run_workload(seed, loss, args.latency_ms)
            sim = run["sim"]
            runs.append({"seed": seed, "converged_s": round(run["converged_s"], 3), "wall_s": round(run["wall_s"], 3),
                         "messages": sim.sent_messages, "lost": sim.lost, "duplicated": sim.duplicated,
                         "bytes": sim.sent_bytes})
        result[f"{loss:.0%}"] = {
            "loss": loss,
            "runs": runs,
            "converged_s": summary([r["converged_s"] for r in runs]),
            "wall_s": summary([r["wall_s"] for r in runs]),
        }
    return result


@section("bytes")
def bytes_sent(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(1)
    roster = Roster(ReplicaId.fresh("bolt-eu-west-3-a"))
    first = encode(roster.admit(envoy_id(42), fingerprint(rng), not_after=NOT_AFTER))
    again = encode(roster.admit(envoy_id(42), fingerprint(rng), not_after=NOT_AFTER))
    revoke = encode(roster.revoke(envoy_id(42), "operator"))

    log("bytes: delta protocol, loss 0% ...")
    run = run_workload(0, 0.0, args.latency_ms, record=True)
    sim = run["sim"]
    counters = sim.counters()
    by_kind = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("sent_bytes.")}
    delta_bytes = sum(len(encode(op.delta)) for op in sim.ops)

    log("bytes: full-state baseline on the same schedule ...")
    full = Simulation(sim.names, seed=0, protocol="full", net=net_for(0.0, args.latency_ms), tick_s=TICK_S,
                      record=False, persist=False)
    wall0 = time.perf_counter()
    for op in sim.ops:
        full.at(op.at, full.inject, op.bolt, op.delta)
    full.run_until(max(op.at for op in sim.ops))
    full_took = full.run_until_converged(timeout_s=60.0)
    full_wall = time.perf_counter() - wall0
    if full_took is None or full.nodes["bolt0"].roster != sim.nodes["bolt0"].roster:
        raise SystemExit("the full-state baseline did not end in the delta protocol's roster")
    return {
        "admission_delta_bytes": len(first),
        "readmission_delta_bytes": len(again),
        "revocation_delta_bytes": len(revoke),
        "operations": OPS,
        "delta_protocol": {
            "bytes": sim.sent_bytes,
            "bytes_per_operation": round(sim.sent_bytes / OPS, 1),
            "by_kind": by_kind,
            "push_bytes_per_operation": round(by_kind.get("push", 0) / OPS, 1),
            "originated_delta_bytes": delta_bytes,
            "push_bytes_per_delta_byte_per_peer": round(by_kind.get("push", 0) / (delta_bytes * (BOLTS - 1)), 3),
        },
        "full_state_protocol": {
            "bytes": full.sent_bytes,
            "bytes_per_operation": round(full.sent_bytes / OPS, 1),
            "converged_s": round(full_took, 3),
            "wall_s": round(full_wall, 3),
        },
        "full_over_delta": round(full.sent_bytes / sim.sent_bytes, 1),
    }


@section("memory")
def memory(args: argparse.Namespace) -> dict[str, Any]:
    n = args.memory_envoys
    log(f"memory: {n} admissions into one roster ...")
    rng = random.Random(2)
    numbers = [rng.getrandbits(256) for _ in range(n)]
    ids = [envoy_id(i) for i in range(n)]
    fingerprints = [f"{x:064x}" for x in numbers]

    def measure(with_strings: bool) -> tuple[float, Roster]:
        """Bytes traced per envoy. With strings, agent ids and fingerprints are made inside the
        measured region, as when deltas from peers are decoded and the roster alone holds them;
        without, they exist before (the roster still holds the fingerprint's 32 bytes, but the
        id string is shared with whoever made it)."""
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        roster = Roster(ReplicaId.fresh("bolt0"))
        empty = tracemalloc.get_traced_memory()[0] - base
        for i in range(n):
            if with_strings:
                roster.admit(envoy_id(i), f"{numbers[i]:064x}", not_after=NOT_AFTER)
            else:
                roster.admit(ids[i], fingerprints[i], not_after=NOT_AFTER)
        roster.take_unsaved()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base - empty
        tracemalloc.stop()
        return used / n, roster

    shared_ids, roster = measure(False)
    everything, _ = measure(True)
    encoded = sum(len(b) for b in roster.dump().values())
    return {
        "envoys": n,
        "in_memory_bytes_per_envoy": round(everything, 1),
        "in_memory_bytes_per_envoy_without_id_string": round(shared_ids, 1),
        "encoded_bytes_per_envoy": round(encoded / n, 1),
        "agent_id_chars": len(ids[0]),
        "fingerprint_chars": len(fingerprints[0]),
    }


def time_revocations(loss: float, args: argparse.Namespace) -> list[float]:
    """Seconds from each revocation until every bolt reads the envoy Revoked."""
    rng = random.Random(3)
    sim = Simulation(BOLTS, seed=3, net=net_for(loss, args.latency_ms), tick_s=TICK_S, record=False,
                     persist=False)
    for i in range(2_000):
        sim.admit(sim.names[i % BOLTS], envoy_id(i), fingerprint(rng), not_after=NOT_AFTER)
    if sim.run_until_converged(timeout_s=30.0) is None:
        raise SystemExit("revocation: the admitted roster did not converge")
    pending: dict[str, tuple[float, set[str]]] = {}
    latencies: list[float] = []

    def seen_by(bolt: str) -> None:
        for agent, (t0, missing) in list(pending.items()):
            if bolt in missing and sim.nodes[bolt].status(agent).state is State.REVOKED:
                missing.discard(bolt)
                if not missing:
                    latencies.append(sim.now - t0)
                    del pending[agent]

    def revoke(bolt: str, agent: str) -> None:
        sim.revoke(bolt, agent)
        pending[agent] = (sim.now, set(sim.names) - {bolt})

    sim.on_deliver.append(seen_by)
    start = sim.now
    victims = rng.sample(range(2_000), args.revocations)
    for k, i in enumerate(victims):
        sim.at(start + 0.1 * k + rng.uniform(0, 0.05), revoke, rng.choice(sim.names), envoy_id(i))
    # Background admissions, 20 per second, so revocations share pushes with other deltas.
    for k in range(int(args.revocations * 0.1 * 20)):
        sim.at(start + k / 20, sim.admit, rng.choice(sim.names), envoy_id(10_000 + k), fingerprint(rng))
    sim.run_until(start + 0.1 * args.revocations + 30.0)
    if pending or len(latencies) != args.revocations:
        raise SystemExit(f"revocation: {len(pending)} revocations never reached every bolt")
    return latencies


@section("revocation")
def revocation(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for loss in (0.0, 0.1):
        log(f"revocation: loss {loss:.0%} ...")
        result[f"{loss:.0%}"] = {"loss": loss, "visible_everywhere_s": summary(time_revocations(loss, args))}
    return result


# --- ray_scaling: check-ins/s with 1, 2 and 4 bolts on a simulated Ray cluster ------------------
#
# Not in the default run (``--sections`` must name it): unlike the sections above it needs Ray,
# starts one SimCluster per configuration (2 to 5 raylets), takes about 3-4 minutes and loads
# both cores of this machine, and its figures depend on whatever else runs here. The simulation
# sections stay quick and machine-independent.

#: Resource entries per run report when a check-in carries its results (checkin_load's size).
RAY_RESOURCES = 20
#: Longest wait for the gateway to see every bolt live, and for every bolt's roster to hold
#: every joined envoy, seconds.
RAY_READY_TIMEOUT_S = 120.0


def _ray_helpers() -> Any:
    """The cluster and client helpers, imported only when the section runs (Ray is slow to import
    and the simulation sections need none of it)."""
    here = Path(__file__).resolve().parent
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))  # checkin_load and failover, importable without side effects
    import checkin_load
    import failover

    return checkin_load, failover


async def _closed_loop(envoys: list[Any], facts: Any, window: Any, *, seconds: float, warmup_s: float,
                       timeout_s: float, with_results: bool) -> dict[str, Any]:
    """Every envoy checks in back to back on its own connection (one request in flight each):
    ``checkin``, then (``with_results``) ``results`` with one run report, as an envoy's run does.
    A check-in counts when it completes inside the measured window (after ``warmup_s``); its
    latency runs from sending ``checkin`` to the last answer; errors count over warm-up and
    window. An envoy answered ``overloaded`` or ``unavailable`` rests ``retry_after_s`` as the
    real envoy would; one whose connection fails or times out stops (counted: the rest go on).
    ``window`` (a CpuWindow) measures the CPU of the measured window alone."""
    cl, _ = _ray_helpers()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    start, end = t0 + warmup_s, t0 + warmup_s + seconds
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    stopped = 0

    def refused(stage: str, body: dict[str, Any]) -> float:
        code = body.get("code")
        errors[f"{stage}:{code}"] += 1
        return float(body.get("retry_after_s") or 1.0) if code in ("overloaded", "unavailable") else 0.0

    async def worker(envoy: Any) -> None:
        nonlocal stopped
        while loop.time() < end:
            sent = loop.time()
            rest = 0.0
            try:
                async with asyncio.timeout(timeout_s):
                    kind, body = await envoy.request("checkin", cl.checkin_body(envoy, facts, time.time()))
                    if kind == "error":
                        rest = refused("checkin", body)
                    elif with_results:
                        report = cl.report_body(envoy, facts, time.time())
                        kind, body = await envoy.request("results", {"envoy_id": envoy.envoy_id, "reports": [report]})
                        if kind == "error":
                            rest = refused("results", body)
                        elif report["run_id"] not in body.get("acked", ()):
                            errors["results:not_acked"] += 1
                            kind = "error"
            except TimeoutError:
                errors["timeout"] += 1
                kind = "gone"
            except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError) as exc:
                errors[f"connection:{type(exc).__name__}"] += 1
                kind = "gone"
            if kind == "gone":
                envoy.close()  # a late reply may still come: the stream is at no known frame
                stopped += 1
                return
            done = loop.time()
            if kind != "error" and start <= done <= end:
                latencies.append(done - sent)
            if rest:
                await asyncio.sleep(rest * random.uniform(1.0, 1.5))

    cpu: dict[str, Any] = {}
    timers = [loop.call_at(start, window.start), loop.call_at(end, lambda: cpu.update(window.stop()))]
    live = [e for e in envoys if e.writer is not None]
    tasks = [asyncio.create_task(worker(e)) for e in live]
    _, pending = await asyncio.wait(tasks, timeout=warmup_s + seconds + timeout_s + 5)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for timer in timers:
        timer.cancel()
    if not cpu:  # every envoy stopped before the window ended
        cpu.update(window.stop())
    lat = sorted(latencies)

    def ms(q: float) -> float | None:
        v = cl.percentile(lat, q)
        return None if v is None else round(1000 * v, 1)

    return {"envoys": len(live), "seconds": seconds, "warmup_s": warmup_s, "ok": len(lat),
            "checkins_per_s": round(len(lat) / seconds, 1),
            "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99),
                           "max": round(1000 * lat[-1], 1) if lat else None},
            "errors": dict(errors), "envoys_stopped": stopped, "cpu_pct": cpu}


def _spanner_pids(sim: Any, bolts: list[str]) -> dict[str, int]:
    """Worker PIDs of the bolts, the gateway and this process (the load generator)."""
    import ray

    pids = {"loadgen": os.getpid()}
    for name in bolts:
        pids[name] = int(ray.get(sim.actor(name).ping.remote(), timeout=30)["pid"])
    pids["gateway"] = int(ray.get(sim.actor("gateway-head").__ray_call__.remote(lambda _self: os.getpid()), timeout=30))
    return pids


def _wait_live(sim: Any, bolts: int) -> None:
    sim.wait("every bolt live at the gateway",
             lambda: len(sim.gateway_admin("spanner.status")["gateway_view"]["live"]) == bolts,
             timeout_s=RAY_READY_TIMEOUT_S)


def _wait_admitted(sim: Any, bolts: list[str], envoys: int) -> dict[str, int]:
    """Every bolt's roster holds every joined envoy (they all joined at the token's owner): only
    then can any bolt serve any of them."""
    def admitted() -> dict[str, int] | None:
        infos = sim.gateway_admin("spanner.status")["bolts"]
        counts = {b: int(infos[b].get("admitted") or 0) for b in bolts}
        return counts if min(counts.values()) >= envoys else None

    return sim.wait(f"{envoys} envoys admitted in every bolt's roster", admitted, timeout_s=RAY_READY_TIMEOUT_S)


async def _ray_configuration(sim: Any, hosts: tuple[str, ...], args: argparse.Namespace) -> dict[str, Any]:
    """On a deployed spanner: join the fleet, wait for the rosters, measure the closed loop."""
    cl, fo = _ray_helpers()
    import ray

    from vigo.agent.enrolment import make_envoy_key_and_csr

    bolts = [f"bolt-{h}" for h in hosts]
    gateway = f"127.0.0.1:{sim.port}"
    facts = cl.FleetFacts(gateway, None, 0, cl.base_traits(), cl.make_resources()[:RAY_RESOURCES])
    cl.check_encoder(facts)
    token = (await asyncio.to_thread(sim.gateway_admin, "token.create",
                                     {"uses": args.ray_envoys, "note": "roster ray_scaling"}))["token"]
    key_pem, csr_pem = make_envoy_key_and_csr("bench-envoy")  # one key for every CSR, as checkin_load
    t0 = time.monotonic()
    envoys, join_errors, join_s = await cl.join_all(args.ray_envoys, facts, [token], csr_pem, 16, args.ray_timeout)
    if len(envoys) < args.ray_envoys:
        raise SystemExit(f"ray_scaling, {len(hosts)} bolts: only {len(envoys)} of {args.ray_envoys} envoys joined "
                         f"({join_errors})")
    try:
        connect_errors, _ = await cl.connect_all(envoys, key_pem, gateway, 16, args.ray_timeout)
        connected = sum(1 for e in envoys if e.writer is not None)
        if connected < len(envoys):
            raise SystemExit(f"ray_scaling, {len(hosts)} bolts: only {connected} of {len(envoys)} envoys connected "
                             f"({connect_errors})")
        admitted = await asyncio.to_thread(_wait_admitted, sim, bolts, len(envoys))
        owners = await asyncio.to_thread(lambda: ray.get(sim.actor("gateway-head").owners.remote(
            [e.envoy_id for e in envoys]), timeout=30))
        slices = {b: sum(1 for o in owners.values() if o == b) for b in bolts}
        log(f"ray_scaling:   {len(envoys)} envoys joined in {join_s:.1f} s, connected, in every roster after "
            f"{time.monotonic() - t0:.1f} s; slices {slices}")

        pids = await asyncio.to_thread(_spanner_pids, sim, bolts)
        groups = {"ray": fo.ray_pids(sim, set(pids.values())), "kernel": cl.kernel_thread_pids()}
        window = cl.CpuWindow(pids, groups)
        gw_before = await asyncio.to_thread(fo.gateway_status, sim)
        log(f"ray_scaling:   closed loop: {len(envoys)} envoys, {args.ray_warmup:g} s warm-up + {args.ray_seconds:g} s ...")
        res = await _closed_loop(envoys, facts, window, seconds=args.ray_seconds, warmup_s=args.ray_warmup,
                                 timeout_s=args.ray_timeout, with_results=not args.ray_checkin_only)
        gw_after = await asyncio.to_thread(fo.gateway_status, sim)
    finally:
        for e in envoys:
            e.close()
    if gw_before and gw_after:
        batches = gw_after["batches"] - gw_before["batches"]
        items = gw_after["mean_batch"] * gw_after["batches"] - gw_before["mean_batch"] * gw_before["batches"]
        res["gateway"] = {"batches": batches, "mean_batch": round(items / batches, 1) if batches else None,
                          "batches_per_s": round(batches / (args.ray_warmup + args.ray_seconds), 1),
                          "overloaded": gw_after["overloaded"] - gw_before["overloaded"]}
    # Check-ins per CPU-second of this cluster's own processes (and the load generator): less
    # sensitive than check-ins/s to whatever else the machine runs meanwhile.
    ours = sum(v or 0.0 for k, v in res["cpu_pct"].items() if k not in ("machine", "other", "irq"))
    res["checkins_per_cpu_s"] = round(res["checkins_per_s"] / (ours / 100), 1) if ours else None
    res.update(bolts=len(hosts), slices=slices, admitted=admitted, join_s=round(join_s, 1), join_errors=join_errors)
    log(f"ray_scaling:   {res['checkins_per_s']} check-ins/s, p50 {res['latency_ms']['p50']} ms, "
        f"p99 {res['latency_ms']['p99']} ms, errors {res['errors'] or 'none'}, CPU {res['cpu_pct']}")
    return res


@section("ray_scaling", default=False)
def ray_scaling(args: argparse.Namespace) -> dict[str, Any]:
    import shutil
    import tempfile

    _ray_helpers()  # puts benchmarks/ on the path; the repo root already is (tests.raycluster)
    from tests.raycluster import SimCluster

    work = Path(tempfile.mkdtemp(prefix="vigo-roster-ray-", dir="/tmp"))
    configs: list[dict[str, Any]] = []
    try:
        for n in args.ray_bolts:
            hosts = tuple("abcdefgh"[:n])
            log(f"ray_scaling: {n} bolt(s) on hosts {', '.join(hosts)}, control and gateway on the head ...")
            t0 = time.monotonic()
            loadavg = [round(x, 2) for x in os.getloadavg()]
            sim = SimCluster(work / f"bolts{n}", hosts=hosts)
            try:
                sim.start()
                cfg = sim.config()
                cfg.spanner.bolts = list(hosts)
                sim.deploy_spanner(cfg)
                _wait_live(sim, n)
                log(f"ray_scaling:   cluster up and spanner deployed in {time.monotonic() - t0:.1f} s")
                res = asyncio.run(_ray_configuration(sim, hosts, args))
            finally:
                log(f"ray_scaling:   shutting the cluster down ({n} bolts)")
                sim.shutdown()
            # "seconds" is the measured window; this is the configuration's whole time, cluster included.
            res.update(loadavg_at_start=loadavg, total_s=round(time.monotonic() - t0, 1))
            configs.append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Against the first configuration (1 bolt by default): "2/1" is 2 bolts over 1 bolt.
    base = configs[0]
    ratios = {f"{c['bolts']}/{base['bolts']}": round(c["checkins_per_s"] / base["checkins_per_s"], 3)
              for c in configs[1:] if base["checkins_per_s"]}
    return {
        "envoys": args.ray_envoys,
        "check_in": "checkin" if args.ray_checkin_only else f"checkin + results (one run report of {RAY_RESOURCES} resources)",
        "seconds": args.ray_seconds, "warmup_s": args.ray_warmup,
        "cluster": "tests.raycluster.SimCluster: a head (control, gateway) and one raylet per bolt host, all on "
                   "this machine; no stack pushed (check-ins carry no bundle)",
        "configurations": configs,
        "scaling_ratio": ratios,
        "note": f"every process (Ray, bolts, gateway, load generator) shares this machine's {os.cpu_count()} cores "
                "and one disk, and all traffic goes through one gateway: scaling is bounded by them; cpu_pct "
                "shows where the limit is",
    }


# --- report --------------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


def print_report(out: dict[str, Any]) -> None:
    m = out["machine"]
    t = out["time_model"]
    print(f"machine: {m['cpus']} cpus, Python {m['python']}, vigo {m['vigo']}")
    print(f"time model: latency {t['latency_ms']} ms one-way (+0-10 ms jitter, +0-100 ms and 5% dup with loss), "
          f"bolt loop {t['tick_ms']} ms, push {t['push_interval_ms']} ms (revocations at once), "
          f"retransmit {t['retransmit_ms']} ms, digest {t['digest_interval_ms']} ms\n")
    s = out["sections"]
    if "convergence" in s:
        print(f"convergence: {OPS:,} operations ({OPS // REVOKE_EVERY:,} revocations) over {OPS_SPAN_S:g} s, {BOLTS} bolts")
        print(f"  {'loss':>5}  {'converged after last op (virtual)':36}  {'simulation wall':22}  target")
        for key, fig in s["convergence"].items():
            c, w = fig["converged_s"], fig["wall_s"]
            target = TARGETS.get(f"converged_s@{key}")
            mark = f"<= {target:g} s {verdict(c['max'], target)}" if target else ""
            print(f"  {key:>5}  median {c['median']:6.3f} s, max {c['max']:6.3f} s (n={c['n']})   "
                  f"median {w['median']:6.2f} s          {mark}")
        print()
    if "bytes" in s:
        b = s["bytes"]
        d, f = b["delta_protocol"], b["full_state_protocol"]
        print("bytes:")
        print(f"  one admission delta            {b['admission_delta_bytes']:6} B   (re-admission {b['readmission_delta_bytes']} B, "
              f"revocation {b['revocation_delta_bytes']} B)   target <= 200 B {verdict(b['admission_delta_bytes'], 200)}")
        kinds = ", ".join(f"{k} {v / OPS:.0f}" for k, v in sorted(d["by_kind"].items()))
        print(f"  delta protocol, per operation  {d['bytes_per_operation']:8.1f} B   ({kinds})")
        print(f"  full-state baseline, per op    {f['bytes_per_operation']:8.1f} B   "
              f"-> full state / delta = {b['full_over_delta']:.1f}x")
        ratio = d["push_bytes_per_delta_byte_per_peer"]
        print(f"  push bytes / (delta bytes x {BOLTS - 1} peers) {ratio:6.3f}       target <= 1.2 {verdict(ratio, 1.2)}")
        print()
    if "memory" in s:
        mem = s["memory"]
        print(f"memory ({mem['envoys']:,} admitted envoys, ids of {mem['agent_id_chars']} chars, "
              f"fingerprints of {mem['fingerprint_chars']} hex digits):")
        print(f"  in memory (tracemalloc), all the roster holds   {mem['in_memory_bytes_per_envoy']:6.1f} B/envoy   "
              f"target <= 100 B {verdict(mem['in_memory_bytes_per_envoy'], 100)}")
        print(f"  in memory, agent id string shared with caller   {mem['in_memory_bytes_per_envoy_without_id_string']:6.1f} B/envoy")
        print(f"  encoded (persisted, full-shard sync)            {mem['encoded_bytes_per_envoy']:6.1f} B/envoy   "
              f"{'(<= 100 B)' if mem['encoded_bytes_per_envoy'] <= 100 else '(> 100 B)'}")
        print()
    if "revocation" in s:
        print("revocation visible at every bolt:")
        for key, fig in s["revocation"].items():
            v = fig["visible_everywhere_s"]
            target = TARGETS[f"revocation_visible_p99_s@{key}"]
            print(f"  loss {key:>4}: median {v['median'] * 1000:7.1f} ms, p99 {v['p99'] * 1000:7.1f} ms, "
                  f"max {v['max'] * 1000:7.1f} ms (n={v['n']})   target p99 <= {target * 1000:g} ms "
                  f"{verdict(v['p99'], target)}")
        print()
    if "ray_scaling" in s:
        print_ray_scaling(s["ray_scaling"], m["cpus"])
    for name in s:
        if name not in ("convergence", "bytes", "memory", "revocation", "ray_scaling"):
            print(f"{name}: {json.dumps(s[name], indent=2)}")


def print_ray_scaling(r: dict[str, Any], cpus: int) -> None:
    print(f"ray_scaling: spanner on a simulated Ray cluster (head: control + gateway; one raylet per bolt), "
          f"{r['envoys']} envoys in a closed loop (one check-in in flight each), check-in = {r['check_in']}, "
          f"{r['warmup_s']:g} s warm-up + {r['seconds']:g} s measured per configuration")

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:g}"

    header = (f"  {'bolts':>5} {'check-ins/s':>11} {'vs first':>8} {'per CPU-s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
              f"{'batch':>5} | {'bolts CPU% (each)':<28} {'gateway':>7} {'loadgen':>7} {'ray':>5} {'krn+irq':>7} "
              f"{'other':>5} {'machine':>7}")
    print(header)
    first = r["configurations"][0]["checkins_per_s"] if r["configurations"] else None
    for c in r["configurations"]:
        cpu = collections.defaultdict(lambda: None, c["cpu_pct"])
        each = [cpu.get(f"bolt-{h}") or 0.0 for h in "abcdefgh"[:c["bolts"]]]
        bolts = f"{sum(each):.0f} ({'/'.join(f'{v:.0f}' for v in each)})"
        ratio = f"{c['checkins_per_s'] / first:.2f}x" if first else "-"
        print(f"  {c['bolts']:>5} {c['checkins_per_s']:>11.1f} {ratio:>8} {f(c['checkins_per_cpu_s']):>9} "
              f"{f(c['latency_ms']['p50']):>7} "
              f"{f(c['latency_ms']['p99']):>7} {sum(c['errors'].values()):>6} "
              f"{f(c.get('gateway', {}).get('mean_batch')):>5} | {bolts:<28} {f(cpu['gateway']):>7} "
              f"{f(cpu['loadgen']):>7} {f(cpu['ray']):>5} {f((cpu.get('kernel') or 0) + (cpu.get('irq') or 0)):>7} "
              f"{f(cpu['other']):>5} {f(cpu['machine']):>7}")
    ratios = ", ".join(f"{k} bolts {v:.2f}x" for k, v in r["scaling_ratio"].items())
    print(f"  scaling ratio (check-ins/s against the first configuration): {ratios or '-'}")
    for c in r["configurations"]:
        if c["errors"]:
            print(f"  errors with {c['bolts']} bolt(s): {c['errors']}")
    for c in r["configurations"]:
        print(f"  {c['bolts']} bolt(s): envoys per bolt {c['slices']}, load average at start {c['loadavg_at_start']}")
    print(f"  (CPU% of one core over the measured window, machine max {100 * cpus}%: 'ray' = this cluster's GCS, "
          f"raylets, agents and control; 'krn+irq' = kernel threads and irq/softirq (loopback TCP); 'other' = "
          f"everything else on the machine; 'per CPU-s' = check-ins per CPU-second of this cluster's processes and "
          f"the load generator (all columns but 'other'); 'batch' = mean envoy requests per gateway batch; errors "
          f"over warm-up and window. Every process shares these {cpus} cores and one disk, and all traffic goes "
          f"through one gateway, so the ratios show what this machine allows, not what more hosts would give: "
          f"where the gateway or the machine is saturated, more bolts cannot help.)")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated, from: {', '.join(SECTIONS)} (default: {', '.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--seeds", type=int, default=3, help="runs per loss level in 'convergence' (default 3)")
    parser.add_argument("--losses", default="0,0.1,0.3", help="loss levels for 'convergence' (default 0,0.1,0.3)")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="one-way message latency (default 5)")
    parser.add_argument("--memory-envoys", type=int, default=100_000, help="envoys in 'memory' (default 100000)")
    parser.add_argument("--revocations", type=int, default=500, help="revocations timed in 'revocation' (default 500)")
    parser.add_argument("--ray-bolts", default="1,2,4", help="bolt counts compared in 'ray_scaling', the first "
                        "one the baseline of the ratios (default 1,2,4)")
    parser.add_argument("--ray-envoys", type=int, default=200, help="envoys (= concurrency) in 'ray_scaling' (default 200)")
    parser.add_argument("--ray-seconds", type=float, default=15.0, help="measured seconds per configuration (default 15)")
    parser.add_argument("--ray-warmup", type=float, default=3.0, help="unmeasured seconds of load first (default 3)")
    parser.add_argument("--ray-timeout", type=float, default=30.0, help="seconds for one join, connect or check-in")
    parser.add_argument("--ray-checkin-only", action="store_true",
                        help="a check-in is one 'checkin' message (default: checkin + results, as checkin_load)")
    args = parser.parse_args(argv)
    args.losses = [float(x) for x in args.losses.split(",")]
    args.ray_bolts = [int(x) for x in args.ray_bolts.split(",")]
    if not args.ray_bolts or min(args.ray_bolts) < 1 or max(args.ray_bolts) > 8 or args.ray_envoys < 1:
        parser.error("--ray-bolts wants 1 to 8 bolts per configuration and --ray-envoys at least 1")
    wanted = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; expected some of {list(SECTIONS)}")

    sync = SyncConfig.default()
    out: dict[str, Any] = {
        "benchmark": "roster",
        "machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                    "vigo": vigo.__version__},
        "time_model": {"latency_ms": args.latency_ms, "tick_ms": TICK_S * 1000,
                       "push_interval_ms": sync.delta_interval_s * 1000, "retransmit_ms": sync.retransmit_s * 1000,
                       "digest_interval_ms": sync.digest_interval_s * 1000},
        "targets": TARGETS,
        "sections": {},
    }
    for name in wanted:
        started = time.perf_counter()
        out["sections"][name] = SECTIONS[name](args)
        log(f"{name}: done in {time.perf_counter() - started:.1f} s")
    out["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(out, indent=2) + "\n")
    print_report(out)
    print(f"written {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
