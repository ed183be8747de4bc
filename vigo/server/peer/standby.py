"""A standby's end of peer replication, without Ray: ``StandbyCore`` applies what the primary's
``ReplicationLog`` (vigo.server.peer.replication) sends and answers where it now is.

Segments are applied with the same applier restore uses (byte-identical to the primary at the
applied position), trees are materialised after each batch, and every message carries the
sender's term: a lower term than the standby has seen is refused (fencing). The member actor
(vigo/actors/member.py) only moves messages between the two ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from vigo.durable import OPEN_MODE, atomic_write, fsync_path
from vigo.errors import CorruptSegment, NeedSnapshot, StreamGap
from vigo.state.apply import Applier
from vigo.state.store import read_trees, write_tree_file
from vigo.state.stream import Segment

log = logging.getLogger("vigo.server.peer.standby")


class StandbyCore:
    """A standby's data dir: the applier, the term it has seen, and the materialised trees."""

    def __init__(self, data_dir: Path | str, name: str = "standby") -> None:
        self.data_dir = Path(data_dir)
        self.name = name
        (self.data_dir / "stream").mkdir(mode=0o700, parents=True, exist_ok=True)
        self.applier = Applier(self.data_dir / "state.db", self.data_dir / "stream" / "apply.json")
        self._term_path = self.data_dir / "stream" / "standby.json"
        try:
            self.term = int(json.loads(self._term_path.read_text())["term"])
        except (FileNotFoundError, ValueError, KeyError):
            self.term = 0
        self._tree_sha: dict[tuple[str, str], str] | None = None
        self._incoming: Path = self.data_dir / "stream" / "incoming-snapshot.db"

    def _save_term(self) -> None:
        # fsynced: a term lost in a crash would let a fenced (older) primary's stream in again.
        atomic_write(self._term_path, json.dumps({"term": self.term}).encode(), mode=OPEN_MODE,
                     tmp=self._term_path.with_suffix(".tmp"))

    def observe_term(self, term: int) -> bool:
        """Record a higher term; False if ``term`` is lower than one already seen (fenced sender)."""
        if term < self.term:
            return False
        if term > self.term:
            self.term = term
            self._save_term()
        return True

    def reply(self, status: str = "ok", **extra: Any) -> dict[str, Any]:
        st = self.applier.state
        return {"status": status, "position": list(self.applier.position()) if st else None,
                "committed_at": st.committed_at if st else None, "term": self.term, **extra}

    def receive_segments(self, segments: list[Segment], term: int) -> dict[str, Any]:
        if not self.observe_term(term):
            return self.reply("fenced", reason=f"segments at term {term}, this standby has seen term {self.term}")
        applied = 0
        try:
            for seg in segments:
                if self.applier.accept(seg, durable=False):
                    applied += 1
        except NeedSnapshot as exc:
            return self.reply("need_snapshot", reason=str(exc))
        except StreamGap as exc:
            return self.reply("gap", reason=str(exc))
        except CorruptSegment as exc:
            log.error("standby %s: %s; asking for a snapshot", self.name, exc)
            self.applier.forget()
            return self.reply("need_snapshot", reason=str(exc))
        finally:
            if applied:
                self._sync()
        if applied:
            self.materialise()
        return self.reply()

    def _sync(self) -> None:
        """One fsync per message (not per segment): the ack below means it is on disk."""
        fsync_path(self.data_dir / "state.db")
        self.applier._save(durable=True)

    def receive_snapshot_chunk(self, *, generation: str, index: int, offset: int, data: bytes, size: int,
                               sha256: str, term: int, created_at: float) -> dict[str, Any]:
        if not self.observe_term(term):
            return self.reply("fenced", reason=f"snapshot at term {term}, this standby has seen term {self.term}")
        have = self._incoming.stat().st_size if self._incoming.exists() else 0
        if offset == 0:
            have = 0
            self._incoming.unlink(missing_ok=True)
        if offset != have:
            return self.reply("ok", snapshot_offset=have)  # resend from what arrived
        with open(self._incoming, "ab") as f:
            f.write(data)
        have += len(data)
        if have < size:
            return self.reply("ok", snapshot_offset=have)
        digest = _sha256_file(self._incoming)
        if digest != sha256:
            self._incoming.unlink(missing_ok=True)
            return self.reply("need_snapshot", reason=f"snapshot {generation}/{index:08x} arrived with sha256 "
                                                      f"{digest[:16]}, expected {sha256[:16]}")
        previous = self.applier.position()
        self.applier.install_snapshot(self._incoming, generation, index, term=term, created_at=created_at, move=True)
        log.info("standby %s installed snapshot %s/%08x (%d bytes), replacing %s", self.name, generation, index,
                 size, previous or "nothing")
        self._tree_sha = None
        self.materialise()
        return self.reply()

    def materialise(self) -> int:
        """Write the trees that changed in the database since the last call."""
        rows = read_trees(self.data_dir / "state.db")
        known = self._tree_sha or {}
        written = 0
        for (tree, path), (sha, content, mode) in rows.items():
            if known.get((tree, path)) != sha:
                try:
                    write_tree_file(self.data_dir, tree, path, content, mode)
                    written += 1
                except OSError as exc:
                    log.error("standby %s cannot write %s/%s: %s", self.name, tree, path, exc)
        for tree, path in set(known) - set(rows):
            write_tree_file(self.data_dir, tree, path, None, 0)
        self._tree_sha = {k: v[0] for k, v in rows.items()}
        return written


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
