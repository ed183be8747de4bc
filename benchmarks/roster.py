"""How fast and how cheaply the spanner admissions roster replicates between bolts.

Everything here runs the real roster code (``vigo.roster``) inside the seeded virtual-time
network of ``vigo.roster.sim``; no Ray. Its time model, printed with the results:

* one-way message latency ``--latency-ms`` (default 5 ms) plus a uniform extra delay (0-10 ms
  without loss, 0-100 ms with loss, which reorders messages), 5% duplication with loss;
* every bolt runs its loop every 50 ms; deltas are pushed every 250 ms (``SyncConfig``), a
  revocation at once; unacknowledged pushes are resent after 1 s; digests every 2 s;
* message processing takes no virtual time. "Wall" figures are the CPU time of simulating all
  five bolts in this one process, an upper bound on the protocol's own cost.

Sections (``--sections``, default all), each a function registered in ``SECTIONS``:

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

Targets come from the issue and notes/roster-crdt.md; a missed one is printed as MISSED. The
exit code says whether the benchmark ran and its results were correct, not whether targets
were met. Writes ``benchmarks/results/roster.json``.

    .venv/bin/python benchmarks/roster.py [--sections convergence,bytes,memory,revocation]
                                          [--seeds 3] [--memory-envoys 100000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
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


def section(name: str) -> Callable[[Callable[[argparse.Namespace], dict[str, Any]]], Callable[[argparse.Namespace], dict[str, Any]]]:
    def register(fn: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace], dict[str, Any]]:
        SECTIONS[name] = fn
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
    for name in s:
        if name not in ("convergence", "bytes", "memory", "revocation"):
            print(f"{name}: {json.dumps(s[name], indent=2)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per loss level in 'convergence' (default 3)")
    parser.add_argument("--losses", default="0,0.1,0.3", help="loss levels for 'convergence' (default 0,0.1,0.3)")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="one-way message latency (default 5)")
    parser.add_argument("--memory-envoys", type=int, default=100_000, help="envoys in 'memory' (default 100000)")
    parser.add_argument("--revocations", type=int, default=500, help="revocations timed in 'revocation' (default 500)")
    args = parser.parse_args(argv)
    args.losses = [float(x) for x in args.losses.split(",")]
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
