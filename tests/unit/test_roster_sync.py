"""Roster replication: an oracle over arbitrary delivery (notes L2), seeded network simulations
(L3), and the protocol's bookkeeping (acks, trimming, readiness, incarnations, bad messages)."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vigo.errors import ConfigError, RosterFormatError, RosterRefusedError
from vigo.roster import (
    SHARDS,
    ReplicaId,
    Roster,
    ShardState,
    Snapshot,
    State,
    SyncConfig,
    decode,
    decode_message,
    encode,
    joined,
    shard_of,
)
from vigo.roster.crdt import dot_counter, dot_replica
from vigo.roster.messages import MESSAGE_VERSION
from vigo.roster.sim import WALL_EPOCH_S, NetConfig, Simulation
from vigo.roster.sync import Replica

AGENTS = ["agent-0", "agent-764", "agent-869"]  # one shard, so contexts interact
FPS = ["a" * 64, "b" * 64]

# --- L2: the happens-before oracle ------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One mutation, as the oracle sees it."""

    kind: str
    agent: str
    fingerprint: str | None
    #: Token events that survived at the origin when it ran (what it supersedes).
    observed: frozenset[int]
    #: Every event that happened before it (transitively: what its origin had seen).
    past: frozenset[int]
    dot: tuple[ReplicaId, int] | None
    delta: bytes


class RosterOracle(RuleBasedStateMachine):
    """Three replicas, mutations, and deltas delivered in any subset, order and multiplicity,
    full syncs and crashes (restart from the saved roster or from nothing, new incarnation).

    The oracle keeps per replica the set of events it has seen and derives the status from it
    alone: an event's token survives unless a seen event observed it; then no token -> Unknown,
    a revoke -> Revoked, admits of one fingerprint -> Admitted, else Conflict."""

    def __init__(self) -> None:
        super().__init__()
        self.rosters: list[Roster] = []
        self.seen: list[set[int]] = []
        self.events: list[Event] = []
        self.dots: set[tuple[ReplicaId, int]] = set()

    @initialize()
    def start(self) -> None:
        self.rosters = [Roster(ReplicaId.fresh(f"r{i}")) for i in range(3)]
        self.seen = [set() for _ in range(3)]

    # -- the oracle -----------------------------------------------------------------------------

    def survivors(self, seen: set[int], agent: str) -> set[int]:
        mine = [e for e in seen if self.events[e].agent == agent]
        return {
            e for e in mine
            if self.events[e].kind != "forget" and not any(e in self.events[y].observed for y in mine)
        }

    def oracle_status(self, seen: set[int], agent: str) -> tuple[State, tuple[str, ...]]:
        alive = [self.events[e] for e in self.survivors(seen, agent)]
        fingerprints = tuple(sorted({e.fingerprint for e in alive if e.kind == "admit"}))
        if not alive:
            return State.UNKNOWN, ()
        if any(e.kind == "revoke" for e in alive):
            return State.REVOKED, fingerprints
        return (State.ADMITTED if len(fingerprints) == 1 else State.CONFLICT), fingerprints

    # -- rules ----------------------------------------------------------------------------------

    def mutate(self, r: int, kind: str, agent: str, fingerprint: str | None) -> None:
        roster = self.rosters[r]
        observed = frozenset(self.survivors(self.seen[r], agent))
        past = frozenset(self.seen[r]).union(*(self.events[e].past for e in self.seen[r]))
        if kind == "admit":
            delta = roster.admit(agent, fingerprint)
        elif kind == "revoke":
            delta = roster.revoke(agent)
        else:
            delta = roster.forget(agent)
        token = delta.entries.get(agent)
        dot = None if token is None else (dot_replica(token.dot), dot_counter(token.dot))
        if dot is not None:
            assert dot not in self.dots, f"dot {dot} issued twice"
            self.dots.add(dot)
        self.events.append(Event(kind, agent, fingerprint, observed, past, dot, encode(delta)))
        self.seen[r].add(len(self.events) - 1)

    @rule(r=st.integers(0, 2), agent=st.sampled_from(AGENTS), fp=st.sampled_from(FPS))
    def admit(self, r: int, agent: str, fp: str) -> None:
        self.mutate(r, "admit", agent, fp)

    @rule(r=st.integers(0, 2), agent=st.sampled_from(AGENTS))
    def revoke(self, r: int, agent: str) -> None:
        self.mutate(r, "revoke", agent, None)

    @rule(r=st.integers(0, 2), agent=st.sampled_from(AGENTS))
    def forget(self, r: int, agent: str) -> None:
        if self.oracle_status(self.seen[r], agent)[0] is State.REVOKED:
            with pytest.raises(RosterRefusedError):
                self.rosters[r].forget(agent)
        else:
            self.mutate(r, "forget", agent, None)

    @rule(r=st.integers(0, 2), pick=st.integers(0, 10**6))
    def deliver(self, r: int, pick: int) -> None:
        """Any delta to any replica, again and again, in any order (the bytes, as sent)."""
        if self.events:
            e = pick % len(self.events)
            self.rosters[r].join(decode(self.events[e].delta))
            self.seen[r].add(e)

    @rule(src=st.integers(0, 2), dst=st.integers(0, 2))
    def full_sync(self, src: int, dst: int) -> None:
        for data in self.rosters[src].dump().values():
            self.rosters[dst].join(decode(data))
        self.seen[dst] |= self.seen[src]

    @rule(r=st.integers(0, 2), wipe=st.booleans())
    def crash(self, r: int, wipe: bool) -> None:
        """Restart with a new incarnation, from the saved roster or from nothing. Deltas it sent
        before are still in flight (the event pool)."""
        fresh = ReplicaId.fresh(f"r{r}")
        if wipe:
            self.rosters[r] = Roster(fresh)
            self.seen[r] = set()
        else:
            self.rosters[r] = Roster.load(fresh, self.rosters[r].dump())

    # -- checks ---------------------------------------------------------------------------------

    def check_replica(self, roster: Roster, seen: set[int]) -> None:
        for agent in AGENTS:
            status = roster.status(agent)
            assert (status.state, status.fingerprints) == self.oracle_status(seen, agent), agent
            # Exactly the oracle's surviving tokens, not merely the same verdict.
            dots = {(t.replica, t.counter) for t in status.tokens}
            assert dots == {self.events[e].dot for e in self.survivors(seen, agent)}
            if status.state is State.ADMITTED:
                # Admitted only if every seen revoke happened before some seen admit.
                for rev in (e for e in seen if self.events[e].kind == "revoke" and self.events[e].agent == agent):
                    assert any(
                        rev in self.events[a].past
                        for a in seen
                        if self.events[a].kind == "admit" and self.events[a].agent == agent
                    ), f"{agent} admitted over an unanswered revoke"

    @invariant()
    def every_replica_matches_the_oracle(self) -> None:
        for roster, seen in zip(self.rosters, self.seen, strict=True):
            self.check_replica(roster, seen)

    def teardown(self) -> None:
        if not self.rosters:
            return
        everything = set(range(len(self.events)))
        order = list(everything)
        random.Random(len(order)).shuffle(order)
        for roster in self.rosters:
            for e in order:
                roster.join(decode(self.events[e].delta))
        first = self.rosters[0]
        for roster in self.rosters:
            assert roster.digests() == first.digests()
            self.check_replica(roster, everything)


