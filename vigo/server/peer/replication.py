"""The primary's end of peer replication, without Ray: ``ReplicationLog``, a stream consumer that
keeps what its standbys still need (the standby's end is vigo.server.peer.standby). The member
actor (vigo/actors/member.py) only moves messages between the two.

Every sealed segment is kept in memory until every standby has acknowledged it (bounded by
``max_lag_bytes``: a standby further behind is sent a fresh snapshot instead). A sender thread
asks ``work_for(standby)`` for the next message (the segments after that standby's
acknowledged position, batched, or a snapshot in chunks), sends it, and hands the reply to
``on_reply``. One message in flight per standby keeps them in order; receivers are idempotent
by position anyway. Synchronous mode waits in ``wait_acked`` until enough standbys hold a
position before a write is acknowledged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vigo.state.stream import Segment, Snapshot

log = logging.getLogger("vigo.server.peer.replication")

#: Most WAL bytes carried by one replication message.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Snapshot bytes per message (a 200 MB database is 25 messages).
SNAPSHOT_CHUNK_BYTES = 8 * 1024 * 1024


def _pos_key(pos: tuple[str, int, int] | list | None) -> tuple[int, int]:
    return (-1, -1) if pos is None else (int(pos[1]), int(pos[2]))


@dataclass
class StandbyTrack:
    name: str
    acked: tuple[str, int, int] | None = None
    acked_at: float = 0.0
    committed_at: float = 0.0  # primary clock time of the last transaction the standby holds
    needs_snapshot: bool = True  # until it proves its position with a first reply
    snapshot_sending: tuple[str, int] | None = None
    snapshot_offset: int = 0
    in_sync: bool = False
    last_error: str | None = None
    resyncs: int = 0
    probed: bool = False


@dataclass
class Work:
    kind: str  # "segments" | "snapshot" | "probe"
    segments: list[Segment] = field(default_factory=list)
    snapshot: Snapshot | None = None
    offset: int = 0
    data: bytes = b""
    end: tuple[str, int, int] | None = None


class ReplicationLog:
    def __init__(self, standbys: list[str], *, max_lag_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.time) -> None:
        self.tracks = {name: StandbyTrack(name) for name in standbys}
        self.max_lag_bytes = max_lag_bytes
        self.clock = clock
        self.segments: deque[Segment] = deque()
        self.bytes = 0
        self.generation: str | None = None
        self.head: tuple[str, int, int] | None = None  # the newest sealed position
        self.head_at = 0.0
        self.snapshot: Snapshot | None = None
        self.snapshot_wanted = False  # asks the primary's upkeep for a fresh snapshot
        #: Everything after this (index, offset) of the current generation is in ``segments``.
        self.floor: tuple[int, int] | None = None
        self.index_ends: dict[int, int] = {}  # where closed indexes ended: (i, end) == (i + 1, 0)
        self._cond = threading.Condition()

    def _norm(self, pos: tuple[int, int]) -> tuple[int, int]:
        index, offset = pos
        if self.index_ends.get(index) == offset:
            return (index + 1, 0)
        return pos

    def _new_generation(self, generation: str, floor: tuple[int, int] | None) -> None:
        self.segments.clear()
        self.bytes = 0
        self.generation = generation
        self.floor = floor
        self.index_ends = {}

    # --- the stream consumer (primary thread) ---------------------------------------------------

    def on_segment(self, seg: Segment) -> None:
        with self._cond:
            if seg.generation != self.generation:
                self._new_generation(seg.generation, None)
            if seg.closes is not None:
                self.index_ends[seg.index - 1] = seg.closes
            if self.floor is None:
                self.floor = (seg.index, seg.start)
            self.segments.append(seg)
            self.bytes += len(seg.data)
            self.head, self.head_at = (seg.generation, seg.index, seg.end), seg.committed_at
            self._trim()
            self._cond.notify_all()

    def on_snapshot(self, snap: Snapshot) -> None:
        with self._cond:
            if snap.generation != self.generation:
                self._new_generation(snap.generation, (snap.index, 0))
            self.snapshot = snap
            self.snapshot_wanted = False
            if self.head is None or self.head[0] != snap.generation:
                self.head, self.head_at = (snap.generation, snap.index, 0), snap.created_at
            self._cond.notify_all()

    def flush(self) -> None:
        """Nothing to make durable: a standby that misses segments is resent them or a snapshot."""

    def _trim(self) -> None:
        """Drop segments every standby has, and the oldest ones past the memory bound."""
        floor = min((_pos_key(t.acked) for t in self.tracks.values()
                     if t.acked and t.acked[0] == self.generation), default=None)
        lagging = any(not t.acked or t.acked[0] != self.generation for t in self.tracks.values())
        while self.segments:
            first = self.segments[0]
            fully_acked = floor is not None and not lagging and (first.index, first.end) <= floor
            if not fully_acked and self.bytes <= self.max_lag_bytes:
                break
            self.segments.popleft()
            self.bytes -= len(first.data)
            self.floor = (first.index, first.end)

    # --- the sender (its own thread) ----------------------------------------------------------

    def work_for(self, name: str) -> Work | None:
        with self._cond:
            t = self.tracks[name]
            if not t.probed:
                return Work("probe")
            if t.needs_snapshot:
                return self._snapshot_work(t)
            if t.acked is None or t.acked[0] != self.generation:
                t.needs_snapshot = True
                return self._snapshot_work(t)
            batch, size = [], 0
            pos = self._norm(_pos_key(t.acked))
            if self.floor is not None and pos < self._norm(self.floor):
                # What it needs next was dropped (it fell too far behind): resync by snapshot.
                log.warning("standby %s is behind what the primary keeps (at %s): sending a fresh snapshot", name, t.acked)
                t.needs_snapshot = True
                t.resyncs += 1
                return self._snapshot_work(t)
            for seg in self.segments:
                if (seg.index, seg.end) <= pos:
                    continue
                if batch and size + len(seg.data) > MAX_MESSAGE_BYTES:
                    break
                batch.append(seg)
                size += len(seg.data)
            if not batch:
                return None
            last = batch[-1]
            return Work("segments", segments=batch, end=(last.generation, last.index, last.end))

    def _snapshot_work(self, t: StandbyTrack) -> Work | None:
        snap = self.snapshot
        usable = snap is not None and snap.generation == self.generation and self._covers_from(snap)
        if not usable:
            self.snapshot_wanted = True
            return None
        assert snap is not None
        if t.snapshot_sending != (snap.generation, snap.index):
            t.snapshot_sending, t.snapshot_offset = (snap.generation, snap.index), 0
        with open(snap.path, "rb") as f:  # the stream may unlink it later; an open file stays readable
            f.seek(t.snapshot_offset)
            data = f.read(SNAPSHOT_CHUNK_BYTES)
        return Work("snapshot", snapshot=snap, offset=t.snapshot_offset, data=data)

    def _covers_from(self, snap: Snapshot) -> bool:
        """Every segment after the snapshot is still kept (nothing after it was dropped)."""
        return self.floor is None or self._norm(self.floor) <= (snap.index, 0)

    def on_reply(self, name: str, work: Work, reply: dict[str, Any]) -> None:
        with self._cond:
            t = self.tracks[name]
            t.probed = True
            status = reply.get("status")
            pos = reply.get("position")
            t.last_error = reply.get("reason") if status not in ("ok",) else None
            if status == "need_snapshot" or (status == "ok" and pos is None):
                if not t.needs_snapshot:
                    t.resyncs += 1
                    log.warning("standby %s needs a snapshot: %s", name, reply.get("reason") or "no position")
                t.needs_snapshot = True
            elif status in ("ok", "gap"):
                if work.kind == "snapshot" and status == "ok" and pos is None:
                    pass
                elif work.kind == "snapshot" and reply.get("snapshot_offset") is not None:
                    t.snapshot_offset = int(reply["snapshot_offset"])
                if pos is not None:
                    t.acked = (pos[0], int(pos[1]), int(pos[2]))
                    t.acked_at = self.clock()
                    t.committed_at = float(reply.get("committed_at") or 0.0)
                    t.needs_snapshot = t.acked[0] != self.generation
                    if not t.needs_snapshot:
                        t.snapshot_sending, t.snapshot_offset = None, 0
            elif status == "fenced":
                log.error("standby %s refused replication: it has seen term %s (this primary is fenced)",
                          name, reply.get("term"))
            t.in_sync = t.acked is not None and self.head is not None and _pos_key(t.acked) >= _pos_key(self.head) \
                and t.acked[0] == self.head[0]
            self._trim()
            self._cond.notify_all()

    def on_failure(self, name: str, error: str) -> None:
        with self._cond:
            t = self.tracks[name]
            if t.last_error != error:
                log.warning("replication to standby %s failed: %s", name, error)
            t.last_error = error
            t.in_sync = False
            t.probed = False  # ask for its position again once it answers

    # --- synchronous mode -----------------------------------------------------------------------

    def acked_by(self, position: tuple[str, int, int] | None) -> int:
        if position is None:
            return len(self.tracks)
        return sum(1 for t in self.tracks.values()
                   if t.acked and t.acked[0] == position[0] and _pos_key(t.acked) >= _pos_key(position))

    def wait_acked(self, position: tuple[str, int, int] | None, count: int, timeout_s: float) -> bool:
        """Block until ``count`` standbys hold ``position`` (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.acked_by(position) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_for_work(self, timeout_s: float) -> None:
        with self._cond:
            self._cond.wait(timeout_s)

    # --- status ---------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        with self._cond:
            out = []
            for t in self.tracks.values():
                lag_bytes = sum(len(s.data) for s in self.segments
                                if t.acked is None or t.acked[0] != s.generation or (s.index, s.end) > _pos_key(t.acked))
                behind = [s for s in self.segments if t.acked and t.acked[0] == s.generation
                          and (s.index, s.end) > _pos_key(t.acked)]
                lag_commits = sum(1 for s in behind for c in s.commits if (s.index, c[0]) > _pos_key(t.acked))
                lag_s = max(0.0, self.clock() - behind[0].commits[0][2]) if behind else 0.0
                if t.acked is None or (self.head and t.acked[0] != self.head[0]):
                    lag_s = max(0.0, self.clock() - t.committed_at) if t.committed_at else None
                out.append({
                    "name": t.name, "position": list(t.acked) if t.acked else None, "in_sync": t.in_sync,
                    "lag_bytes": lag_bytes, "lag_commits": lag_commits,
                    "lag_s": None if lag_s is None else round(lag_s, 3),
                    "acked_at": t.acked_at or None, "needs_snapshot": t.needs_snapshot, "resyncs": t.resyncs,
                    "last_error": t.last_error,
                })
            return out
