"""The spanner admissions roster: a delta CRDT replicated between write-equal bolts.

Plain Python, no Ray: the bolt actor wraps a ``Replica`` (roster + replication engine) and an
``Ownership`` (which envoys it serves) and moves their messages. Design: docs/spanner.md.

    crdt.py       dots, causal contexts, shard states, the remove-wins roster, encoding
    sync.py       delta log, push/ack, digest anti-entropy, initial pull, stats
    ownership.py  rendezvous hashing of envoys over live bolts, damped liveness
    sim.py        a seeded virtual-time network of replicas (tests, benchmarks)
"""

from vigo.roster.crdt import (
    SHARDS,
    Admit,
    CausalContext,
    ReplicaId,
    Revoke,
    Roster,
    ShardState,
    State,
    Status,
    TokenView,
    decode,
    encode,
    joined,
    shard_of,
)
from vigo.roster.ownership import Ownership, OwnershipConfig, rank, weight
from vigo.roster.sync import Message, Outbound, Replica, Snapshot, SyncConfig, Write, decode_message

__all__ = [
    "SHARDS",
    "Admit",
    "CausalContext",
    "Message",
    "Outbound",
    "Ownership",
    "OwnershipConfig",
    "Replica",
    "ReplicaId",
    "Revoke",
    "Roster",
    "ShardState",
    "Snapshot",
    "State",
    "Status",
    "SyncConfig",
    "TokenView",
    "Write",
    "decode",
    "decode_message",
    "encode",
    "joined",
    "rank",
    "shard_of",
    "weight",
]
