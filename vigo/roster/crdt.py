"""The admissions roster as a delta-state CRDT: a remove-wins token register per agent.

Design: /work/shared/notes/roster-crdt.md (sections 2-5); people's version: docs/spanner.md.

Semantics (Baquero's RWORSet, one element per agent). ``admit`` and ``revoke`` both discard
every token the writing bolt *observed* for the agent and add one fresh token; ``forget``
discards without adding. Whatever survives decides the status:

    no token                       -> Unknown
    any Revoke token               -> Revoked
    Admit tokens, one fingerprint  -> Admitted
    Admit tokens, several          -> Conflict  (resolved by a new admit or revoke, never here)

So a revoke beats every admit it did not see (they both survive), and an admit wins only if
its bolt had merged the revoke (it discarded the revoke's token). Time never decides: the HLC
in each token is for audit and display only.

Representation. The roster is 256 shards, each a complete CRDT with its own causal context
(``ShardState``). A dot ``(replica, counter)`` names every token; a context is a version vector
plus a dot cloud (dots not yet contiguous), folded into the vector as soon as they are. Dots
that were seen and then removed survive only in contexts: there are no per-token tombstones.

In memory a dot is one int, ``counter << REPLICA_BITS | replica_index``, where the replica
index comes from a process-wide intern table of replica ids. The table only grows (by one per
bolt incarnation ever seen, thousands per year) and makes dots 32-byte ints instead of nested
tuples. On the wire dots are ``(index into the message's replica table, counter)``.

Join (per agent, all against the *other* side's context, before the contexts merge):
keep a dot both sides hold; drop a one-sided dot the other context already contains (it was
seen there and removed); import a one-sided dot the local context lacks; merge contexts.

This module is the data type and its join. Its canonical bytes are ``vigo.roster.codec``, and a
replica's 256 shards with the mutators, digests and persistence are ``vigo.roster.roster``.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from vigo.errors import RosterError, RosterFormatError

__all__ = [
    "DIGEST_BYTES",
    "HLC_MAX_OFFSET_S",
    "SHARDS",
    "SHARD_HASH_KEY",
    "Admit",
    "CausalContext",
    "HybridClock",
    "ReplicaId",
    "Revoke",
    "ShardState",
    "State",
    "Status",
    "TokenView",
    "joined",
    "shard_of",
]

# Errors: RosterError, RosterFormatError(ValueError), RosterRefusedError, in vigo.errors.


# --- Constants ---------------------------------------------------------------------------------

#: Number of shards. Fixed: it is part of the wire format (every shard is its own CRDT and a
#: full-shard repair is a plain join), so peers with different counts cannot talk.
SHARDS = 256
#: Key of the agent -> shard hash: ``blake2b(agent_id utf-8, digest_size=8, key=this)`` read
#: big-endian, modulo SHARDS. Fixed and part of the format: a decoder refuses an agent that
#: arrives in a shard it does not hash to.
SHARD_HASH_KEY = b"vigo.roster.shard.v1"
#: Bytes of a shard digest (truncated SHA-256 of the canonical encoding). 128 bits make an
#: accidental match of two different shard states negligible; 256 digests fit in 4 KiB.
DIGEST_BYTES = 16
#: How far ahead of the local wall clock a remote HLC may be before it is refused as a reason
#: to move the local clock, seconds (CockroachDB's default maximum clock offset).
HLC_MAX_OFFSET_S = 0.5
#: Low bits of an HLC value that hold the logical counter; the rest is wall-clock milliseconds.
HLC_LOGICAL_BITS = 16
#: Low bits of an in-memory dot that hold the replica index: up to 2**20 distinct replica ids
#: (bolt incarnations) per process, centuries of daily restarts of a 20-bolt cluster.
REPLICA_BITS = 20
#: Longest agent id, bytes of UTF-8 (envoy ids are host names: 253 characters at most).
MAX_AGENT_ID_BYTES = 255
#: Longest bolt name, bytes of UTF-8 (Ray actor names are short; this bounds the wire size).
MAX_BOLT_NAME_BYTES = 255
#: Longest fingerprint, enrolment method or revoke reason code, bytes of UTF-8.
MAX_TEXT_BYTES = 255
#: Bytes of an incarnation id (a UUID4).
INCARNATION_BYTES = 16
#: Largest counter, HLC or not_after accepted on the wire (msgpack's signed 64-bit range).
MAX_WIRE_INT = 2**63 - 1

_REPLICA_MASK = (1 << REPLICA_BITS) - 1
_LOGICAL_MASK = (1 << HLC_LOGICAL_BITS) - 1


# --- Replica ids and their intern table ----------------------------------------------------------


class ReplicaId(NamedTuple):
    """Who wrote a dot: a bolt name plus a UUID drawn fresh at every actor construction.

    The incarnation is what keeps dots unique: a restarted bolt that reused ``(name, counter)``
    would mint dots its peers already hold as seen-and-removed, and they would discard its new
    tokens (the reason Akka's ``UniqueAddress`` carries a per-incarnation uid)."""

    bolt: str
    incarnation: bytes

    @classmethod
    def fresh(cls, bolt: str) -> ReplicaId:
        """A new incarnation of ``bolt``."""
        _check_text("bolt name", bolt, MAX_BOLT_NAME_BYTES)
        return cls(bolt, uuid.uuid4().bytes)

    def __str__(self) -> str:
        return f"{self.bolt}/{self.incarnation.hex()[:8]}"


_intern_lock = threading.Lock()
_replica_ids: list[ReplicaId] = []
_replica_index: dict[ReplicaId, int] = {}


def _intern(replica: ReplicaId) -> int:
    """The process-wide index of ``replica`` (assigned on first sight, never reused)."""
    index = _replica_index.get(replica)
    if index is not None:
        return index
    with _intern_lock:
        index = _replica_index.get(replica)
        if index is None:
            if len(_replica_ids) > _REPLICA_MASK:
                raise RosterError(
                    f"cannot intern replica {replica}: this process has already seen "
                    f"{len(_replica_ids)} replica ids, the most a dot can name is {_REPLICA_MASK + 1}"
                )
            index = len(_replica_ids)
            _replica_ids.append(replica)
            _replica_index[replica] = index
    return index


def _dot(index: int, counter: int) -> int:
    return counter << REPLICA_BITS | index


def dot_replica(dot: int) -> ReplicaId:
    """The replica that minted an in-memory dot."""
    return _replica_ids[dot & _REPLICA_MASK]


def dot_counter(dot: int) -> int:
    """The counter of an in-memory dot (1 for a replica's first token in a shard)."""
    return dot >> REPLICA_BITS


# --- Causal context --------------------------------------------------------------------------------


class CausalContext:
    """Every dot a shard state has seen: a version vector plus a cloud of non-contiguous dots.

    ``vector[i] = n`` means dots 1..n of replica index i were all seen. The cloud holds dots
    seen out of order (a lost or reordered delta); ``_compact`` folds them into the vector once
    the gap closes, so equal dot sets always have equal representations (canonical bytes)."""

    __slots__ = ("cloud", "vector")

    def __init__(self) -> None:
        self.vector: dict[int, int] = {}
        self.cloud: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.vector) or bool(self.cloud)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CausalContext):
            return NotImplemented
        return self.vector == other.vector and self.cloud == other.cloud

    def __repr__(self) -> str:
        vector = {str(_replica_ids[i]): n for i, n in sorted(self.vector.items())}
        cloud = sorted((str(dot_replica(d)), dot_counter(d)) for d in self.cloud)
        return f"CausalContext(vector={vector}, cloud={cloud})"

    def has(self, dot: int) -> bool:
        """Whether this context has seen ``dot``."""
        return (dot >> REPLICA_BITS) <= self.vector.get(dot & _REPLICA_MASK, 0) or dot in self.cloud

    def copy(self) -> CausalContext:
        twin = CausalContext()
        twin.vector = dict(self.vector)
        twin.cloud = set(self.cloud)
        return twin

    def merge(self, other: CausalContext) -> bool:
        """In place union with ``other``. Returns whether this context grew."""
        grew = False
        vector = self.vector
        for index, counter in other.vector.items():
            if counter > vector.get(index, 0):
                vector[index] = counter
                grew = True
        for dot in other.cloud:
            if not self.has(dot):
                self.cloud.add(dot)
                grew = True
        if grew and self.cloud:
            self._compact()
        return grew

    def _compact(self) -> None:
        """Fold cloud dots that became contiguous into the vector; drop those it covers.

        Sorting by the packed int orders by counter first, so a run of one replica's dots
        (n+1, n+2, ...) folds in a single pass."""
        vector = self.vector
        cloud = self.cloud
        for dot in sorted(cloud):
            index = dot & _REPLICA_MASK
            counter = dot >> REPLICA_BITS
            have = vector.get(index, 0)
            if counter <= have:
                cloud.discard(dot)
            elif counter == have + 1:
                vector[index] = counter
                cloud.discard(dot)

    def dots(self) -> Iterator[tuple[ReplicaId, int]]:
        """Every dot as ``(replica, counter)`` (for tests and debugging; the vector expands)."""
        for index, top in self.vector.items():
            for counter in range(1, top + 1):
                yield _replica_ids[index], counter
        for dot in self.cloud:
            yield dot_replica(dot), dot_counter(dot)


