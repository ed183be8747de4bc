"""Replicating the roster between bolts: delta push, acks, digest anti-entropy, the initial pull.

One ``Replica`` per bolt incarnation. It is transport-agnostic and clock-injected: the bolt
calls ``tick()`` from its loop and ``receive(bytes)`` for every message a peer sent, and sends
whatever they return (``(peer bolt name, bytes)`` pairs) fire-and-forget. Nothing here waits,
retries a call or assumes delivery: Ray actor calls may be lost, duplicated or reordered, and a
restarted actor starts empty, so every message is an idempotent join plus bookkeeping that a
lost or repeated message cannot corrupt.

The mechanisms (notes/roster-crdt.md section 6; people's version docs/spanner.md):

* **Delta log.** Every local mutation is applied, then appended to the log with the next
  *origin sequence number* (one counter per incarnation, across shards, so a peer's progress
  is one number instead of 256). Own deltas only: nothing is relayed.
* **Push** every ``delta_interval_s`` (at once after a revoke): per live peer, the log entries
  it has not acknowledged, joined per shard into one delta interval (the full shard when the
  interval touches more than ``max_delta_agents`` agents), in one message covering ``(lo, hi]``.
* **Ack.** A receiver always joins, then answers with the highest ``upto`` such that it holds
  every delta of that origin incarnation up to it. A message that starts past ``upto`` (a gap)
  is joined but does not move ``upto``, so the origin resends from there. Once every live peer
  acked a sequence number, the origin trims the log up to it.
* **Digest anti-entropy** every ``digest_interval_s``, to one random peer: the sender's
  ``seq`` and a digest of each of the 256 shards. The receiver answers with a **repair**: the
  list of shards that differ, its own version of each, and a request for the sender's
  versions, which come back as a **supply**. Once either side holds every differing shard of
  the other, it holds all of the other's deltas up to the seq that came with the digests, so
  acks advance even over deltas whose log entries are gone (trimmed, or their origin died).
* **Ready.** A replica that starts empty, or from a snapshot older than ``horizon_s`` (which
  it discards), is not ``ready`` until one peer's repair answered its digest completely: it
  then holds everything that peer held. A fresh snapshot is ready at once, so a bolt whose
  peers are all down still serves from what it saved.

Message shapes: ``vigo.roster.messages``; what is kept per peer: ``vigo.roster.peers``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from vigo.errors import ConfigError, RosterError, RosterFormatError
from vigo.roster.crdt import (
    HLC_MAX_OFFSET_S,
    INCARNATION_BYTES,
    ReplicaId,
    ShardState,
    Status,
    _show,
    joined,
)
from vigo.roster.messages import (
    ACK,
    DIGEST,
    PUSH,
    REPAIR,
    SUPPLY,
    Message,
    decode_message,
    differing_shards,
    encode_message,
)
from vigo.roster.peers import Peer
from vigo.roster.roster import Roster

__all__ = ["Outbound", "Replica", "Snapshot", "SyncConfig", "Write"]

#: What the engine asks the bolt to send: the peer's bolt name and the encoded message.
Outbound = tuple[str, bytes]


@dataclass
class SyncConfig:
    """Timers and limits of roster replication. Every time in seconds of the injected clock."""

    #: How often unacknowledged deltas are pushed to each live peer, s. Batches many
    #: admissions into one message per peer (Pekko ~400 ms, DeltaCrdt 200 ms). Revocations do
    #: not wait for it: they are pushed on the next ``tick()``.
    delta_interval_s: float = 0.25
    #: Unacknowledged deltas are sent again after this long without new ones, s: about four
    #: round trips' worth of margin over the push interval, short enough that a lost revocation
    #: is still visible everywhere within ~3 s at 10% loss.
    retransmit_s: float = 1.0
    #: How often a digest goes to one random live peer, s (Pekko's gossip-interval).
    digest_interval_s: float = 2.0
    #: A replica that is not ready asks its live peers again after this long without a
    #: complete answer, s (it asks all of them at once: it is rare and costs 4 KiB each).
    pull_retry_s: float = 1.0
    #: A shard's delta interval touching more agents than this is replaced by the full shard
    #: (Pekko's max-delta-size): nearly as big, and it also repairs whatever the peer missed.
    max_delta_agents: int = 50
    #: A live peer silent this long no longer holds back log trimming, s; if it comes back it
    #: is repaired from digests (full shards) instead of the log.
    peer_silence_s: float = 60.0
    #: A snapshot older than this is never merged, s (10 days: Cassandra's gc_grace_seconds,
    #: Pekko's durable pruning TTL). The bolt starts empty with a new incarnation instead.
    horizon_s: float = 10 * 86400.0
    #: Largest message this engine builds, bytes. A push that would be bigger is replaced by a
    #: digest (repairs are split per shard into messages of at most this size).
    max_message_bytes: int = 1024 * 1024
    #: Remote HLCs further ahead of the local wall clock than this do not move it, s.
    hlc_max_offset_s: float = HLC_MAX_OFFSET_S

    @classmethod
    def default(cls) -> SyncConfig:
        """Production values (the field defaults)."""
        return cls()

    @classmethod
    def local(cls) -> SyncConfig:
        """A one-machine dev cluster: faster repair, a short silence so a stopped dev bolt does
        not pin the log for a minute."""
        return cls(digest_interval_s=1.0, pull_retry_s=0.5, peer_silence_s=10.0)

    def check(self) -> None:
        """Raise ConfigError naming the first value out of range."""
        for name in ("delta_interval_s", "retransmit_s", "digest_interval_s", "pull_retry_s",
                     "peer_silence_s", "horizon_s", "hlc_max_offset_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"roster sync {name}: expected a number of seconds > 0, got {value!r}")
        if not isinstance(self.max_delta_agents, int) or self.max_delta_agents < 1:
            raise ConfigError(f"roster sync max_delta_agents: expected an integer >= 1, got {self.max_delta_agents!r}")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 64 * 1024:
            raise ConfigError(
                f"roster sync max_message_bytes: expected an integer >= 65536 (one full shard "
                f"must fit), got {self.max_message_bytes!r}"
            )


class Write(NamedTuple):
    """A local mutation: its origin sequence number and the delta that replicates it."""

    seq: int
    delta: ShardState


class Snapshot(NamedTuple):
    """A roster saved by a bolt: encoded shards (``Roster.dump``) and when, wall-clock seconds."""

    saved_at: float
    shards: dict[int, bytes]



# --- The replica --------------------------------------------------------------------------------------


class Replica:
    """One bolt incarnation's roster plus its replication state.

    Create one per actor construction (the incarnation id is fresh every time); pass the
    snapshot the bolt saved, if any. Not thread-safe: call it from one thread."""

    def __init__(
        self,
        bolt_name: str,
        *,
        now: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        config: SyncConfig | None = None,
        snapshot: Snapshot | None = None,
        rng: random.Random | None = None,
        incarnation: bytes | None = None,
    ) -> None:
        self.config = config or SyncConfig.default()
        self.config.check()
        self._now = now
        self._wall = wall
        self._rng = rng or random.Random()
        # Fresh for every construction. Only a seeded simulation passes one (drawn from its own
        # seeded generator, so a failing schedule replays exactly); a bolt never does.
        if incarnation is None:
            self.replica = ReplicaId.fresh(bolt_name)
        elif isinstance(incarnation, bytes) and len(incarnation) == INCARNATION_BYTES:
            self.replica = ReplicaId(ReplicaId.fresh(bolt_name).bolt, incarnation)
        else:
            raise RosterFormatError(f"incarnation: expected {INCARNATION_BYTES} bytes, got {_show(incarnation)}")
        self.snapshot_discarded_age_s: float | None = None

        shards: dict[int, bytes] = {}
        if snapshot is not None:
            age = wall() - snapshot.saved_at
            if age > self.config.horizon_s:
                # Older than the horizon that compaction is allowed to rely on (notes section 7):
                # never merged. This incarnation starts empty and is not ready until it pulled.
                self.snapshot_discarded_age_s = age
            else:
                shards = snapshot.shards
        self.roster = Roster.load(self.replica, shards, wall=wall, hlc_max_offset_s=self.config.hlc_max_offset_s)
        self.ready = bool(shards)
        self._not_ready_answers: set[str] = set()

        self._peers: dict[str, Peer] = {}
        # Until the bolt has said who is alive, "no live peer" means "not told yet", not "alone".
        self._peers_known = False
        # The delta log: (seq, delta) in seq order; seqs are contiguous, so the entry for seq
        # s sits at index s - first seq. Trimmed from the front once every live peer acked.
        self._log: list[tuple[int, ShardState]] = []
        self._seq = 0
        self._urgent = False
        start = now()
        self._next_push = start
        # A snapshot may hold deltas its old incarnation never pushed: compare digests at once.
        self._next_digest = start
        self._next_pull = start
        self._push_cache: dict[tuple[int, int], list[bytes]] = {}
        self.counters: dict[str, int] = {}

    # -- local mutations -------------------------------------------------------------------------------

    def admit(self, agent_id: str, fingerprint: str, *, not_after: int = 0, method: str = "token") -> Write:
        """Admit locally; the write's ``seq`` tells when peers hold it (``acked_by``)."""
        return self._log_delta(self.roster.admit(agent_id, fingerprint, not_after=not_after, method=method))

    def revoke(self, agent_id: str, reason: str = "operator") -> Write:
        """Revoke locally and push on the next ``tick()`` without waiting for the push interval."""
        self._urgent = True
        return self._log_delta(self.roster.revoke(agent_id, reason))

    def forget(self, agent_id: str) -> Write | None:
        """Forget locally (refused for a revoked agent); None when there was nothing to forget."""
        delta = self.roster.forget(agent_id)
        return self._log_delta(delta) if delta else None

    def _log_delta(self, delta: ShardState) -> Write:
        self._seq += 1
        self._log.append((self._seq, delta))
        return Write(self._seq, delta)

    def status(self, agent_id: str) -> Status:
        return self.roster.status(agent_id)

    def acked_by(self, seq: int) -> list[str]:
        """Live peers (current incarnations) holding our delta ``seq``: an admit is safe once
        one peer holds it, a revoke once a majority does. A timeout is not a rollback."""
        return sorted(p.name for p in self._peers.values() if p.live and p.acked >= seq)

    # -- membership ----------------------------------------------------------------------------------

    def set_peers(self, names: Iterable[str]) -> None:
        """The peer bolts currently alive (by name; this bolt's own name is ignored). Pushes and
        digests go to them; log trimming waits for them (unless silent for ``peer_silence_s``).
        Call it before the first ``tick()`` and whenever liveness changes: a replica that is not
        ready pulls from these, and becomes ready at once if told there are none."""
        now = self._now()
        self._peers_known = True
        live = set(names) - {self.replica.bolt}
        for name in sorted(live):  # sorted: peer order (and so random picks) independent of hashing
            peer = self._peers.get(name)
            if peer is None:
                # A new peer holds back trimming from now on, for peer_silence_s at most.
                peer = self._peers[name] = Peer(name, last_heard=now)
            peer.live = True
        for peer in self._peers.values():
            if peer.name not in live:
                peer.live = False

    def _live(self) -> list[Peer]:
        return [p for p in self._peers.values() if p.live]

    # -- the periodic step ---------------------------------------------------------------------------

    def tick(self) -> list[Outbound]:
        """Everything due now: the initial pull, pushes, retransmissions, anti-entropy."""
        now = self._now()
        cfg = self.config
        out: list[Outbound] = []
        self._push_cache = {}
        live = self._live()

        if not self.ready:
            self._pull(now, live, out)

        push_due = self._urgent or now >= self._next_push
        for peer in live:
            overdue = bool(peer.inflight) and now - peer.inflight[0][1] >= cfg.retransmit_s
            # A peer with pushes in flight that we have not heard from for a retransmit period
            # is probably unreachable: only the retransmit timer sends to it, so a partition
            # does not cost a message per peer per push interval.
            quiet = bool(peer.inflight) and now - peer.last_heard >= cfg.retransmit_s
            if overdue:
                out += [(peer.name, m) for m in self.outgoing(peer.name, resend=True)]
            elif push_due and self._seq > peer.sent_upto and not quiet:
                out += [(peer.name, m) for m in self.outgoing(peer.name)]
        if push_due:
            self._urgent = False
            self._next_push = now + cfg.delta_interval_s

        if now >= self._next_digest and live:
            peer = self._rng.choice(live)
            out.append((peer.name, self.digest_message()))
            self._next_digest = now + cfg.digest_interval_s

        self._trim(now)
        return out

    def _pull(self, now: float, live: list[Peer], out: list[Outbound]) -> None:
        if not self._peers_known:
            return
        if not live:
            # Nobody to pull from: with no peer alive, what this bolt holds is the roster.
            self.ready = True
            return
        if {p.name for p in live} <= self._not_ready_answers:
            # Every live peer answered that it is not ready either (a cold cluster start):
            # waiting longer cannot bring anything better.
            self.ready = True
            return
        if now >= self._next_pull:
            # Ask every live peer that has not said it is empty too: the first complete answer
            # from a ready one makes us ready, and a cold cluster finds out in one round trip.
            digest = self.digest_message()
            out += [(p.name, digest) for p in live if p.name not in self._not_ready_answers]
            self._next_pull = now + self.config.pull_retry_s

    def outgoing(self, peer_name: str, *, resend: bool = False) -> list[bytes]:
        """The push to ``peer_name`` now, as one message: our deltas not yet sent to it, or with
        ``resend`` every delta it has not acknowledged.

        If its acks predate the log (it was silent, or restarted), a digest goes too (at most
        once per digest interval), so the missing deltas come back as full shards."""
        peer = self._peers.get(peer_name)
        if peer is None:
            raise RosterError(f"cannot push to {peer_name!r}: expected a peer named in set_peers(), got an unknown name")
        now = self._now()
        first = self._log[0][0] if self._log else self._seq + 1
        out: list[bytes] = []
        if peer.acked < first - 1 and now - peer.behind_digest_at >= self.config.digest_interval_s:
            peer.behind_digest_at = now
            out.append(self.digest_message())
        lo = max(peer.acked if resend else max(peer.acked, peer.sent_upto), first - 1)
        if resend:
            peer.inflight.clear()
        if lo < self._seq:
            push = self._push_message(lo, self._seq)
            if push is None:
                # Too big for one message: the digest exchange moves it shard by shard instead.
                if not out:
                    peer.behind_digest_at = now
                    out.append(self.digest_message())
            else:
                self._count_sent(PUSH, push)
                out.append(push)
            peer.inflight.append((self._seq, now))
        peer.sent_upto = self._seq
        return out

    def _push_message(self, lo: int, hi: int) -> bytes | None:
        cached = self._push_cache.get((lo, hi))
        if cached is not None:
            return cached[0] if cached else None
        first = self._log[0][0]
        groups: dict[int, list[ShardState]] = {}
        for _, delta in self._log[lo + 1 - first: hi + 1 - first]:
            groups.setdefault(delta.shard, []).append(delta)
        states = []
        for shard, deltas in groups.items():
            interval = joined(*deltas) if len(deltas) > 1 else deltas[0]
            if len(interval.entries) > self.config.max_delta_agents:
                interval = self.roster.shards[shard]
            states.append(interval)
        data = encode_message(PUSH, self.replica, {"lo": lo, "hi": hi}, states)
        fits = len(data) <= self.config.max_message_bytes
        self._push_cache[(lo, hi)] = [data] if fits else []
        return data if fits else None

    def digest_message(self) -> bytes:
        """Our sequence number and the digest of every shard (about 4 KiB)."""
        return self._count_sent(DIGEST, encode_message(DIGEST, self.replica, {"q": self._seq, "d": self.roster.digests()}))

    def _trim(self, now: float) -> None:
        floor = self._seq
        for peer in self._peers.values():
            if peer.live and now - peer.last_heard <= self.config.peer_silence_s:
                floor = min(floor, peer.acked)
        if self._log and self._log[0][0] <= floor:
            del self._log[: floor - self._log[0][0] + 1]

    # -- receiving --------------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Outbound]:
        """Join what a peer sent and return the answers to send. Raises RosterFormatError for
        bytes that are not a sync message (count kept in ``stats()['rejected']``)."""
        try:
            msg = decode_message(data)
        except RosterFormatError:
            self._count("rejected")
            raise
        self._count(f"received.{msg.kind}")
        self._count(f"received_bytes.{msg.kind}", len(data))
        if msg.sender == self.replica:
            return []  # our own message, looped back
        for state in msg.states:
            # Data is always joined: idempotent, and whoever sent it, it is real roster state.
            self.roster.join(state)
        if msg.sender.bolt == self.replica.bolt:
            return []  # an earlier incarnation of this bolt: its data counted, nothing to answer
        peer = self._peers.get(msg.sender.bolt)
        if peer is None:
            peer = self._peers[msg.sender.bolt] = Peer(msg.sender.bolt, last_heard=self._now())
        if not self._current(peer, msg.sender.incarnation):
            return []
        handler = {
            PUSH: self._on_push,
            ACK: self._on_ack,
            DIGEST: self._on_digest,
            REPAIR: self._on_repair,
            SUPPLY: self._on_supply,
        }[msg.kind]
        return [(peer.name, m) for m in handler(peer, msg)]

    def _current(self, peer: Peer, incarnation: bytes) -> bool:
        """Note a message from ``peer``; whether it comes from the peer's current incarnation."""
        if incarnation == peer.incarnation:
            peer.last_heard = self._now()
            return True
        if incarnation in peer.retired:
            return False
        if peer.incarnation is not None:
            peer.restarted()  # a new incarnation: what we knew of the old one is void
            self._not_ready_answers.discard(peer.name)
        peer.incarnation = incarnation
        peer.last_heard = self._now()
        return True

    def _ack(self, peer: Peer) -> bytes:
        assert peer.incarnation is not None  # set by _current before any handler runs
        return self._count_sent(ACK, encode_message(ACK, self.replica, {"o": peer.incarnation, "u": peer.recv}))

    def _on_push(self, peer: Peer, msg: Message) -> list[bytes]:
        peer.received(msg.lo, msg.hi)
        return [self._ack(peer)]

    def _on_ack(self, peer: Peer, msg: Message) -> list[bytes]:
        if msg.origin == self.replica.incarnation and msg.upto > peer.acked:
            peer.acked = min(msg.upto, self._seq)
            peer.sent_upto = max(peer.sent_upto, peer.acked)
            peer.inflight = [(hi, at) for hi, at in peer.inflight if hi > peer.acked]
            self._trim(self._now())
        return []

    def _on_digest(self, peer: Peer, msg: Message) -> list[bytes]:
        peer.digest, peer.digest_at = msg.digests, self._now()
        mine = self.roster.digests()
        mismatch = differing_shards(msg.digests, mine)
        out = []
        if mismatch:
            peer.supply = (msg.seq, set(mismatch))
        elif msg.seq > peer.recv:
            # Equal everywhere: we hold every delta the peer had made when it sent the digest.
            peer.received(0, msg.seq)
            out.append(self._ack(peer))
        body = {"q": self._seq, "ref": msg.seq, "m": mismatch, "rd": self.ready}
        out += self._chunked(REPAIR, body, mismatch, want=mismatch)
        return out

    def _on_repair(self, peer: Peer, msg: Message) -> list[bytes]:
        out = []
        key = (msg.seq, msg.ref)
        # A repair is tracked until complete; only a newer one (higher seq) replaces it, so a
        # late chunk of an old repair does not restart the count.
        if peer.repair is None or (peer.repair[:2] != key and msg.seq >= peer.repair[0]):
            peer.repair = (msg.seq, msg.ref, set(msg.mismatch))
        if peer.repair is not None and peer.repair[:2] == key:
            missing = peer.repair[2]
            missing.difference_update(s.shard for s in msg.states)
            if not missing:
                # We hold each differing shard as the peer had it and the rest were equal:
                # every delta it made up to its seq is here.
                peer.repair = None
                if msg.seq > peer.recv:
                    peer.received(0, msg.seq)
                    out.append(self._ack(peer))
                if not self.ready:
                    if msg.ready:
                        self.ready = True
                    else:
                        self._not_ready_answers.add(peer.name)
        if msg.want:
            out += self._chunked(SUPPLY, {"ref": msg.ref}, msg.want)
        return out

    def _on_supply(self, peer: Peer, msg: Message) -> list[bytes]:
        if peer.supply is None or peer.supply[0] != msg.ref:
            return []
        missing = peer.supply[1]
        missing.difference_update(s.shard for s in msg.states)
        if missing:
            return []
        peer.supply = None
        if msg.ref > peer.recv:
            peer.received(0, msg.ref)
            return [self._ack(peer)]
        return []

    def _chunked(self, kind: str, body: dict[str, Any], shards: list[int], want: list[int] | None = None) -> list[bytes]:
        """Full shard states in messages of at most ``max_message_bytes`` (one shard may exceed
        it alone). Always at least one message, so an empty answer still arrives. ``want``
        travels in the first message only: a lost first message just waits for the next digest."""
        limit = self.config.max_message_bytes
        messages: list[bytes] = []
        group: list[int] = []
        size = 0
        for shard in shards:
            shard_size = len(self.roster.encoded(shard))
            if group and size + shard_size > limit:
                messages.append(self._encode_group(kind, body, group, want if not messages else []))
                group, size = [], 0
            group.append(shard)
            size += shard_size
        messages.append(self._encode_group(kind, body, group, want if not messages else []))
        return messages

    def _encode_group(self, kind: str, body: dict[str, Any], group: list[int], want: list[int] | None) -> bytes:
        if kind == REPAIR:
            body = {**body, "w": want or []}
        return self._count_sent(kind, encode_message(kind, self.replica, body, [self.roster.shards[i] for i in group]))

    # -- persistence and stats ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything to save (every non-empty shard) with the current wall-clock time."""
        return Snapshot(self._wall(), self.roster.dump())

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def _count_sent(self, kind: str, data: bytes) -> bytes:
        self._count(f"sent.{kind}")
        self._count(f"sent_bytes.{kind}", len(data))
        return data

    def stats(self, *, counts: bool = True) -> dict[str, Any]:
        """Figures for ``vigocli spanner status`` and metrics.

        ``agents``: roster size; ``states``: agents per state (a full scan, skipped with
        ``counts=False``); per peer: ``backlog`` (our deltas it has not acked), ``acked``,
        ``heard_s_ago``, ``digest_agreement`` (share of shards whose digest equals ours, from its
        last digest, ``digest_age_s`` old) and ``differing_shards`` (their numbers);
        ``digest_agreement`` overall is the minimum over live peers that sent one; ``counters``:
        messages and bytes sent/received per kind."""
        now = self._now()
        mine = self.roster.digests()
        peers = {}
        agreements = []
        for peer in sorted(self._peers.values(), key=lambda p: p.name):
            row = peers[peer.name] = peer.stats(now, self._seq, mine)
            if peer.live and row["digest_agreement"] is not None:
                agreements.append(row["digest_agreement"])
        stats: dict[str, Any] = {
            "replica": str(self.replica),
            "bolt": self.replica.bolt,
            "incarnation": self.replica.incarnation.hex(),
            "ready": self.ready,
            "agents": len(self.roster),
            "seq": self._seq,
            "log_entries": len(self._log),
            "digest_agreement": min(agreements) if agreements else None,
            "peers": peers,
            "hlc_rejected": self.roster.clock.rejected,
            "snapshot_discarded_age_s": self.snapshot_discarded_age_s,
            "counters": dict(sorted(self.counters.items())),
        }
        if counts:
            stats["states"] = self.roster.counts()
        return stats
