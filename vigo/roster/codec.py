"""Roster shard states as bytes: the canonical encoding, and a decoder that trusts nothing.

A shard state on the wire (msgpack array), replica ids replaced by indexes into a table:

    [shard, vector, cloud, entries]
    vector  = [ri, counter, ri, counter, ...]          one pair per replica, counter >= 1
    cloud   = [ri, counter, ...]                       dots seen out of order
    entries = [agent_id, [token, ...], agent_id, ...]
    token   = [0, ri, counter, fingerprint, hlc, not_after, method]    admit (a SHA-256
                                                                       hex fingerprint as
                                                                       its 32 raw bytes,
                                                                       see Admit)
            | [1, ri, counter, hlc, reason]                            revoke

Standalone bytes (``encode``): one FORMAT_VERSION byte, then msgpack ``[replicas, state]``
with ``replicas = [[bolt, incarnation(16 bytes)], ...]``. ``encode`` is canonical (replicas,
pairs, agents and tokens sorted) so equal states give equal bytes and equal digests. The sync
messages (``vigo.roster.messages``) carry shard states in this form, one replica table per
message. The codec reads and builds the in-memory representation of ``vigo.roster.crdt``
(packed dots, interned replica ids, one-token entries) directly, so it imports its internals.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import msgpack

from vigo.errors import RosterFormatError
from vigo.roster.crdt import (
    _REPLICA_MASK,
    _SHA256_BYTES,
    INCARNATION_BYTES,
    MAX_AGENT_ID_BYTES,
    MAX_BOLT_NAME_BYTES,
    MAX_TEXT_BYTES,
    MAX_WIRE_INT,
    REPLICA_BITS,
    SHARDS,
    Admit,
    ReplicaId,
    Revoke,
    ShardState,
    Token,
    _check_int,
    _check_text,
    _dot,
    _entry,
    _intern,
    _pack_fingerprint,
    _replica_ids,
    _show,
    _tokens,
    dot_counter,
    dot_replica,
    shard_of,
)

__all__ = [
    "FORMAT_VERSION",
    "WireTable",
    "decode",
    "encode",
    "replicas_from_wire",
    "state_from_wire",
    "state_to_wire",
    "unpack",
]

#: First byte of every encoded shard state. Bumped only for changes old peers cannot read.
FORMAT_VERSION = 1
#: First element of a wire token: which kind it is.
_TAG_ADMIT = 0
_TAG_REVOKE = 1


class WireTable:
    """Replica ids of one encoded message or state, by first use. Messages share one table
    across all their shard states, so a bolt's 30-byte id travels once per message."""

    __slots__ = ("_positions", "replicas")

    def __init__(self) -> None:
        self.replicas: list[ReplicaId] = []
        self._positions: dict[int, int] = {}

    def position(self, index: int) -> int:
        pos = self._positions.get(index)
        if pos is None:
            pos = self._positions[index] = len(self.replicas)
            self.replicas.append(_replica_ids[index])
        return pos

    def to_wire(self) -> list[list[Any]]:
        return [[r.bolt, r.incarnation] for r in self.replicas]


def state_to_wire(state: ShardState, table: WireTable) -> list[Any]:
    """A shard state as msgpack-ready lists, replica ids entered into ``table``."""
    pos = table.position
    vector: list[int] = []
    for index, counter in state.ctx.vector.items():
        vector += (pos(index), counter)
    cloud: list[int] = []
    for dot in state.ctx.cloud:
        cloud += (pos(dot & _REPLICA_MASK), dot >> REPLICA_BITS)
    entries: list[Any] = []
    for agent_id, value in state.entries.items():
        wire_tokens = []
        for t in _tokens(value):
            if type(t) is Admit:
                wire_tokens.append([_TAG_ADMIT, pos(t.dot & _REPLICA_MASK), t.dot >> REPLICA_BITS,
                                    t.fingerprint, t.hlc, t.not_after, t.method])
            else:
                wire_tokens.append([_TAG_REVOKE, pos(t.dot & _REPLICA_MASK), t.dot >> REPLICA_BITS,
                                    t.hlc, t.reason])
        entries += (agent_id, wire_tokens)
    return [state.shard, vector, cloud, entries]