# --- Tokens -----------------------------------------------------------------------------------------
#
# Plain NamedTuples: a tuple's memory and no per-instance dict. Who wrote a token (bolt and
# incarnation) is its dot's replica, so it is not stored twice.


class Admit(NamedTuple):
    """An admission: the agent holds a certificate with this fingerprint."""

    dot: int
    #: The admitted certificate's fingerprint. vigo's form, a SHA-256 as 64 lowercase hex
    #: digits, is held (and sent) as its 32 raw bytes: half the memory. Any other text is kept
    #: as given. ``fingerprint_text`` gives it back as text either way.
    fingerprint: str | bytes
    #: Hybrid logical clock of the admission (audit and display only, never the outcome).
    hlc: int
    #: Certificate expiry, unix seconds; 0 when the admitting bolt did not say.
    not_after: int
    #: How the agent enrolled ("token", "renewal", ...), interned: a handful of distinct values.
    method: str

    @property
    def fingerprint_text(self) -> str:
        fp = self.fingerprint
        return fp.hex() if isinstance(fp, bytes) else fp


class Revoke(NamedTuple):
    """A revocation. Beats every admission its writer had not seen."""

    dot: int
    hlc: int
    #: Short reason code ("operator", "compromised", ...), interned.
    reason: str


Token = Admit | Revoke


