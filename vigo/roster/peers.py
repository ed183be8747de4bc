"""What one roster replica knows about each peer bolt: acks, pushes in flight, gaps, repairs.

A ``Peer`` record per peer bolt name, kept by ``vigo.roster.sync.Replica``: the replica's
progress as an origin (what the peer acked, what was pushed and when) and as a receiver (the
highest sequence number of the peer's deltas held without a gap, the ranges that arrived past
a gap, the digest repairs under way), reset when the peer comes back as a new incarnation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vigo.roster.crdt import SHARDS
from vigo.roster.messages import differing_shards

__all__ = ["MAX_AHEAD_RANGES", "Peer"]

#: Out-of-order push ranges remembered per peer (a handful is plenty: one per push interval
#: of reordering).
MAX_AHEAD_RANGES = 64


@dataclass
class Peer:
    """What this replica knows about one peer bolt (by name; its incarnation may change)."""

    name: str
    last_heard: float
    #: The peer's current incarnation; messages from older ones (``retired``) are still joined
    #: (data is data) but their bookkeeping is ignored: a delayed ack from a dead incarnation
    #: must not move anything.
    incarnation: bytes | None = None
    retired: set[bytes] = field(default_factory=set)
    live: bool = False
    # -- this replica as origin, the peer as receiver --
    #: Highest of our sequence numbers the peer holds every delta up to (its acks).
    acked: int = 0
    #: Highest sequence number pushed to it.
    sent_upto: int = 0
    #: Pushes its acks do not cover yet: (hi, when sent), oldest first. When the oldest is
    #: ``retransmit_s`` old, everything unacked goes again: a lost push is resent even while
    #: new pushes keep flowing.
    inflight: list[tuple[int, float]] = field(default_factory=list)
    #: When we last sent it a digest because its acks predate our log.
    behind_digest_at: float = float("-inf")
    # -- the peer as origin, this replica as receiver --
    #: Highest of its sequence numbers we hold every delta up to (what we ack).
    recv: int = 0
    #: Pushes that arrived past a gap, (lo, hi): counted once the gap closes, so a reordered
    #: push does not have to be sent twice.
    ahead: list[tuple[int, int]] = field(default_factory=list)
    #: The repair answering our digest: (its seq, our digest's seq, shards still missing).
    repair: tuple[int, int, set[int]] | None = None
    #: The supply answering its digest: (its digest's seq, shards still missing).
    supply: tuple[int, set[int]] | None = None
    # -- for stats --
    digest: bytes | None = None
    digest_at: float = float("-inf")


    def received(self, lo: int, hi: int) -> None:
        """Note that we hold every delta of the peer with lo < seq <= hi."""
        if lo > self.recv:
            self.ahead.append((lo, hi))
            if len(self.ahead) > MAX_AHEAD_RANGES:
                # Keep the ranges nearest the gap; the others come again on retransmission.
                self.ahead.sort()
                del self.ahead[MAX_AHEAD_RANGES:]
            return
        self.recv = max(self.recv, hi)
        absorbed = True
        while absorbed and self.ahead:
            absorbed = False
            for i, (a, b) in enumerate(self.ahead):
                if a <= self.recv:
                    self.recv = max(self.recv, b)
                    del self.ahead[i]
                    absorbed = True
                    break

    def restarted(self) -> None:
        """The peer came back as a new incarnation: retire the old one and forget what was
        known about it. It holds nothing of ours in its bookkeeping, and we hold nothing of its
        new incarnation; its pull or a digest brings it up to date."""
        assert self.incarnation is not None
        self.retired.add(self.incarnation)
        self.acked = self.sent_upto = self.recv = 0
        self.inflight.clear()
        self.ahead.clear()
        self.repair = self.supply = None
        self.digest = None
        self.behind_digest_at = float("-inf")

    def stats(self, now: float, seq: int, mine: bytes) -> dict[str, Any]:
        """This peer's figures in ``Replica.stats``: ``seq`` is our last sequence number and
        ``mine`` our shard digests."""
        agreement = differing = None
        if self.digest is not None:
            differing = differing_shards(self.digest, mine)
            agreement = 1 - len(differing) / SHARDS
        return {
            "live": self.live,
            "incarnation": self.incarnation.hex() if self.incarnation else None,
            "acked": self.acked,
            "backlog": seq - self.acked,
            "heard_s_ago": round(now - self.last_heard, 3),
            "digest_agreement": agreement,
            "differing_shards": differing,
            "digest_age_s": None if self.digest is None else round(now - self.digest_at, 3),
        }
