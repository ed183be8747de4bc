"""`Control`: the topology registry. Which actor is each partition's primary, at which term,
its standbys, and which gateways exist. A gateway asks ``route(partition)``; a promotion is one
``set_primary`` call (the term only ever grows, so a stale promotion cannot win).

State is a small JSON file in its own folder, rewritten atomically on every change, so a
restarted control actor (max_restarts=-1) comes back with the topology it had. Control should
live on a host other than any partition's primary (``server deploy --control-host``, the Ray
head's host is a good choice): promotion needs it while the primary's host is down.

With ``replication.auto_failover`` a watchdog thread (vigo.actors.failover) promotes the most
up-to-date standby once the primary has not answered for ``failover_after_s``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class Control:
    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / "control.json"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.topology = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.topology = {"partitions": {}, "gateways": {}, "updated_at": time.time()}
        self._watchdog = None
        self._start_watchdog()

    def _save(self) -> None:
        self.topology["updated_at"] = time.time()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.topology, indent=2, sort_keys=True))
        os.replace(tmp, self.path)

    def register_partition(self, partition: str, primary: str, term: int, data_dir: str,
                           standbys: list[str] | None = None, failover: dict[str, Any] | None = None,
                           hosts: dict[str, str] | None = None) -> dict[str, Any]:
        """Record a deployed partition. A redeploy never moves the primary back: once a
        promotion happened, the topology's primary and term stand."""
        entry = self.topology["partitions"].setdefault(partition, {"standbys": [], "history": []})
        if entry.get("primary") and int(entry.get("term", 0)) > int(term):
            members = {entry["primary"], *entry.get("standbys", []), primary, *(standbys or [])}
            entry["standbys"] = sorted(members - {entry["primary"]})
        else:
            entry.update({"primary": primary, "term": int(term), "data_dir": data_dir})
            entry["standbys"] = sorted(set(standbys or []) - {primary})
        entry["failover"] = failover or {"auto": False, "after_s": 5.0}
        entry.setdefault("hosts", {}).update(hosts or {})  # member name -> vigo-host label
        self._save()
        self._start_watchdog()
        return entry

    def register_spanner(self, bolts: list[str], hosts: dict[str, str], ownership: dict[str, Any]) -> dict[str, Any]:
        """Spanner: the bolts (each also registered as a partition) and the liveness damping
        every gateway applies when it assigns envoys to them."""
        self.topology["spanner"] = {"bolts": sorted(bolts), "hosts": hosts, "ownership": ownership}
        self._save()
        return self.topology["spanner"]

    def set_primary(self, partition: str, primary: str, term: int) -> dict[str, Any]:
        """Commit a promotion: ``primary`` serves ``partition`` from ``term`` on. The old primary
        becomes a standby (it rejoins as one when it comes back)."""
        entry = self.topology["partitions"][partition]
        if int(term) <= int(entry["term"]):
            raise ValueError(f"promotion to term {term} is stale: partition {partition} is at term {entry['term']}")
        old = entry["primary"]
        members = {old, *entry.get("standbys", [])}
        entry.update({"primary": primary, "term": int(term), "standbys": sorted(members - {primary})})
        entry.setdefault("history", []).append({"term": int(term), "primary": primary, "previous": old,
                                                "at": time.time()})
        self._save()
        return entry

    def _start_watchdog(self) -> None:
        if getattr(self, "_watchdog", None) is not None:
            return
        if not any(e.get("failover", {}).get("auto") for e in self.topology["partitions"].values()):
            return
        from vigo.actors.failover import Watchdog

        self._watchdog = Watchdog(self)
        self._watchdog.start()

    def route(self, partition: str) -> dict[str, Any] | None:
        """Where a gateway sends a partition's requests: {"primary": actor name, "term": n}."""
        return self.topology["partitions"].get(partition)

    def register_gateway(self, name: str, endpoint: str, node: str) -> None:
        self.topology["gateways"][name] = {"endpoint": endpoint, "node": node, "registered_at": time.time()}
        self._save()

    def unregister_gateway(self, name: str) -> None:
        self.topology["gateways"].pop(name, None)
        self._save()

    def get_topology(self) -> dict[str, Any]:
        return self.topology

    def ping(self) -> str:
        return "ok"

    def __repr__(self) -> str:
        parts = ", ".join(f"{p}@term{e.get('term')}" for p, e in sorted(self.topology["partitions"].items()))
        return f"vigo-control[{parts}]"
