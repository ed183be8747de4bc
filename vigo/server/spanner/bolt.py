"""A spanner bolt's core: one partition plus the admissions roster it shares with its siblings.

No Ray here. The bolt actor (vigo/actors/member.py) owns one ``BoltCore`` next to its
``Partition`` and moves roster messages between bolts; this class decides what they mean:

- **Admissions go into the roster.** A join or a certificate renewal at this bolt admits the
  envoy with its certificate's sha256; a revocation here revokes it (remove-wins: it beats any
  admission it did not see). The partition asks ``status()`` for every envoy request, so an
  envoy that joined at a sibling is served here without re-joining (its local record is created
  on first contact), and one revoked at any bolt is refused here once the revocation arrived.
- **Only the roster is replicated.** Secrets, TLS keys, run reports and bundles stay in each
  bolt's own database; the fleet CA and bundle-signing key are copied once, at deploy, from the
  first bolt (``fleet_material``/``adopt_fleet_material``), never through the roster.
- **The roster persists** in the bolt's database (table ``roster``, one row per changed shard,
  saved from the upkeep loop), so a restarted bolt rejoins with its state and a fresh incarnation.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from vigo.config import SpannerConfig
from vigo.crypto.tls import cert_fingerprint
from vigo.roster import Ownership, OwnershipConfig, Replica, Snapshot, State, SyncConfig

log = logging.getLogger("vigo.server.spanner.bolt")


def bolt_name(host: str) -> str:
    return f"bolt-{host}"


class BoltCore:
    def __init__(self, partition: Any, name: str, bolts: list[str], cfg: SpannerConfig) -> None:
        self.partition = partition
        self.name = name
        self.bolts = sorted(bolts)
        self._lock = threading.Lock()  # the roster is touched by the request path and the sync thread
        with partition.store.write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS roster (shard INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        snapshot = self._load()
        sync = SyncConfig(delta_interval_s=cfg.delta_interval_s, digest_interval_s=cfg.digest_interval_s)
        self.replica = Replica(name, config=sync, snapshot=snapshot)
        self.ownership = Ownership(self.bolts, self_name=name,
                                   config=OwnershipConfig(suspicion_s=cfg.suspicion_s, rejoin_hold_s=cfg.rejoin_hold_s))
        partition.admissions_hook = self
        log.info("bolt %s: roster %s (%d agents), incarnation %s", name,
                 "restored" if snapshot else "empty, pulling from peers", len(self.replica.roster),
                 self.replica.replica.incarnation.hex())

    # --- persistence ----------------------------------------------------------------------------

    def _load(self) -> Snapshot | None:
        rows = self.partition.store.query("SELECT shard, data FROM roster")
        if not rows:
            return None
        saved_at = float(self.partition.store.get_meta("roster_saved_at", 0.0) or 0.0)
        return Snapshot(saved_at, {int(r[0]): bytes(r[1]) for r in rows})

    def save(self) -> int:
        """Write the shards changed since the last save (called under the partition's lock)."""
        with self._lock:
            changed = self.replica.roster.take_unsaved()
            if not changed:
                return 0
            dumped = self.replica.roster.dump(changed)
        store = self.partition.store
        with store.write() as db:
            for shard, data in dumped.items():
                db.execute("INSERT INTO roster(shard, data) VALUES (?, ?) ON CONFLICT(shard) DO UPDATE "
                           "SET data = excluded.data", (shard, data))
            store.set_meta(db, "roster_saved_at", time.time())
        return len(dumped)

    # --- the partition's hooks --------------------------------------------------------------------

    def admitted(self, envoy_id: str, cert_pem: bytes | str, not_after: float = 0) -> None:
        with self._lock:
            self.replica.admit(envoy_id, cert_fingerprint(cert_pem), not_after=int(not_after))

    def revoked(self, envoy_id: str) -> None:
        with self._lock:
            self.replica.revoke(envoy_id, "operator")

    def status(self, envoy_id: str) -> State:
        with self._lock:
            return self.replica.status(envoy_id).state

    def revoked_ids(self) -> list[str]:
        with self._lock:
            return [agent for agent, st in self.replica.roster.agents() if st.state is State.REVOKED]

    # --- replication --------------------------------------------------------------------------------

    def set_live(self, alive: list[str]) -> frozenset[str]:
        with self._lock:
            live = self.ownership.update(alive)
            self.replica.set_peers(n for n in live if n != self.name)
            return live

    def tick(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return self.replica.tick()

    def receive(self, data: bytes) -> list[tuple[str, bytes]]:
        with self._lock:
            return self.replica.receive(data)

    @property
    def ready(self) -> bool:
        return self.replica.ready

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = self.replica.stats()
            live = self.ownership.live()
            admitted = [a for a, st in self.replica.roster.agents() if st.state is State.ADMITTED]
            stats["ownership"] = self.ownership.stats()
            stats["slice"] = sum(1 for a in admitted if self.ownership.serves(a))
            stats["admitted"] = len(admitted)
            stats["live"] = sorted(live)
        return stats