RosterOracle.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_replicas_match_the_happens_before_oracle = RosterOracle.TestCase


# --- L3: seeded simulations ----------------------------------------------------------------------------


def _op(sim: Simulation, kind: str, bolt: str, agent: str, fp: str) -> None:
    if bolt not in sim.nodes:
        return  # crashed: the operator's request found no bolt
    if kind == "admit":
        sim.admit(bolt, agent, fp)
    elif kind == "revoke":
        sim.revoke(bolt, agent)
    else:
        sim.forget(bolt, agent)


def _restart(sim: Simulation, bolt: str, snapshot: str) -> None:
    if bolt not in sim.nodes:
        sim.restart(bolt, snapshot=snapshot)


def run_schedule(seed: int, loss: float, *, restart_from: str = "saved", ops: int = 250,
                 duration_s: float = 3.0, sync: SyncConfig | None = None) -> Simulation:
    """A random schedule over 5 bolts: mutations of 40 agents, 5% duplication, up to 200 ms of
    reordering, two partitions of 0.5-2 s and two crash/restarts, then a healed network.
    Revocation safety is checked every 100 ms of virtual time along the way."""
    rng = random.Random(seed)
    sim = Simulation(5, seed=seed, sync=sync,
                     net=NetConfig(loss=loss, duplicate=0.05, reorder_s=rng.uniform(0, 0.2)))
    agents = [f"host-{i}" for i in range(40)]
    for _ in range(ops):
        kind = rng.choices(["admit", "revoke", "forget"], [6, 3, 1])[0]
        sim.at(rng.uniform(0, duration_s), _op, sim, kind, rng.choice(sim.names), rng.choice(agents),
               rng.choice(FPS))
    for _ in range(2):
        start, length = rng.uniform(0, duration_s), rng.uniform(0.5, 2.0)
        cut = rng.sample(sim.names, rng.randint(1, 2))
        sim.at(start, sim.partition, cut)
        sim.at(start + length, sim.heal)
    for _ in range(2):
        bolt, start = rng.choice(sim.names), rng.uniform(0, duration_s)
        sim.at(start, lambda b=bolt: sim.crash(b) if b in sim.nodes else None)
        sim.at(start + rng.uniform(0.2, 1.5), _restart, sim, bolt, restart_from)

    violations: list[str] = []

    def check() -> None:
        violations.extend(sim.safety_violations())
        if sim.now < duration_s + 2:
            sim.at(sim.now + 0.1, check)

    sim.at(0.05, check)
    sim.run_until(duration_s + 2.0)
    sim.heal()
    for bolt in sim.names:
        _restart(sim, bolt, restart_from)
    took = sim.run_until_converged(timeout_s=60.0)
    assert took is not None, f"seed {seed} loss {loss}: not converged after 60 s: {sim.up()}"
    assert violations == []
    assert sim.safety_violations() == []
    return sim