def _tokens(value: Any) -> tuple[Token, ...]:
    """The tokens of an entry value.

    Almost every agent holds exactly one token, so an entry stores that token itself and
    only a contested agent stores a tuple of tokens (sorted by dot): it saves a 48-byte tuple
    per agent. ``type(...) is tuple`` tells them apart because tokens are tuple *subclasses*."""
    return value if type(value) is tuple else (value,)


def _entry(tokens: list[Token]) -> Any:
    """The entry value for a non-empty token list (see ``_tokens``)."""
    if len(tokens) == 1:
        return tokens[0]
    return tuple(sorted(tokens, key=_token_dot))


def _token_dot(token: Token) -> int:
    return token.dot


_SHA256_BYTES = 32
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _pack_fingerprint(fingerprint: str) -> str | bytes:
    """vigo's fingerprints (SHA-256 as 64 lowercase hex digits) as their 32 bytes; other text
    unchanged. Always applied, so one fingerprint has one representation (canonical bytes)."""
    return bytes.fromhex(fingerprint) if _SHA256_HEX.fullmatch(fingerprint) else fingerprint


# --- Status ------------------------------------------------------------------------------------------


class State(StrEnum):
    UNKNOWN = "unknown"
    ADMITTED = "admitted"
    REVOKED = "revoked"
    CONFLICT = "conflict"


