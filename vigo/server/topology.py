"""The topology, without Ray: which member is each partition's primary, at which term, its
standbys and their hosts, the spanner bolts, and which gateways exist. The control actor
(vigo/actors/control.py) serves one ``Topology``; a gateway asks ``route(partition)``; a
promotion is one ``set_primary`` (the term only ever grows, so a stale promotion cannot win).

State is a small JSON file in its own folder, rewritten atomically (and fsynced) on every
change, so a restarted control actor comes back with the topology it had.

It also holds the deployment (``set_deployment``): every actor `server deploy` wants and on
which ``vigo-host`` label (members by name, gateways on every labelled node or on the listed
hosts). ``wanted_actors`` says which of them belong on the nodes that are there now and
``pending`` which wait for their node; the control actor starts the wanted ones that are
missing whenever a labelled node appears (vigo/actors/control.py). Each actor's ``revision``
digests what defines it (constructor arguments, the settings it serves with): a redeploy
restarts exactly the actors whose revision changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from vigo.durable import OPEN_MODE, atomic_write


class Topology:
    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / "control.json"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.topology = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.topology = {"partitions": {}, "gateways": {}, "updated_at": time.time()}

    def _save(self) -> None:
        self.topology["updated_at"] = time.time()
        atomic_write(self.path, json.dumps(self.topology, indent=2, sort_keys=True).encode(), mode=OPEN_MODE,
                     tmp=self.path.with_suffix(".tmp"))

    def register_partition(self, partition: str, primary: str, term: int, data_dir: str,
                           standbys: list[str] | None = None, failover: dict[str, Any] | None = None,
                           hosts: dict[str, str] | None = None) -> dict[str, Any]:
        """Record a deployed partition. A redeploy never moves the primary back: once a
        promotion happened, the topology's primary and term stand."""
        entry = self.topology["partitions"].setdefault(partition, {"standbys": [], "history": []})
        # Another primary than the config's birth one can only come from a promotion: it stands,
        # whatever term the caller passed (a redeploy passes the serving member's own term).
        if entry.get("primary") and (entry["primary"] != primary or int(entry.get("term", 0)) > int(term)):
            # The config's members (a standby it no longer names is dropped) plus the promoted one.
            members = {entry["primary"], primary, *(standbys or [])}
            entry["standbys"] = sorted(members - {entry["primary"]})
        else:
            entry.update({"primary": primary, "term": int(term), "data_dir": data_dir})
            entry["standbys"] = sorted(set(standbys or []) - {primary})
        entry["failover"] = failover or {"auto": False, "after_s": 5.0}
        known = entry.setdefault("hosts", {})  # member name -> vigo-host label
        known.update(hosts or {})
        for name in set(known) - {entry["primary"], *entry["standbys"]}:
            del known[name]
        self._save()
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

    def auto_failover(self) -> bool:
        """Whether any partition asked for automatic failover (control then runs a watchdog)."""
        return any(e.get("failover", {}).get("auto") for e in self.topology["partitions"].values())

    # --- the deployment: what `server deploy` wants, placed as nodes arrive -------------------

    def set_deployment(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Record every actor a deploy wants (``members``: name, host, role, data_dir, cfg;
        ``gateways``: hosts or None for every labelled node, partition, listen_host, port,
        settings). Placement resumes if a teardown had paused it."""
        wanted = {**spec, "paused": False}
        if self.topology.get("deployment") != wanted:
            self.topology["deployment"] = wanted
            self._save()
        return wanted

    def deployment(self) -> dict[str, Any] | None:
        return self.topology.get("deployment")

    def pause_placement(self) -> None:
        """Stop placing actors (a teardown is killing them); the next deploy resumes it."""
        spec = self.topology.get("deployment")
        if spec is not None and not spec.get("paused"):
            spec["paused"] = True
            self._save()


def revision(*parts: Any) -> str:
    """A short digest of what defines an actor: equal digests, nothing to restart."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Sections of server.yaml members do not use: a change there restarts gateways (listen,
#: gateway) or the console (console, listen), never a member.
GATEWAY_SECTIONS = ("listen", "gateway", "console")


def member_revision(data_dir: str, cfg: dict[str, Any] | None, name: str) -> str:
    """A member's revision: its data dir, name and settings, without the gateways' sections."""
    settings = {k: v for k, v in (cfg or {}).items() if k not in GATEWAY_SECTIONS}
    return revision("member", data_dir, settings, name)


def gateway_revision(name: str, partition: str, host: str, port: int, settings: dict[str, Any] | None) -> str:
    """A gateway's revision: its constructor arguments and its ``gateway`` settings."""
    return revision("gateway", name, partition, host, int(port), settings or {})


def gateway_name(host: str) -> str:
    return f"gateway-{host}"


def gateway_hosts(spec: dict[str, Any], labels: set[str]) -> list[str]:
    """The hosts that get a gateway now: the listed ones that are there, or every labelled node."""
    listed = (spec.get("gateways") or {}).get("hosts")
    return sorted(labels if listed is None else set(listed) & labels)


def wanted_actors(spec: dict[str, Any] | None, labels: set[str]) -> list[dict[str, Any]]:
    """The actors the deployment wants on the nodes labelled ``labels`` now, members first:
    ``{"kind": "member" | "gateway", "name", "host"}`` (a member's also carries its entry)."""
    if not spec:
        return []
    out: list[dict[str, Any]] = [{"kind": "member", "name": m["name"], "host": m["host"], "member": m}
                                 for m in spec.get("members", []) if m["host"] in labels]
    if spec.get("gateways"):
        out += [{"kind": "gateway", "name": gateway_name(h), "host": h} for h in gateway_hosts(spec, labels)]
    return out


def pending(spec: dict[str, Any] | None, labels: set[str], label_key: str = "vigo-host") -> list[dict[str, Any]]:
    """What waits for its node: one entry per wanted actor whose host has no alive node, with
    the reason `server deploy` and `server status` print."""
    if not spec:
        return []
    out = []
    for m in spec.get("members", []):
        if m["host"] not in labels:
            out.append({"kind": m.get("role", "member"), "name": m["name"], "host": m["host"],
                        "reason": f"waiting for a node labelled {label_key}={m['host']}"})
    for host in sorted(set((spec.get("gateways") or {}).get("hosts") or []) - labels):
        out.append({"kind": "gateway", "name": gateway_name(host), "host": host,
                    "reason": f"waiting for a node labelled {label_key}={host}"})
    return out