def reference(sim: Simulation) -> list[ShardState]:
    """The join of every delta any bolt ever made: what full-state sync ends in."""
    by_shard: dict[int, list[ShardState]] = {}
    for op in sim.ops:
        by_shard.setdefault(op.delta.shard, []).append(op.delta)
    return [joined(ShardState(i), *by_shard.get(i, [])) for i in range(SHARDS)]


@pytest.mark.parametrize("loss", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("seed", [1, 2])
def test_delta_sync_and_full_state_sync_end_in_the_same_roster(seed, loss):
    sim = run_schedule(seed, loss)
    expected = reference(sim)
    for name in sim.names:
        assert sim.nodes[name].roster.shards == expected, name

    # The same deltas, made at the same times by the same bolts, replicated by shipping whole
    # rosters over the same lossy network.
    full = Simulation(sim.names, seed=seed, protocol="full",
                      net=NetConfig(loss=loss, duplicate=0.05, reorder_s=0.1), record=False)
    for op in sim.ops:
        full.at(op.at, full.inject, op.bolt, op.delta)
    full.run_until(5.0)
    assert full.run_until_converged(timeout_s=30.0) is not None
    for name in full.names:
        assert full.nodes[name].roster.shards == expected, name
    # The dots of every token ever made are distinct within their shard (counters are per
    # incarnation and shard): no restarted bolt reissued one.
    dots = [(op.delta.shard, op.dot) for op in sim.ops if op.dot is not None]
    assert len(dots) == len(set(dots))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32), loss=st.sampled_from([0.0, 0.05, 0.2, 0.3]))
def test_revocation_safety_holds_in_random_schedules(seed, loss):
    run_schedule(seed, loss, ops=150, duration_s=2.0)


def test_bolts_restarted_empty_pull_the_roster_before_they_are_ready():
    sim = run_schedule(7, 0.1, restart_from="none")
    # Convergence included readiness; the restarted ones hold what the others hold.
    assert sim.converged()
    sim.crash("bolt2")
    replica = sim.restart("bolt2", snapshot="none")
    assert not replica.ready and len(replica.roster) == 0
    sim.run_for(0.2)
    assert replica.ready and replica.roster == sim.nodes["bolt0"].roster


def test_a_snapshot_past_the_horizon_is_discarded_and_the_bolt_pulls():
    sim = Simulation(3, seed=3)
    for i in range(30):
        sim.admit("bolt0", f"host-{i}", FPS[0])
    sim.run_for(1.0)
    sim.crash("bolt1")
    replica = sim.restart("bolt1", snapshot="stale")
    assert replica.snapshot_discarded_age_s is not None
    assert replica.snapshot_discarded_age_s > sim.sync.horizon_s
    assert not replica.ready and len(replica.roster) == 0
    sim.run_for(0.2)
    assert replica.ready and len(replica.roster) == 30


def test_a_fresh_snapshot_is_ready_at_once_and_catches_up_from_digests():
    sim = Simulation(3, seed=4)
    for i in range(20):
        sim.admit("bolt0", f"host-{i}", FPS[0])
    sim.run_for(1.0)
    sim.crash("bolt1")
    for i in range(20, 30):
        sim.admit("bolt0", f"host-{i}", FPS[0])
    sim.run_for(1.0)
    replica = sim.restart("bolt1")
    assert replica.ready and len(replica.roster) == 20
    assert sim.run_until_converged(timeout_s=5.0) is not None
    assert len(replica.roster) == 30


