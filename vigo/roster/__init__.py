"""The spanner admissions roster: a delta CRDT replicated between write-equal bolts.

Plain Python, no Ray: the bolt actor wraps a ``Replica`` (roster + replication engine) and an
``Ownership`` (which envoys it serves) and moves their messages. Design: docs/spanner.md.

    crdt.py       dots, causal contexts, tokens, shard states and their join, the HLC, sharding
    codec.py      canonical bytes of a shard state, and the checking decoder
    roster.py     one replica's 256 shards: mutators, status, cached digests, dump/load
    messages.py   the five sync messages (push, ack, digest, repair, supply) as bytes
    peers.py      what a replica knows of each peer: acks, in-flight pushes, gaps, repairs
    sync.py       the Replica engine: delta log, push/ack, digest anti-entropy, initial pull, stats
    ownership.py  rendezvous hashing of envoys over live bolts, damped liveness
    sim.py        a seeded virtual-time network of replicas (tests, benchmarks)
"""

from vigo.roster.codec import decode, encode
from vigo.roster.crdt import (
    SHARDS,
    Admit,
    CausalContext,
    ReplicaId,
    Revoke,
    ShardState,
    State,
    Status,
    TokenView,
    joined,
    shard_of,
)
from vigo.roster.messages import Message, decode_message
from vigo.roster.ownership import Ownership, OwnershipConfig, rank, weight
from vigo.roster.roster import Roster
from vigo.roster.sync import Outbound, Replica, Snapshot, SyncConfig, Write

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