class TokenView(NamedTuple):
    """One surviving token, for audit and ``vigocli``: who wrote it, when (HLC), what it says."""

    kind: str  # "admit" or "revoke"
    replica: ReplicaId
    counter: int
    hlc: int
    fingerprint: str | None  # admits only
    not_after: int | None  # admits only
    detail: str  # admit: enrolment method; revoke: reason code

    @property
    def wall_time_s(self) -> float:
        """The HLC's wall-clock part, unix seconds."""
        return (self.hlc >> HLC_LOGICAL_BITS) / 1000.0


@dataclass(frozen=True, slots=True)
class Status:
    """What the roster says about one agent at this replica."""

    state: State
    #: The admitted fingerprint when ``state`` is ADMITTED, else None.
    fingerprint: str | None
    #: Every surviving admission's fingerprint, sorted: the candidates of a CONFLICT, and what
    #: a REVOKED agent's revocation overrides.
    fingerprints: tuple[str, ...]
    tokens: tuple[TokenView, ...]

    @property
    def admitted(self) -> bool:
        return self.state is State.ADMITTED


_UNKNOWN = Status(State.UNKNOWN, None, (), ())


def _status(value: Any) -> Status:
    if value is None:
        return _UNKNOWN
    tokens = _tokens(value)
    fingerprints = tuple(sorted({t.fingerprint_text for t in tokens if type(t) is Admit}))
    views = tuple(_view(t) for t in tokens)
    if any(type(t) is Revoke for t in tokens):
        return Status(State.REVOKED, None, fingerprints, views)
    if len(fingerprints) == 1:
        return Status(State.ADMITTED, fingerprints[0], fingerprints, views)
    return Status(State.CONFLICT, None, fingerprints, views)


def _view(token: Token) -> TokenView:
    if type(token) is Admit:
        return TokenView("admit", dot_replica(token.dot), dot_counter(token.dot), token.hlc,
                         token.fingerprint_text, token.not_after, token.method)
    return TokenView("revoke", dot_replica(token.dot), dot_counter(token.dot), token.hlc,
                     None, None, token.reason)


# --- Shard state -----------------------------------------------------------------------------------


class ShardState:
    """One shard: a causal context shared by every token in it, and ``agent_id -> tokens``.

    Invariant: every token's dot is in ``ctx``. A delta is a ShardState too, whose context
    lists only the dots its mutator observed or created, which is what makes joining deltas
    in any order, any number of times, equal to joining the full states."""

    __slots__ = ("ctx", "entries", "shard")

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.ctx = CausalContext()
        # agent_id -> one token, or a tuple of >= 2 tokens sorted by dot (see _tokens).
        self.entries: dict[str, Any] = {}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardState):
            return NotImplemented
        return self.shard == other.shard and self.ctx == other.ctx and self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"ShardState(shard={self.shard}, agents={len(self.entries)}, ctx={self.ctx!r})"

    def __bool__(self) -> bool:
        """False for the bottom state (nothing seen), which a join cannot change anything with."""
        return bool(self.ctx) or bool(self.entries)

    def copy(self) -> ShardState:
        twin = ShardState(self.shard)
        twin.ctx = self.ctx.copy()
        twin.entries = dict(self.entries)  # values are immutable tokens / tuples
        return twin

    def tokens(self, agent_id: str) -> tuple[Token, ...]:
        value = self.entries.get(agent_id)
        return () if value is None else _tokens(value)

    def join(self, other: ShardState) -> bool:
        """In place ``self ⊔ other``. Returns whether ``self`` changed.

        Entries are decided against both contexts *before* they merge (see module docstring).
        Cost: every agent of ``self`` is looked at once, because any of them may hold a dot of
        ``other``'s context (a forget's delta names its agent only through dots): about 0.2 ms
        for a shard of 400 agents (100,000 in the roster). Local mutations skip this (see
        ``Roster._supersede``)."""
        if other.shard != self.shard:
            raise RosterError(
                f"cannot join shard {other.shard} into shard {self.shard}: a join needs the same shard"
            )
        mine, theirs = self.entries, other.entries
        my_ctx, their_ctx = self.ctx, other.ctx
        changed = False

        # Agents only on this side: drop tokens the other side has seen (and so removed).
        if their_ctx:
            has = their_ctx.has
            for agent_id in [a for a in mine if a not in theirs]:
                tokens = _tokens(mine[agent_id])
                keep = [t for t in tokens if not has(t.dot)]
                if len(keep) != len(tokens):
                    changed = True
                    if keep:
                        mine[agent_id] = _entry(keep)
                    else:
                        del mine[agent_id]

        # Agents on the other side.
        for agent_id, value in theirs.items():
            their_tokens = _tokens(value)
            current = mine.get(agent_id)
            if current is None:
                new = [t for t in their_tokens if not my_ctx.has(t.dot)]
                if new:
                    mine[agent_id] = _entry(new)
                    changed = True
                continue
            if current == value:
                continue
            my_tokens = _tokens(current)
            their_dots = {t.dot for t in their_tokens}
            my_dots = {t.dot for t in my_tokens}
            merged = [t for t in my_tokens if t.dot in their_dots or not their_ctx.has(t.dot)]
            merged += [t for t in their_tokens if t.dot not in my_dots and not my_ctx.has(t.dot)]
            if merged:
                entry = _entry(merged)
                if entry != current:
                    mine[agent_id] = entry
                    changed = True
            else:
                del mine[agent_id]
                changed = True

        return my_ctx.merge(their_ctx) or changed


