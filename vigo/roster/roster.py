"""One replica's roster: the 256 shard states of ``vigo.roster.crdt`` behind one object.

The mutators (admit, revoke, forget) apply locally and return the delta to replicate; ``join``
takes a peer's delta or shard; reads give an agent's ``Status``; every shard's canonical
encoding (``vigo.roster.codec``) and digest is cached until it changes, for anti-entropy; and
``dump`` / ``load`` / ``take_unsaved`` persist it shard by shard.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from vigo.errors import RosterFormatError, RosterRefusedError
from vigo.roster.codec import decode, encode
from vigo.roster.crdt import (
    DIGEST_BYTES,
    HLC_MAX_OFFSET_S,
    MAX_TEXT_BYTES,
    SHARDS,
    Admit,
    HybridClock,
    ReplicaId,
    Revoke,
    ShardState,
    State,
    Status,
    Token,
    _check_agent,
    _check_int,
    _check_text,
    _dot,
    _intern,
    _pack_fingerprint,
    _status,
    _tokens,
    shard_of,
)

__all__ = ["Roster"]


class Roster:
    """One replica's roster: 256 shard states, the mutators, status, digests and persistence.

    Not thread-safe: one bolt owns it and calls it from one thread (Ray actors run one method
    at a time by default). Mutators apply locally and return the delta to replicate."""

    def __init__(
        self,
        replica: ReplicaId,
        *,
        wall: Callable[[], float] = time.time,
        hlc_max_offset_s: float = HLC_MAX_OFFSET_S,
    ) -> None:
        self.replica = replica
        self._index = _intern(replica)
        self.shards = [ShardState(i) for i in range(SHARDS)]
        self.clock = HybridClock(wall, hlc_max_offset_s)
        # Canonical encoding and digest per shard, recomputed only after the shard changed:
        # anti-entropy asks for all 256 digests every few seconds.
        self._encoded: list[bytes | None] = [None] * SHARDS
        self._digests: list[bytes | None] = [None] * SHARDS
        # Shards changed since the owner last took them (for incremental persistence).
        self._unsaved: set[int] = set()

    # -- mutators: apply locally, return the delta --------------------------------------------

    def admit(self, agent_id: str, fingerprint: str, *, not_after: int = 0, method: str = "token") -> ShardState:
        """Admit ``agent_id`` with a certificate ``fingerprint``; supersedes every token seen here."""
        _check_agent(agent_id)
        _check_text("fingerprint", fingerprint, MAX_TEXT_BYTES)
        _check_text("enrolment method", method, MAX_TEXT_BYTES)
        _check_int("not_after", not_after)
        method = sys.intern(method)
        packed = _pack_fingerprint(fingerprint)
        return self._supersede(agent_id, lambda dot: Admit(dot, packed, self.clock.now(), not_after, method))

    def revoke(self, agent_id: str, reason: str = "operator") -> ShardState:
        """Revoke ``agent_id``. Works for an agent this replica never saw: the revocation still
        beats every admission it did not observe, wherever that admission was made."""
        _check_agent(agent_id)
        _check_text("revoke reason", reason, MAX_TEXT_BYTES)
        reason = sys.intern(reason)
        return self._supersede(agent_id, lambda dot: Revoke(dot, self.clock.now(), reason))

    def forget(self, agent_id: str) -> ShardState:
        """Remove every token seen here for ``agent_id`` (decommission).

        Refused while the agent is Revoked: a forgotten revocation would let a lagging admit
        win. An unknown agent gives an empty delta (nothing to replicate)."""
        _check_agent(agent_id)
        shard = self.shards[shard_of(agent_id)]
        if _status(shard.entries.get(agent_id)).state is State.REVOKED:
            raise RosterRefusedError(
                f"cannot forget agent {agent_id!r}: it is revoked, and forgetting a revocation "
                f"would let an admission it overrides win again; expected an agent that is "
                f"admitted, in conflict or unknown"
            )
        return self._supersede(agent_id, None)

    def _supersede(self, agent_id: str, make: Callable[[int], Token] | None) -> ShardState:
        shard = self.shards[shard_of(agent_id)]
        delta = ShardState(shard.shard)
        # The delta's context is exactly the observed dots plus the new one: joining it removes
        # what this bolt saw, and nothing it did not see.
        for token in shard.tokens(agent_id):
            delta.ctx.cloud.add(token.dot)
        if make is not None:
            # Counters are per (incarnation, shard): this replica's dots in a shard are always
            # contiguous in its own context, so the next one is the vector entry plus one.
            dot = _dot(self._index, shard.ctx.vector.get(self._index, 0) + 1)
            delta.ctx.cloud.add(dot)
            delta.entries[agent_id] = make(dot)
        delta.ctx._compact()
        if delta:
            # What joining the delta would do, without scanning the shard: the context holds
            # only this agent's dots, so only its entry changes (tests check X ⊔ δ = m(X)).
            if make is None:
                del shard.entries[agent_id]
            else:
                shard.entries[agent_id] = delta.entries[agent_id]
            shard.ctx.merge(delta.ctx)
            self._changed(shard.shard)
        return delta

    # -- join ---------------------------------------------------------------------------------------

    def join(self, state: ShardState) -> bool:
        """Join a delta, a delta interval or a full shard state. Returns whether anything changed.

        Idempotent, commutative and associative, so duplicated, reordered or re-sent states are
        harmless."""
        if not 0 <= state.shard < SHARDS:
            raise RosterFormatError(f"cannot join shard {state.shard}: expected 0..{SHARDS - 1}")
        return self._apply(self.shards[state.shard], state)

    def _apply(self, shard: ShardState, state: ShardState) -> bool:
        if not shard.join(state):
            return False
        self._changed(shard.shard)
        newest = max((t.hlc for value in state.entries.values() for t in _tokens(value)), default=0)
        if newest:
            self.clock.observe(newest)
        return True

    def _changed(self, shard: int) -> None:
        self._encoded[shard] = None
        self._digests[shard] = None
        self._unsaved.add(shard)

    # -- reads ----------------------------------------------------------------------------------

    def status(self, agent_id: str) -> Status:
        return _status(self.shards[shard_of(agent_id)].entries.get(agent_id))

    def __len__(self) -> int:
        """Agents holding at least one token (admitted, revoked or in conflict)."""
        return sum(len(s.entries) for s in self.shards)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Roster):
            return NotImplemented
        return self.shards == other.shards

    __hash__ = None  # type: ignore[assignment]  # mutable

    def agents(self) -> Iterator[tuple[str, Status]]:
        for shard in self.shards:
            for agent_id, value in shard.entries.items():
                yield agent_id, _status(value)

    def counts(self) -> dict[str, int]:
        """Agents per state (a scan of the whole roster: for status pages, not hot paths)."""
        counts = {state.value: 0 for state in State if state is not State.UNKNOWN}
        for _, status in self.agents():
            counts[status.state.value] += 1
        return counts

    # -- digests and encoding --------------------------------------------------------------------

    def encoded(self, shard: int) -> bytes:
        """The canonical encoding of one shard (cached until the shard changes)."""
        data = self._encoded[shard]
        if data is None:
            data = self._encoded[shard] = encode(self.shards[shard])
        return data

    def digest(self, shard: int) -> bytes:
        """First DIGEST_BYTES of the SHA-256 of the shard's canonical encoding."""
        digest = self._digests[shard]
        if digest is None:
            digest = self._digests[shard] = hashlib.sha256(self.encoded(shard)).digest()[:DIGEST_BYTES]
        return digest

    def digests(self) -> bytes:
        """All shard digests, concatenated in shard order (SHARDS * DIGEST_BYTES bytes)."""
        return b"".join(self.digest(i) for i in range(SHARDS))

    # -- persistence ----------------------------------------------------------------------------

    def dump(self, shards: Iterable[int] | None = None) -> dict[int, bytes]:
        """Encoded shard states to store, e.g. one SQLite row per shard.

        ``shards=None`` gives every non-empty shard; pass ``take_unsaved()`` to write only what
        changed. Loading the result (``Roster.load``) gives the same roster."""
        wanted = range(SHARDS) if shards is None else shards
        return {i: self.encoded(i) for i in wanted if self.shards[i]}

    def take_unsaved(self) -> list[int]:
        """Shards changed since the last call, sorted; the set starts empty again. If writing
        them fails, dump everything next time (``dump()``) rather than lose a change."""
        taken = sorted(self._unsaved)
        self._unsaved.clear()
        return taken

    @classmethod
    def load(
        cls,
        replica: ReplicaId,
        shards: Mapping[int, bytes],
        *,
        wall: Callable[[], float] = time.time,
        hlc_max_offset_s: float = HLC_MAX_OFFSET_S,
    ) -> Roster:
        """A roster for ``replica`` (a *new* incarnation) holding the dumped ``shards``."""
        roster = cls(replica, wall=wall, hlc_max_offset_s=hlc_max_offset_s)
        for key, data in shards.items():
            state = decode(data)
            if state.shard != key:
                raise RosterFormatError(
                    f"cannot load shard {key}: its bytes hold shard {state.shard}; expected the "
                    f"stored key and the encoded shard number to agree"
                )
            roster.join(state)
        roster._unsaved.clear()
        return roster