def encode(state: ShardState) -> bytes:
    """Canonical standalone bytes of a shard state or delta."""
    # Canonical replica order: sort the ids, then number them.
    indexes = set(state.ctx.vector)
    indexes.update(d & _REPLICA_MASK for d in state.ctx.cloud)
    for value in state.entries.values():
        indexes.update(t.dot & _REPLICA_MASK for t in _tokens(value))
    table = WireTable()
    for index in sorted(indexes, key=_replica_ids.__getitem__):
        table.position(index)
    wire = state_to_wire(state, table)
    # Sort pairs, agents and tokens by their wire values (table positions are canonical now).
    wire[1] = _sorted_pairs(wire[1])
    wire[2] = _sorted_pairs(wire[2])
    pairs = sorted(zip(wire[3][::2], wire[3][1::2], strict=True), key=lambda p: p[0])
    wire[3] = [x for agent_id, tokens in pairs for x in (agent_id, sorted(tokens, key=lambda t: (t[1], t[2])))]
    return bytes((FORMAT_VERSION,)) + msgpack.packb([table.to_wire(), wire], use_bin_type=True)


def _sorted_pairs(flat: list[int]) -> list[int]:
    pairs = sorted(zip(flat[::2], flat[1::2], strict=True))
    return [x for pair in pairs for x in pair]


def decode(data: bytes) -> ShardState:
    """A shard state from ``encode`` bytes. Anything else raises RosterFormatError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RosterFormatError(f"cannot decode a roster shard: expected bytes, got {type(data).__name__}")
    if len(data) < 2:
        raise RosterFormatError(f"cannot decode a roster shard: expected at least 2 bytes, got {len(data)}")
    if data[0] != FORMAT_VERSION:
        raise RosterFormatError(
            f"cannot decode a roster shard: expected format version {FORMAT_VERSION}, got {data[0]}"
        )
    body = unpack(data[1:], "roster shard")
    if not isinstance(body, list) or len(body) != 2:
        raise RosterFormatError(
            f"cannot decode a roster shard: expected [replicas, state], got {_show(body)}"
        )
    return state_from_wire(body[1], replicas_from_wire(body[0]))


def unpack(data: bytes | memoryview, what: str) -> Any:
    """msgpack-decode ``data`` or raise RosterFormatError naming ``what`` was being decoded."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RosterFormatError(f"cannot decode a {what}: not valid msgpack ({exc})") from exc


def replicas_from_wire(obj: Any) -> list[int]:
    """A wire replica table as intern indexes."""
    if not isinstance(obj, list):
        raise RosterFormatError(f"roster replica table: expected a list, got {_show(obj)}")
    indexes = []
    for item in obj:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], bytes)
            or len(item[1]) != INCARNATION_BYTES
            or not item[0]
            or len(item[0].encode("utf-8")) > MAX_BOLT_NAME_BYTES
        ):
            raise RosterFormatError(
                f"roster replica table: expected [bolt name, {INCARNATION_BYTES}-byte incarnation], "
                f"got {_show(item)}"
            )
        indexes.append(_intern(ReplicaId(item[0], item[1])))
    return indexes