def test_a_cold_cluster_becomes_ready_in_one_round_trip():
    sim = Simulation(4, seed=5)
    assert not any(n.ready for n in sim.nodes.values())
    sim.run_for(0.2)
    assert all(n.ready for n in sim.nodes.values())


def test_an_empty_replica_waits_to_be_told_its_peers_before_it_is_ready():
    replica = Replica("a", now=lambda: 0.0)
    assert replica.tick() == [] and not replica.ready
    replica.set_peers([])  # told: nobody else is alive, so its empty roster is the roster
    replica.tick()
    assert replica.ready


def test_a_revocation_reaches_every_bolt_within_one_round_trip():
    sim = Simulation(5, seed=6)
    sim.run_for(0.5)
    sim.admit("bolt0", "host", FPS[0])
    sim.run_for(0.5)
    sim.revoke("bolt3", "host")
    sim.run_for(0.03)  # 5 ms latency, no loss: the push left at once, no interval wait
    assert all(n.status("host").state is State.REVOKED for n in sim.nodes.values())


def test_a_long_partition_stops_holding_back_the_log_and_heals_from_digests():
    sync = SyncConfig(peer_silence_s=2.0)
    sim = Simulation(3, seed=8, sync=sync)
    sim.run_for(0.5)
    sim.partition(["bolt2"])
    for i in range(40):
        sim.admit("bolt0", f"host-{i}", FPS[0])
    sim.run_for(1.0)
    bolt0 = sim.nodes["bolt0"]
    assert bolt0.stats()["log_entries"] == 40  # bolt2 has acked nothing yet
    sim.run_for(3.0)
    assert bolt0.stats()["log_entries"] == 0  # bolt2 silent past peer_silence_s
    assert bolt0.stats()["peers"]["bolt2"]["backlog"] == 40
    sim.heal()
    assert sim.run_until_converged(timeout_s=10.0) is not None
    sim.run_for(3.0)  # the digest exchange also brings bolt2's acks up to date
    assert bolt0.stats()["peers"]["bolt2"]["backlog"] == 0


def test_writes_report_which_peers_hold_them():
    sim = Simulation(3, seed=9)
    sim.run_for(0.3)
    write = sim.nodes["bolt0"].admit("host", FPS[0])
    assert sim.nodes["bolt0"].acked_by(write.seq) == []
    sim.run_for(0.5)
    assert sim.nodes["bolt0"].acked_by(write.seq) == ["bolt1", "bolt2"]


def test_a_big_interval_is_sent_as_the_full_shard():
    sync = SyncConfig(max_delta_agents=2)
    a = Replica("a", now=lambda: 0.0, config=sync)
    same = [x for x in (f"agent-{i}" for i in range(3000)) if shard_of(x) == shard_of("agent-0")][:4]
    for agent in same:
        a.admit(agent, FPS[0])
    a.set_peers(["b"])
    [push] = a.outgoing("b")
    msg = decode_message(push)
    assert msg.kind == "push" and (msg.lo, msg.hi) == (0, 4)
    assert msg.states == [a.roster.shards[shard_of("agent-0")]]


def test_a_push_too_big_for_one_message_becomes_a_digest():
    sync = SyncConfig(max_message_bytes=64 * 1024)
    a = Replica("a", now=lambda: 0.0, config=sync)
    for i in range(1500):
        a.admit(f"host-{i}", FPS[0])
    a.set_peers(["b"])
    [message] = a.outgoing("b")
    assert decode_message(message).kind == "digest"


def _pair(**kw):
    clock = [0.0]
    a = Replica("a", now=lambda: clock[0], wall=lambda: WALL_EPOCH_S + clock[0], **kw)
    b = Replica("b", now=lambda: clock[0], wall=lambda: WALL_EPOCH_S + clock[0], **kw)
    a.set_peers(["b"])
    b.set_peers(["a"])
    return clock, a, b


def _exchange(a: Replica, b: Replica, out: list, drop=lambda msg: False) -> None:
    """Deliver messages (and their answers) between two replicas until none are left."""
    queue = list(out)
    while queue:
        to, data = queue.pop(0)
        if drop(data):
            continue
        queue += (b if to == "b" else a).receive(data)


