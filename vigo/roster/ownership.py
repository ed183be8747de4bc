"""Which bolt serves which envoy: rendezvous hashing over the live bolts, with damped liveness.

``owner(envoy) = argmax over live bolts of H(envoy, bolt)``; the standby is the runner-up.
Rendezvous (highest-random-weight) hashing moves nothing but a departing bolt's envoys, and
each of those to its own second choice, so they spread evenly over the survivors (a ring
without virtual nodes would hand them all to one successor). Hashing the bolt *name*, not its
incarnation, lets a restarted bolt reclaim its slice. Ownership only routes: the new owner
already holds the roster, nothing is copied.

The live set is damped, because every change of it moves envoys:

* **Suspicion.** A bolt reported dead leaves the live set only after ``suspicion_s`` of being
  reported dead without interruption (memberlist's LAN value for <= 10 nodes): a missed poll
  or a short stall moves nothing.
* **Hold-down.** A bolt that left rejoins only ``rejoin_hold_s`` after it left (Serf's 60 s
  FlapTimeout) and after ``suspicion_s`` of being reported alive without interruption, so a
  bolt flapping five times in a minute causes two reassignments (out, then back), not ten.
* **Split brain.** A bolt that sees at most ``quorum_fraction`` of the configured bolts alive
  keeps serving the envoys it served when it last had a quorum and takes over nothing (after
  Horde's UniformQuorumDistribution); roster writes go on and merge later.

Clock-injected and Ray-free: the bolt passes what Ray's actor state says (which named roster
actors are ALIVE) to ``update`` on every poll.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vigo.errors import ConfigError, RosterError

__all__ = [
    "OWNER_HASH_KEY",
    "Ownership",
    "OwnershipConfig",
    "rank",
    "weight",
]

#: Key of the envoy/bolt weight: ``blake2b(envoy utf-8 + 0x00 + bolt utf-8, digest_size=8,
#: key=this)`` read big-endian. Fixed: every bolt must compute the same owner.
OWNER_HASH_KEY = b"vigo.roster.owner.v1"


def weight(envoy_id: str, bolt: str) -> int:
    """The rendezvous weight of ``bolt`` for ``envoy_id`` (a 64-bit integer)."""
    data = envoy_id.encode("utf-8") + b"\x00" + bolt.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=OWNER_HASH_KEY).digest(), "big")


def rank(envoy_id: str, bolts: Iterable[str]) -> list[str]:
    """``bolts`` from first to last choice for ``envoy_id`` (ties, never seen in practice with
    64-bit weights, go to the smaller name so every bolt agrees)."""
    return sorted(bolts, key=lambda bolt: (-weight(envoy_id, bolt), bolt))


@dataclass
class OwnershipConfig:
    """Liveness damping. Times in seconds of the injected clock."""

    #: Continuous "dead" reports needed before a bolt leaves the live set, s (memberlist:
    #: 4 x max(1, log10 n) x 1 s probe interval for n <= 10).
    suspicion_s: float = 4.0
    #: A bolt that left the live set may rejoin only this long after leaving, s (Serf's
    #: FlapTimeout). Its envoys are served by siblings meanwhile, from the replicated roster.
    rejoin_hold_s: float = 60.0
    #: Seeing this share of the configured bolts alive, or less, is a minority: take over nothing.
    quorum_fraction: float = 0.5

    @classmethod
    def default(cls) -> OwnershipConfig:
        return cls()

    @classmethod
    def local(cls) -> OwnershipConfig:
        """A one-machine dev cluster: bolts are restarted by hand, so let them back quickly."""
        return cls(suspicion_s=2.0, rejoin_hold_s=5.0)

    def check(self) -> None:
        for name in ("suspicion_s", "rejoin_hold_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"ownership {name}: expected a number of seconds >= 0, got {value!r}")
        if not isinstance(self.quorum_fraction, int | float) or not 0 <= self.quorum_fraction < 1:
            raise ConfigError(f"ownership quorum_fraction: expected a number in [0, 1), got {self.quorum_fraction!r}")


@dataclass
class _Bolt:
    reported_alive: bool = False
    #: When the current raw report (alive or dead) started.
    since: float = 0.0
    member: bool = False
    #: When it last left the live set (None: never left).
    left_at: float | None = None


class Ownership:
    """The damped live set of bolts and the envoy -> bolt assignment over it."""

    def __init__(
        self,
        bolts: Iterable[str],
        *,
        self_name: str | None = None,
        now: Callable[[], float] = time.monotonic,
        config: OwnershipConfig | None = None,
    ) -> None:
        self.configured = sorted(set(bolts))
        if not self.configured:
            raise RosterError("cannot assign envoys: expected at least one configured bolt, got none")
        if self_name is not None and self_name not in self.configured:
            raise RosterError(f"bolt {self_name!r} is not among the configured bolts {self.configured}")
        self.self_name = self_name
        self.config = config or OwnershipConfig.default()
        self.config.check()
        self._now = now
        self._bolts = {name: _Bolt() for name in self.configured}
        self._live: frozenset[str] = frozenset()
        # The live set when a quorum was last seen: what a minority bolt keeps serving.
        self._quorum_view: frozenset[str] = frozenset(self.configured)
        #: Bolts that left the live set or came back to it so far: each time, some envoys move.
        #: (A bolt's first appearance is not counted: there is nothing to damp yet.)
        self.reassignments = 0

    # -- liveness --------------------------------------------------------------------------------

    def update(self, alive: Iterable[str]) -> frozenset[str]:
        """Record one liveness poll (the configured bolts seen ALIVE now; others are dead).
        Returns the live set after it."""
        now = self._now()
        self._advance(now)
        alive = set(alive)
        for name, bolt in self._bolts.items():
            is_alive = name in alive
            if is_alive != bolt.reported_alive:
                bolt.reported_alive = is_alive
                bolt.since = now
                # A bolt never in the live set (the first poll, a newly added bolt) joins at
                # once: there is nothing to damp yet.
                if is_alive and not bolt.member and bolt.left_at is None:
                    bolt.member = True
        self._advance(now)
        return self._live

    def _advance(self, now: float) -> None:
        """Apply every suspicion and hold-down timer that has run out by ``now``."""
        cfg = self.config
        for bolt in self._bolts.values():
            if bolt.member and not bolt.reported_alive and now - bolt.since >= cfg.suspicion_s:
                bolt.member = False
                bolt.left_at = bolt.since + cfg.suspicion_s
                self.reassignments += 1
            elif (
                not bolt.member
                and bolt.reported_alive
                and bolt.left_at is not None
                and now >= bolt.left_at + cfg.rejoin_hold_s
                and now - bolt.since >= cfg.suspicion_s
            ):
                bolt.member = True
                self.reassignments += 1
        self._live = frozenset(n for n, b in self._bolts.items() if b.member)
        if self.has_quorum():
            self._quorum_view = self._live

    def live(self) -> frozenset[str]:
        self._advance(self._now())
        return self._live

    def has_quorum(self) -> bool:
        """Whether more than ``quorum_fraction`` of the configured bolts are live."""
        return len(self._live) > self.config.quorum_fraction * len(self.configured)

    # -- assignment ------------------------------------------------------------------------------

    def owner(self, envoy_id: str) -> str | None:
        """The live bolt that serves ``envoy_id`` (None when no bolt is live)."""
        ranked = rank(envoy_id, self.live())
        return ranked[0] if ranked else None

    def standby(self, envoy_id: str) -> str | None:
        """The runner-up: who takes ``envoy_id`` over if its owner leaves."""
        ranked = rank(envoy_id, self.live())
        return ranked[1] if len(ranked) > 1 else None

    def serves(self, envoy_id: str) -> bool:
        """Whether this bolt (``self_name``) should serve ``envoy_id`` now: its owner over the
        live set, or, without a quorum, its owner over the last live set that had one."""
        if self.self_name is None:
            raise RosterError("cannot answer serves(): this Ownership was created without self_name")
        live = self.live()
        view = live if self.has_quorum() else self._quorum_view
        return bool(view) and rank(envoy_id, view)[0] == self.self_name

    def stats(self) -> dict[str, Any]:
        live = self.live()
        return {
            "configured": list(self.configured),
            "live": sorted(live),
            "quorum": self.has_quorum(),
            "reassignments": self.reassignments,
            "suspected": sorted(n for n, b in self._bolts.items() if b.member and not b.reported_alive),
            "held_down": sorted(n for n, b in self._bolts.items() if not b.member and b.reported_alive),
        }