def state_from_wire(obj: Any, replicas: list[int]) -> ShardState:
    """A shard state from ``state_to_wire`` lists, checking every invariant a join relies on."""
    if not isinstance(obj, list) or len(obj) != 4:
        raise RosterFormatError(f"roster shard state: expected [shard, vector, cloud, entries], got {_show(obj)}")
    shard_no, vector, cloud, entries = obj
    if type(shard_no) is not int or not 0 <= shard_no < SHARDS:
        raise RosterFormatError(f"roster shard state: expected a shard number 0..{SHARDS - 1}, got {_show(shard_no)}")
    where = f"roster shard {shard_no}"
    state = ShardState(shard_no)

    def dot_at(flat: list[Any], i: int, what: str) -> tuple[int, int]:
        ri, counter = flat[i], flat[i + 1]
        if type(ri) is not int or not 0 <= ri < len(replicas):
            raise RosterFormatError(
                f"{where} {what}: expected a replica index 0..{len(replicas) - 1}, got {_show(ri)}"
            )
        if type(counter) is not int or not 1 <= counter <= MAX_WIRE_INT:
            raise RosterFormatError(f"{where} {what}: expected a counter >= 1, got {_show(counter)}")
        return replicas[ri], counter

    for name, flat in (("vector", vector), ("cloud", cloud)):
        if not isinstance(flat, list) or len(flat) % 2:
            raise RosterFormatError(f"{where} {name}: expected a flat list of pairs, got {_show(flat)}")
    for i in range(0, len(vector), 2):
        index, counter = dot_at(vector, i, "vector")
        if index in state.ctx.vector:
            raise RosterFormatError(f"{where} vector: replica {_replica_ids[index]} appears twice")
        state.ctx.vector[index] = counter
    for i in range(0, len(cloud), 2):
        state.ctx.cloud.add(_dot(*dot_at(cloud, i, "cloud")))
    state.ctx._compact()

    if not isinstance(entries, list) or len(entries) % 2:
        raise RosterFormatError(f"{where} entries: expected [agent_id, tokens, ...], got {_show(entries)}")
    seen_dots: set[int] = set()
    for i in range(0, len(entries), 2):
        agent_id, wire_tokens = entries[i], entries[i + 1]
        if not isinstance(agent_id, str) or not agent_id or len(agent_id.encode("utf-8")) > MAX_AGENT_ID_BYTES:
            raise RosterFormatError(f"{where}: expected an agent id (1..{MAX_AGENT_ID_BYTES} bytes), got {_show(agent_id)}")
        if shard_of(agent_id) != shard_no:
            raise RosterFormatError(
                f"{where}: agent {agent_id!r} hashes to shard {shard_of(agent_id)}; the sender "
                f"uses a different shard hash or shard count"
            )
        if agent_id in state.entries:
            raise RosterFormatError(f"{where}: agent {agent_id!r} appears twice")
        if not isinstance(wire_tokens, list) or not wire_tokens:
            raise RosterFormatError(f"{where} agent {agent_id!r}: expected a non-empty token list, got {_show(wire_tokens)}")
        tokens: list[Token] = []
        for wt in wire_tokens:
            token = _token_from_wire(wt, dot_at, f"{where} agent {agent_id!r}")
            if token.dot in seen_dots:
                raise RosterFormatError(f"{where} agent {agent_id!r}: dot {_dot_text(token.dot)} names two tokens")
            if not state.ctx.has(token.dot):
                raise RosterFormatError(
                    f"{where} agent {agent_id!r}: token dot {_dot_text(token.dot)} is missing from "
                    f"the shard's causal context; every token's dot must be in it"
                )
            seen_dots.add(token.dot)
            tokens.append(token)
        state.entries[agent_id] = _entry(tokens)
    return state


def _token_from_wire(wt: Any, dot_at: Callable[[list[Any], int, str], tuple[int, int]], where: str) -> Token:
    if isinstance(wt, list) and len(wt) == 7 and wt[0] == _TAG_ADMIT:
        index, counter = dot_at(wt, 1, "admit token")
        _, _, _, fingerprint, hlc, not_after, method = wt
        if isinstance(fingerprint, bytes):
            if len(fingerprint) != _SHA256_BYTES:
                raise RosterFormatError(
                    f"{where}: expected a binary fingerprint of {_SHA256_BYTES} bytes, got {len(fingerprint)}"
                )
        else:
            _check_text("fingerprint", fingerprint, MAX_TEXT_BYTES, where)
            fingerprint = _pack_fingerprint(fingerprint)
        _check_int("hlc", hlc, where)
        _check_int("not_after", not_after, where)
        _check_text("enrolment method", method, MAX_TEXT_BYTES, where)
        return Admit(_dot(index, counter), fingerprint, hlc, not_after, sys.intern(method))
    if isinstance(wt, list) and len(wt) == 5 and wt[0] == _TAG_REVOKE:
        index, counter = dot_at(wt, 1, "revoke token")
        _, _, _, hlc, reason = wt
        _check_int("hlc", hlc, where)
        _check_text("revoke reason", reason, MAX_TEXT_BYTES, where)
        return Revoke(_dot(index, counter), hlc, sys.intern(reason))
    raise RosterFormatError(
        f"{where}: expected a token [0, ri, counter, fingerprint, hlc, not_after, method] or "
        f"[1, ri, counter, hlc, reason], got {_show(wt)}"
    )


def _dot_text(dot: int) -> str:
    return f"({dot_replica(dot)}, {dot_counter(dot)})"