def joined(*states: ShardState) -> ShardState:
    """A new state, the join of ``states`` (at least one, all of one shard)."""
    if not states:
        raise RosterError("cannot join nothing: joined() needs at least one shard state")
    result = states[0].copy()
    for state in states[1:]:
        result.join(state)
    return result


# --- Hybrid logical clock -----------------------------------------------------------------------------


class HybridClock:
    """An HLC, ``wall milliseconds << 16 | logical``, for audit and display order only.

    ``observe`` refuses to move the clock to a remote value more than ``max_offset_s`` ahead of
    the local wall clock (counted in ``rejected``): one bolt with a fast clock must not drag
    every bolt's timestamps into the future. The remote token itself is still merged, because
    no outcome depends on an HLC."""

    __slots__ = ("_last", "_max_offset_ms", "_wall", "rejected")

    def __init__(self, wall: Callable[[], float] = time.time, max_offset_s: float = HLC_MAX_OFFSET_S) -> None:
        self._wall = wall
        self._max_offset_ms = int(max_offset_s * 1000)
        self._last = 0
        self.rejected = 0

    def now(self) -> int:
        """A new HLC value, larger than every value issued or accepted before."""
        physical = int(self._wall() * 1000) << HLC_LOGICAL_BITS
        self._last = max(self._last + 1, physical)
        return self._last

    def observe(self, remote: int) -> bool:
        """Take a remote HLC into account. False if it is too far ahead and was ignored."""
        limit = ((int(self._wall() * 1000) + self._max_offset_ms) << HLC_LOGICAL_BITS) | _LOGICAL_MASK
        if remote > limit:
            self.rejected += 1
            return False
        if remote > self._last:
            self._last = remote
        return True


# --- Sharding ----------------------------------------------------------------------------------------


def shard_of(agent_id: str) -> int:
    """The shard of an agent: keyed blake2b-64 of its UTF-8 id, big-endian, mod SHARDS."""
    digest = hashlib.blake2b(agent_id.encode("utf-8"), digest_size=8, key=SHARD_HASH_KEY).digest()
    return int.from_bytes(digest, "big") % SHARDS


# --- Argument checks -----------------------------------------------------------------------------


def _check_agent(agent_id: Any) -> None:
    _check_text("agent id", agent_id, MAX_AGENT_ID_BYTES)


def _check_text(what: str, value: Any, limit: int, where: str = "roster") -> None:
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > limit:
        raise RosterFormatError(f"{where}: expected a {what} of 1..{limit} bytes of text, got {_show(value)}")


def _check_int(what: str, value: Any, where: str = "roster") -> None:
    if type(value) is not int or not 0 <= value <= MAX_WIRE_INT:
        raise RosterFormatError(f"{where}: expected {what} as an integer 0..2**63-1, got {_show(value)}")


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
