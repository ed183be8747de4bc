"""`Control`: the topology registry. Which actor is each partition's primary, at which term, and
which gateways exist. Later issues add standbys and bolts here without changing how a gateway
asks for its route (``route(partition)``).

State is a small JSON file in its own folder, rewritten atomically on every change, so a
restarted control actor (max_restarts=-1) comes back with the topology it had.
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

    def _save(self) -> None:
        self.topology["updated_at"] = time.time()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.topology, indent=2, sort_keys=True))
        os.replace(tmp, self.path)

    def register_partition(self, partition: str, primary: str, term: int, data_dir: str) -> dict[str, Any]:
        entry = self.topology["partitions"].setdefault(partition, {"standbys": []})
        entry.update({"primary": primary, "term": int(term), "data_dir": data_dir})
        self._save()
        return entry

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
