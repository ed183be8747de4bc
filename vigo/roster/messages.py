"""The roster sync messages: their kinds, their bytes, and a decoder that checks every field.

Five kinds travel between the ``Replica`` engines of ``vigo.roster.sync``: **push** (deltas
``(lo, hi]`` of the sender's log), **ack** (the highest contiguous seq received), **digest**
(the sender's seq and a digest of each shard), **repair** (the answer to a digest: differing
shards, and the ones wanted back) and **supply** (those wanted shards). Shard states inside them
are in the format of ``vigo.roster.codec``, with one replica table per message. Fields per kind:
``Message``; bytes: ``decode_message``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from vigo.errors import RosterFormatError
from vigo.roster.codec import WireTable, replicas_from_wire, state_from_wire, state_to_wire, unpack
from vigo.roster.crdt import (
    DIGEST_BYTES,
    INCARNATION_BYTES,
    MAX_BOLT_NAME_BYTES,
    MAX_WIRE_INT,
    SHARDS,
    ReplicaId,
    ShardState,
    _show,
)

__all__ = [
    "ACK",
    "DIGEST",
    "MESSAGE_TYPES",
    "MESSAGE_VERSION",
    "PUSH",
    "REPAIR",
    "SUPPLY",
    "Message",
    "decode_message",
    "differing_shards",
    "encode_message",
]

#: First byte of every sync message. Bumped only for changes old peers cannot read.
MESSAGE_VERSION = 1
#: Message types, the "t" field.
PUSH, ACK, DIGEST, REPAIR, SUPPLY = "push", "ack", "digest", "repair", "supply"
MESSAGE_TYPES = (PUSH, ACK, DIGEST, REPAIR, SUPPLY)


@dataclass
class Message:
    """A decoded sync message. Fields beyond ``kind`` and ``sender`` depend on the kind:

    ========  ===========================================================================
    push      ``lo``, ``hi``: it carries every sender delta with lo < seq <= hi;
              ``states``: one delta interval (or full shard) per touched shard
    ack       ``origin``: the acked incarnation of the receiver; ``upto``
    digest    ``seq``: the sender's last sequence number; ``digests``: SHARDS * 16 bytes
    repair    ``seq`` (the replier's), ``ref`` (the digest's seq), ``mismatch`` (every
              differing shard), ``want`` (shards to supply back), ``ready``, ``states``
    supply    ``ref`` (the digest's seq), ``states``
    ========  ===========================================================================
    """

    kind: str
    sender: ReplicaId
    lo: int = 0
    hi: int = 0
    origin: bytes = b""
    upto: int = 0
    seq: int = 0
    ref: int = 0
    digests: bytes = b""
    mismatch: list[int] = field(default_factory=list)
    want: list[int] = field(default_factory=list)
    ready: bool = True
    states: list[ShardState] = field(default_factory=list)


def encode_message(kind: str, sender: ReplicaId, body: dict[str, Any], states: Iterable[ShardState] = ()) -> bytes:
    table = WireTable()
    wire_states = [state_to_wire(s, table) for s in states]
    body = {"t": kind, "f": [sender.bolt, sender.incarnation], **body}
    if kind in (PUSH, REPAIR, SUPPLY):
        body["r"] = table.to_wire()
        body["s"] = wire_states
    return bytes((MESSAGE_VERSION,)) + msgpack.packb(body, use_bin_type=True)


def decode_message(data: bytes) -> Message:
    """Decode and check one sync message.

    Bytes: one MESSAGE_VERSION byte, then a msgpack map with ``"t"`` (kind), ``"f"`` (sender
    ``[bolt, incarnation]``) and per kind: push ``lo, hi, r, s``; ack ``o, u``; digest
    ``q, d``; repair ``q, ref, m, w, rd, r, s``; supply ``ref, r, s`` — ``r`` being the replica
    table and ``s`` shard states in the format of ``vigo.roster.crdt`` (one table per message).
    Anything else raises RosterFormatError saying what was expected and what arrived."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < 2:
        raise RosterFormatError(f"cannot decode a roster sync message: expected bytes, got {_show(data)}")
    if data[0] != MESSAGE_VERSION:
        raise RosterFormatError(
            f"cannot decode a roster sync message: expected version {MESSAGE_VERSION}, got {data[0]}"
        )
    body = unpack(data[1:], "roster sync message")
    if not isinstance(body, dict) or body.get("t") not in MESSAGE_TYPES:
        raise RosterFormatError(
            f"roster sync message: expected a map with t in {MESSAGE_TYPES}, got {_show(body)}"
        )
    kind = body["t"]
    sender = body.get("f")
    if (
        not isinstance(sender, list)
        or len(sender) != 2
        or not isinstance(sender[0], str)
        or not sender[0]
        or len(sender[0].encode("utf-8")) > MAX_BOLT_NAME_BYTES
        or not isinstance(sender[1], bytes)
        or len(sender[1]) != INCARNATION_BYTES
    ):
        raise RosterFormatError(f"roster {kind} message: expected f = [bolt name, 16-byte incarnation], got {_show(sender)}")
    msg = Message(kind, ReplicaId(sender[0], sender[1]))

    def number(key: str) -> int:
        value = body.get(key)
        if type(value) is not int or not 0 <= value <= MAX_WIRE_INT:
            raise RosterFormatError(f"roster {kind} message: expected {key} as an integer >= 0, got {_show(value)}")
        return value

    def shard_list(key: str) -> list[int]:
        value = body.get(key)
        if not isinstance(value, list) or any(type(i) is not int or not 0 <= i < SHARDS for i in value):
            raise RosterFormatError(f"roster {kind} message: expected {key} as a list of shard numbers, got {_show(value)}")
        return value

    if kind == PUSH:
        msg.lo, msg.hi = number("lo"), number("hi")
        if msg.lo >= msg.hi:
            raise RosterFormatError(f"roster push message: expected lo < hi, got lo={msg.lo} hi={msg.hi}")
    elif kind == ACK:
        msg.upto = number("u")
        origin = body.get("o")
        if not isinstance(origin, bytes) or len(origin) != INCARNATION_BYTES:
            raise RosterFormatError(f"roster ack message: expected o as a 16-byte incarnation, got {_show(origin)}")
        msg.origin = origin
    elif kind == DIGEST:
        msg.seq = number("q")
        digests = body.get("d")
        if not isinstance(digests, bytes) or len(digests) != SHARDS * DIGEST_BYTES:
            raise RosterFormatError(
                f"roster digest message: expected d as {SHARDS * DIGEST_BYTES} bytes, got {_show(digests)}"
            )
        msg.digests = digests
    elif kind == REPAIR:
        msg.seq, msg.ref = number("q"), number("ref")
        msg.mismatch, msg.want = shard_list("m"), shard_list("w")
        if type(body.get("rd")) is not bool:
            raise RosterFormatError(f"roster repair message: expected rd as a boolean, got {_show(body.get('rd'))}")
        msg.ready = body["rd"]
    else:
        msg.ref = number("ref")
    if kind in (PUSH, REPAIR, SUPPLY):
        replicas = replicas_from_wire(body.get("r"))
        states = body.get("s")
        if not isinstance(states, list):
            raise RosterFormatError(f"roster {kind} message: expected s as a list of shard states, got {_show(states)}")
        msg.states = [state_from_wire(s, replicas) for s in states]
    return msg



def differing_shards(theirs: bytes, mine: bytes) -> list[int]:
    """The shards whose digests differ between two digest strings (SHARDS * DIGEST_BYTES each)."""
    return [
        i for i in range(SHARDS)
        if theirs[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] != mine[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]
    ]