def test_a_gap_is_not_acked_until_the_lost_push_is_resent():
    clock, a, b = _pair()
    _exchange(a, b, a.tick() + b.tick())  # both ready (cold start)
    a.admit("host-1", FPS[0])
    lost = a.outgoing("b")  # dropped on the floor
    assert [decode_message(m).kind for m in lost] == ["push"]
    a.admit("host-2", FPS[0])
    clock[0] = 0.3
    _exchange(a, b, a.tick())
    assert b.status("host-2").admitted and not b.status("host-1").admitted
    assert a.stats()["peers"]["b"]["backlog"] == 2  # the ack stops before the gap
    clock[0] = 1.5  # the oldest unacked push is now older than retransmit_s
    _exchange(a, b, a.tick(), drop=lambda m: decode_message(m).kind == "digest")
    assert b.status("host-1").admitted
    assert a.stats()["peers"]["b"]["backlog"] == 0
    assert a.stats()["log_entries"] == 0  # trimmed once the only peer acked


def test_messages_from_a_retired_incarnation_are_joined_but_not_counted():
    clock, a, b = _pair()
    _exchange(a, b, a.tick() + b.tick())
    a.admit("host-1", FPS[0])
    old_b = b
    old_ack = old_b.receive(a.outgoing("b")[0])  # the old b acks seq 1 ...
    new_b = Replica("b", now=lambda: clock[0], config=SyncConfig())
    new_b.set_peers(["a"])
    a.receive(new_b.digest_message())  # ... but a hears from the restarted b first
    assert a.stats()["peers"]["b"]["incarnation"] == new_b.replica.incarnation.hex()
    for _, data in old_ack:
        a.receive(data)  # late ack of the dead incarnation: ignored
    assert a.stats()["peers"]["b"]["acked"] == 0


def test_bad_messages_raise_a_roster_format_error_and_are_counted():
    _, a, _ = _pair()
    for junk, text in [
        (b"", "expected bytes"),
        (b"\x07abc", "expected version 1, got 7"),
        (bytes((MESSAGE_VERSION,)) + b"\xc1", "not valid msgpack"),
        (bytes((MESSAGE_VERSION,)) + msgpack.packb({"t": "gossip"}), "expected a map with t in"),
        (bytes((MESSAGE_VERSION,)) + msgpack.packb({"t": "ack", "f": ["b", b"x" * 16], "u": 1, "o": b"short"}),
         "16-byte incarnation"),
        (bytes((MESSAGE_VERSION,)) + msgpack.packb({"t": "push", "f": ["b", b"x" * 16], "lo": 3, "hi": 3, "r": [], "s": []}),
         "expected lo < hi"),
        (bytes((MESSAGE_VERSION,)) + msgpack.packb({"t": "digest", "f": ["b", b"x" * 16], "q": 0, "d": b"x"}),
         "expected d as 4096 bytes"),
    ]:
        with pytest.raises(RosterFormatError, match=text):
            a.receive(junk)
    assert a.stats()["counters"]["rejected"] == 7


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_junk_messages_never_raise_anything_else(data):
    replica = Replica("a", now=lambda: 0.0)
    with contextlib.suppress(RosterFormatError):
        replica.receive(data)


def test_stats_report_size_backlog_and_digest_agreement():
    sim = Simulation(3, seed=10)
    for i in range(10):
        sim.admit("bolt0", f"host-{i}", FPS[0])
    sim.revoke("bolt1", "host-3")
    sim.run_for(5.0)
    bolt0 = sim.nodes["bolt0"]
    for name in ("bolt1", "bolt2"):
        # Digests go to one random peer at a time: make sure bolt0 has a current one of each.
        bolt0.receive(sim.nodes[name].digest_message())
    stats = bolt0.stats()
    assert stats["ready"] and stats["agents"] == 10
    assert stats["states"] == {"admitted": 9, "revoked": 1, "conflict": 0}
    assert {p["backlog"] for p in stats["peers"].values()} == {0}
    assert stats["digest_agreement"] == 1.0
    assert stats["peers"]["bolt1"]["differing_shards"] == []
    assert stats["counters"]["sent.push"] >= 2


def test_snapshots_round_trip_through_a_new_incarnation():
    _, a, _ = _pair()
    a.admit("host-1", FPS[0])
    a.revoke("host-2")
    snap = a.snapshot()
    b = Replica("a", now=lambda: 0.0, wall=lambda: snap.saved_at + 60, snapshot=snap)
    assert b.replica != a.replica and b.ready
    assert b.roster == a.roster
    junk = Snapshot(snap.saved_at, {0: b"\x01\x90"})
    with pytest.raises(RosterFormatError):
        Replica("a", now=lambda: 0.0, wall=lambda: snap.saved_at, snapshot=junk)


@pytest.mark.parametrize("field, value", [("delta_interval_s", 0), ("max_delta_agents", 0),
                                          ("max_message_bytes", 1000), ("horizon_s", -1)])
def test_bad_sync_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        Replica("a", config=SyncConfig(**{field: value}))
