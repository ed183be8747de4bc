"""The archive's layout: what every object under a target is called, and reading it back.

The archiver writes these names, restore and retention read them; both ask this module, so the
names are made and parsed in one place. Positions and times are in names and metadata, never in
modification times (a target may not keep them):

    <partition>/generations/<gen>/generation.json
    <partition>/generations/<gen>/snapshots/<index:08x>.db
    <partition>/generations/<gen>/wal/<index:08x>/<start:016x>-<end:016x>.seg

The targets (file, s3) know nothing of it: they store keys.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("vigo.snapshots.layout")

_GENERATIONS = "generations"
_SNAP = re.compile(r"/snapshots/(?P<index>[0-9a-f]{8})\.db$")
_WAL = re.compile(r"/wal/(?P<index>[0-9a-f]{8})/(?P<start>[0-9a-f]{16})-(?P<end>[0-9a-f]{16})\.seg$")


# --- names ------------------------------------------------------------------------------------


def generations_prefix(partition: str) -> str:
    """Everything archived for ``partition`` lives under this prefix (it ends with a slash)."""
    return f"{partition}/{_GENERATIONS}/"


def generation_prefix(partition: str, generation: str) -> str:
    return f"{generations_prefix(partition)}{generation}"


def generation_record_key(partition: str, generation: str) -> str:
    """The generation's record (JSON: creation time, term, first index): what orders generations."""
    return f"{generation_prefix(partition, generation)}/generation.json"


def snapshot_key(partition: str, generation: str, index: int) -> str:
    return f"{generation_prefix(partition, generation)}/snapshots/{index:08x}.db"


def wal_prefix(partition: str, generation: str) -> str:
    """The prefix of a generation's WAL objects (it ends with a slash)."""
    return f"{generation_prefix(partition, generation)}/wal/"


def segment_key(partition: str, generation: str, index: int, start: int, end: int) -> str:
    return f"{wal_prefix(partition, generation)}{index:08x}/{start:016x}-{end:016x}.seg"


# --- parsing ----------------------------------------------------------------------------------


def parse_snapshot_key(key: str) -> int | None:
    """The index of a snapshot object's key, None for any other key."""
    m = _SNAP.search(key)
    return None if m is None else int(m["index"], 16)


def parse_segment_key(key: str) -> tuple[int, int, int] | None:
    """(index, start, end) of a WAL object's key, None for any other key."""
    m = _WAL.search(key)
    return None if m is None else (int(m["index"], 16), int(m["start"], 16), int(m["end"], 16))


# --- listing ----------------------------------------------------------------------------------


@dataclass
class SnapInfo:
    key: str
    index: int
    size: int
    created_at: float = 0.0


@dataclass
class WalInfo:
    key: str
    index: int
    start: int
    end: int
    size: int


@dataclass
class GenerationInfo:
    generation: str
    created_at: float
    term: int
    snapshots: list[SnapInfo] = field(default_factory=list)
    wal: list[WalInfo] = field(default_factory=list)


def list_partitions(target: Any) -> list[str]:
    """The partitions that have anything archived at ``target``, sorted."""
    return sorted({o.key.split("/", 1)[0] for o in target.list("") if f"/{_GENERATIONS}/" in o.key})


def list_generations(target: Any, partition: str, *, with_snapshot_times: bool = True) -> list[GenerationInfo]:
    """Every generation of ``partition`` in the archive, oldest first (by recorded creation time)."""
    prefix = generations_prefix(partition)
    by_gen: dict[str, GenerationInfo] = {}
    for obj in target.list(prefix):
        gen = obj.key[len(prefix):].split("/", 1)[0]
        info = by_gen.setdefault(gen, GenerationInfo(gen, 0.0, 0))
        if (index := parse_snapshot_key(obj.key)) is not None:
            info.snapshots.append(SnapInfo(obj.key, index, obj.size))
        elif (wal := parse_segment_key(obj.key)) is not None:
            info.wal.append(WalInfo(obj.key, *wal, obj.size))
    out = []
    for gen, info in by_gen.items():
        try:
            meta = json.loads(target.get(generation_record_key(partition, gen)))
            info.created_at, info.term = float(meta["created_at"]), int(meta.get("term", 0))
        except Exception as exc:  # a generation without its record cannot be ordered: skip it, say so
            log.warning("archive generation %s has no readable generation.json (%s); skipped", gen, exc)
            continue
        info.snapshots.sort(key=lambda s: s.index)
        info.wal.sort(key=lambda w: (w.index, w.start, w.end))
        if with_snapshot_times:
            for snap in info.snapshots:
                head = target.head(snap.key)
                snap.created_at = int((head.metadata if head else {}).get("created-ms", 0)) / 1000
        out.append(info)
    out.sort(key=lambda g: g.created_at)
    return out
