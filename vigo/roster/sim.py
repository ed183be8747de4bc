"""A seeded, virtual-time network of roster replicas, for tests and benchmarks/roster.py.

Time model (all virtual seconds; one ``Simulation.now`` clock serves as every replica's
monotonic clock, and ``WALL_EPOCH_S + now`` as its wall clock, so HLCs have realistic sizes):

* Every bolt runs its loop every ``tick_s`` (``Replica.tick()``), at a random phase, and also
  right after each of its own mutations (which is what pushes a revocation at once).
* A message takes ``latency_s`` plus a uniform extra delay in ``[0, reorder_s]`` (which is what
  reorders messages), is lost with probability ``loss`` and duplicated with probability
  ``duplicate`` (the copy gets its own delay). Answers are sent when a message is delivered;
  processing takes no virtual time.
* Partitions drop every message between groups, at send and at delivery. A crashed bolt
  receives nothing; it restarts as a new incarnation from what it had saved (its own mutations
  are saved at once, received state on each tick, as a bolt writing to SQLite would), from
  nothing, or from a snapshot older than the horizon (which it must discard).
* Liveness is exact and immediate (``set_peers`` with the bolts that are up): the damping of
  ``vigo.roster.ownership`` is tested on its own.

``protocol="full"`` swaps the delta engine for a plain state-based baseline (every bolt sends
its whole roster to every peer every ``SyncConfig.delta_interval_s``), to compare bytes and to
check that both paths end in the same roster.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from vigo.roster.codec import decode
from vigo.roster.crdt import (
    CausalContext,
    ReplicaId,
    ShardState,
    State,
    shard_of,
)
from vigo.roster.roster import Roster
from vigo.roster.sync import Outbound, Replica, Snapshot, SyncConfig

__all__ = ["WALL_EPOCH_S", "NetConfig", "OpRecord", "Simulation"]

#: Wall-clock time at virtual time 0 (2024-01-01T00:00:00Z), so HLCs look like real ones.
WALL_EPOCH_S = 1_704_067_200.0


@dataclass
class NetConfig:
    """The simulated network. Probabilities per message; times in virtual seconds."""

    #: One-way delay of every message, s (two Ray actors on different nodes of one region:
    #: ~1 ms of network plus Ray's call overhead; 5 ms is pessimistic on purpose).
    latency_s: float = 0.005
    #: Extra delay drawn uniformly from [0, reorder_s] per message, s: this reorders messages.
    reorder_s: float = 0.0
    #: Share of messages dropped, 0..1.
    loss: float = 0.0
    #: Share of messages delivered twice, 0..1.
    duplicate: float = 0.0


@dataclass
class OpRecord:
    """One mutation as it happened, for checking revocation safety independently of the CRDT."""

    kind: str  # "admit", "revoke", "forget"
    bolt: str
    agent_id: str
    at: float
    #: The token's dot (None for forget), and the shard context right after the mutation:
    #: everything its bolt had seen, so ``x`` happened before this op iff ``seen.has(x.dot)``.
    dot: int | None
    seen: CausalContext
    #: The delta it produced (what the bolt replicated).
    delta: ShardState


class _FullStateNode:
    """The state-based baseline: the whole roster to every peer on every push interval."""

    def __init__(self, bolt: str, *, now: Callable[[], float], wall: Callable[[], float], config: SyncConfig,
                 incarnation: bytes) -> None:
        self.replica = ReplicaId(bolt, incarnation)
        self.roster = Roster(self.replica, wall=wall)
        self.ready = True
        self._now = now
        self._interval_s = config.delta_interval_s
        self._next = now()
        self._peers: list[str] = []

    def set_peers(self, names: Iterable[str]) -> None:
        self._peers = sorted(set(names) - {self.replica.bolt})

    def tick(self) -> list[Outbound]:
        if self._now() < self._next:
            return []
        self._next = self._now() + self._interval_s
        message = msgpack.packb(list(self.roster.dump().values()), use_bin_type=True)
        return [(peer, message) for peer in self._peers]

    def receive(self, data: bytes) -> list[Outbound]:
        for shard in msgpack.unpackb(data, raw=False):
            self.roster.join(decode(shard))
        return []


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    action: Callable[..., None] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False, default=())
    kwargs: dict[str, Any] = field(compare=False, default_factory=dict)


class Simulation:
    """N bolts in virtual time. Drive it with the mutators and ``run_for`` / ``run_until``."""

    def __init__(
        self,
        bolts: int | Iterable[str] = 5,
        *,
        seed: int = 0,
        net: NetConfig | None = None,
        sync: SyncConfig | None = None,
        tick_s: float = 0.05,
        protocol: str = "delta",
        record: bool = True,
        persist: bool = True,
    ) -> None:
        if protocol not in ("delta", "full"):
            raise ValueError(f"protocol: expected 'delta' or 'full', got {protocol!r}")
        self.names = [f"bolt{i}" for i in range(bolts)] if isinstance(bolts, int) else list(bolts)
        self.rng = random.Random(seed)
        self.net = net or NetConfig()
        self.sync = sync or SyncConfig.default()
        self.tick_s = tick_s
        self.protocol = protocol
        #: Keep ``OpRecord``s (safety checks, reference joins): off for big benchmark runs.
        self.record = record
        #: Save each bolt's changed shards (what ``restart`` starts from): off for benchmark runs
        #: without crashes, where encoding a shard per mutation would dominate the run time.
        self.persist = persist
        self.now = 0.0
        self._events: list[_Event] = []
        self._seq = 0
        self.nodes: dict[str, Any] = {}
        self.saved: dict[str, Snapshot] = {}
        self._groups: list[set[str]] | None = None
        self.ops: list[OpRecord] = []
        #: Message and byte counters of crashed incarnations (``counters()`` adds them in).
        self.retired_counters: list[dict[str, int]] = []
        self.sent_messages = 0
        self.sent_bytes = 0
        self.lost = 0
        self.duplicated = 0
        self.delivered = 0
        #: Called with the bolt name after each delivery (e.g. to time revocation visibility).
        self.on_deliver: list[Callable[[str], None]] = []
        for name in self.names:
            self._start(name, snapshot=None)
        self._membership_changed()

    # -- clocks and events --------------------------------------------------------------------

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_EPOCH_S + self.now

    def at(self, when: float, action: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Run ``action(*args, **kwargs)`` at virtual time ``when``."""
        self._seq += 1
        heapq.heappush(self._events, _Event(max(when, self.now), self._seq, action, args, kwargs))

    def run_until(self, until: float) -> None:
        while self._events and self._events[0].at <= until:
            event = heapq.heappop(self._events)
            self.now = event.at
            event.action(*event.args, **event.kwargs)
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # -- bolts ------------------------------------------------------------------------------------

    def _start(self, name: str, snapshot: Snapshot | None) -> None:
        if self.protocol == "delta":
            node: Any = Replica(name, now=self.clock, wall=self.wall, config=self.sync, snapshot=snapshot,
                                rng=random.Random(self.rng.random()), incarnation=self.rng.randbytes(16))
        else:
            node = _FullStateNode(name, now=self.clock, wall=self.wall, config=self.sync,
                                  incarnation=self.rng.randbytes(16))
        self.nodes[name] = node
        self.saved[name] = Snapshot(self.wall(), node.roster.dump())
        self.at(self.now + self.rng.uniform(0, self.tick_s), self._tick, name, node.replica)

    def up(self) -> list[str]:
        return [n for n in self.names if n in self.nodes]

    def _membership_changed(self) -> None:
        up = self.up()
        for name in up:
            self.nodes[name].set_peers(n for n in up if n != name)

    def _tick(self, name: str, replica: ReplicaId) -> None:
        node = self.nodes.get(name)
        if node is None or node.replica != replica:
            return  # crashed (and maybe restarted as another incarnation) since scheduled
        self._flush(name)
        self._persist(name)
        self.at(self.now + self.tick_s, self._tick, name, replica)

    def _flush(self, name: str) -> None:
        for peer, data in self.nodes[name].tick():
            self._send(name, peer, data)

    def _persist(self, name: str) -> None:
        if not self.persist:
            return
        roster = self.nodes[name].roster
        changed = roster.take_unsaved()
        if changed:
            shards = dict(self.saved[name].shards)
            shards.update(roster.dump(changed))
            self.saved[name] = Snapshot(self.wall(), shards)

    def crash(self, name: str) -> None:
        node = self.nodes.pop(name)
        if hasattr(node, "counters"):
            self.retired_counters.append(dict(node.counters))
        self._membership_changed()

    def restart(self, name: str, *, snapshot: str = "saved") -> Replica:
        """Start ``name`` again as a new incarnation from its ``"saved"`` state, from
        ``"none"``, or from its saved state dated past the horizon (``"stale"``)."""
        if name in self.nodes:
            raise ValueError(f"cannot restart {name!r}: it is running")
        if snapshot == "saved":
            snap: Snapshot | None = self.saved[name]
        elif snapshot == "none":
            snap = None
        elif snapshot == "stale":
            saved = self.saved[name]
            snap = Snapshot(self.wall() - self.sync.horizon_s - 1.0, saved.shards)
        else:
            raise ValueError(f"snapshot: expected 'saved', 'none' or 'stale', got {snapshot!r}")
        self._start(name, snap)
        self._membership_changed()
        return self.nodes[name]

    # -- network ----------------------------------------------------------------------------------

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the bolts into ``groups`` (bolts in no group form one more group)."""
        sets = [set(g) for g in groups]
        rest = set(self.names).difference(*sets)
        self._groups = [*sets, rest] if rest else sets

    def heal(self) -> None:
        self._groups = None

    def _connected(self, a: str, b: str) -> bool:
        return self._groups is None or any(a in g and b in g for g in self._groups)

    def _send(self, src: str, dst: str, data: bytes) -> None:
        self.sent_messages += 1
        self.sent_bytes += len(data)
        if not self._connected(src, dst) or self.rng.random() < self.net.loss:
            self.lost += 1
            return
        copies = 2 if self.rng.random() < self.net.duplicate else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            delay = self.net.latency_s + self.rng.uniform(0, self.net.reorder_s)
            self.at(self.now + delay, self._deliver, src, dst, data)

    def _deliver(self, src: str, dst: str, data: bytes) -> None:
        node = self.nodes.get(dst)
        if node is None or not self._connected(src, dst):
            self.lost += 1
            return
        self.delivered += 1
        for peer, answer in node.receive(data):
            self._send(dst, peer, answer)
        for hook in self.on_deliver:
            hook(dst)

    # -- mutations ----------------------------------------------------------------------------------

    def admit(self, bolt: str, agent_id: str, fingerprint: str, **kw: Any) -> None:
        self._mutate(bolt, "admit", agent_id, fingerprint, **kw)

    def revoke(self, bolt: str, agent_id: str, reason: str = "operator") -> None:
        self._mutate(bolt, "revoke", agent_id, reason)

    def forget(self, bolt: str, agent_id: str) -> bool:
        """Forget at ``bolt``; False if it refused (the agent is revoked there)."""
        if self.nodes[bolt].roster.status(agent_id).state is State.REVOKED:
            return False
        self._mutate(bolt, "forget", agent_id)
        return True

    def _mutate(self, bolt: str, kind: str, agent_id: str, *args: Any, **kw: Any) -> None:
        node = self.nodes[bolt]
        if self.protocol == "delta":
            write = getattr(node, kind)(agent_id, *args, **kw)
            delta = None if write is None else write.delta
        else:
            delta = getattr(node.roster, kind)(agent_id, *args, **kw)
        if self.record and delta:
            token = delta.entries.get(agent_id)  # a mutator delta holds one token, or none
            seen = node.roster.shards[delta.shard].ctx.copy()
            dot = None if token is None else token.dot
            self.ops.append(OpRecord(kind, bolt, agent_id, self.now, dot, seen, delta))
        # The bolt saves its own mutation before answering, then runs its loop (a revocation
        # is pushed at once; admissions wait for the push interval).
        self._persist(bolt)
        self._flush(bolt)

    def inject(self, bolt: str, delta: ShardState) -> None:
        """Join a recorded delta into ``bolt`` as if it had made it (the replay of a schedule)."""
        self.nodes[bolt].roster.join(delta)
        self._persist(bolt)

    # -- observation --------------------------------------------------------------------------------

    def converged(self) -> bool:
        """Every running bolt ready and holding equal digests for every shard."""
        up = [self.nodes[n] for n in self.up()]
        if not all(n.ready for n in up):
            return False
        first = up[0].roster.digests()
        return all(n.roster.digests() == first for n in up[1:])

    def run_until_converged(self, timeout_s: float, check_every_s: float = 0.01) -> float | None:
        """Run until ``converged()`` (checked every ``check_every_s``); the virtual time it took,
        or None after ``timeout_s``."""
        start = self.now
        while self.now - start <= timeout_s:
            if self.converged():
                return self.now - start
            self.run_for(check_every_s)
        return None

    def safety_violations(self) -> list[str]:
        """Bolts reading an agent Admitted although a revocation they have seen happened before
        no admission they have seen, judged from the op records (not from the CRDT's tokens).

        Happened-before is transitive: r -> r' -> a counts even when a's bolt never saw r itself
        (a delta carries only the dots its op observed, so ``a.seen`` may lack ``r``)."""
        by_agent: dict[str, list[OpRecord]] = {}
        for op in self.ops:
            by_agent.setdefault(op.agent_id, []).append(op)
        violations = []
        for agent_id, ops in by_agent.items():
            dotted = [op for op in ops if op.dot is not None]
            if not any(op.kind == "revoke" for op in dotted):
                continue
            # before[d]: dots of every op that happened before the op with dot d. Records are in
            # creation order, so everything an op saw is already in the table.
            before: dict[int, set[int]] = {}
            for op in dotted:
                closure: set[int] = set()
                for earlier in dotted:
                    if earlier.dot in before and op.seen.has(earlier.dot):
                        closure.add(earlier.dot)
                        closure |= before[earlier.dot]
                before[op.dot] = closure
            revokes = [op for op in dotted if op.kind == "revoke"]
            admits = [op for op in dotted if op.kind == "admit"]
            for name in self.up():
                roster = self.nodes[name].roster
                if roster.status(agent_id).state is not State.ADMITTED:
                    continue
                ctx = roster.shards[shard_of(agent_id)].ctx
                for r in revokes:
                    if ctx.has(r.dot) and not any(ctx.has(a.dot) and r.dot in before[a.dot] for a in admits):
                        violations.append(f"{name} reads {agent_id!r} admitted after seeing a revoke by "
                                          f"{r.bolt} at {r.at:.3f}s that no admission it has seen followed")
        return violations

    def counters(self) -> dict[str, int]:
        """Message and byte counters summed over every incarnation that ran."""
        total: dict[str, int] = {}
        for counters in [*self.retired_counters, *(getattr(n, "counters", {}) for n in self.nodes.values())]:
            for key, value in counters.items():
                total[key] = total.get(key, 0) + value
        return total

