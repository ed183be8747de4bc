"""`Control`: the topology registry as an actor (the registry itself, without Ray, is
vigo.server.topology.Topology). Which member is each partition's primary, at which term, its
standbys, and which gateways exist: a gateway asks ``route(partition)``; a promotion is one
``set_primary`` call.

A restarted control actor (max_restarts=-1) comes back with the topology it had (a JSON file in
its own folder). Control should live on a host other than any partition's primary
(``server deploy --control-host``, the Ray head's host is a good choice): promotion needs it
while the primary's host is down.

With ``replication.auto_failover`` a watchdog thread (vigo.actors.failover) promotes the most
up-to-date standby once the primary has not answered for ``failover_after_s``.

Control also watches Ray's nodes (a thread polling the labelled alive nodes every
``NODE_POLL_S``): whenever the set changes (a worker joined, a raylet came back with a new node
id) and every ``SWEEP_S`` anyway, it starts what the deployment wants and lacks on the nodes
that are there (vigo.actors.placement): a gateway on every labelled node, each configured
member on its host. Workers that join after `server deploy` get their gateway (and standby)
without anyone deploying again. An actor that exists is left to Ray, except on a node that
arrives: Ray restarts the node's actors with the arguments they were created with, and control
restarts those whose revision is older than the deployment's (a deploy made while the node was
away).

``gateway_endpoints`` is the list every gateway puts in its check-in answers (envoys learn
every gateway from it): the registered gateways whose node was alive at the last poll, so a
gateway whose node Ray declared dead is left out until it registers again from a live node.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from vigo.actors import placement
from vigo.actors.failover import Watchdog
from vigo.actors.runtime import HOST_LABEL, RAY, Runtime
from vigo.server.topology import Topology, pending

log = logging.getLogger("vigo.actors.control")

#: How often control asks Ray for the alive labelled nodes, seconds. One GCS call (``ray.nodes``,
#: milliseconds for a few hundred nodes) per period; with the gateway's own start (about 2 s),
#: a node that appears serves envoys within a few seconds, inside issue 19's 10 s target.
NODE_POLL_S = 2.0
#: How often every wanted actor is checked even though no node came or went (one name lookup
#: each): brings back an actor that was killed for good, which no node change would reveal.
SWEEP_S = 30.0


class Control(Topology):
    def __init__(self, state_dir: str, rt: Runtime = RAY) -> None:
        # Builds from its own file only: no call to another actor here (a restart must not
        # depend on anyone else being up); the threads below do that work, with retries.
        super().__init__(state_dir)
        self.rt = rt
        self._watchdog: Watchdog | None = None
        self._holds: dict[str, float] = {}  # partition -> monotonic time its failover hold ends
        self._start_watchdog()
        self._labels: dict[str, str] | None = None  # as of the last placement round (None: place now)
        self._known_nodes: dict[str, str] | None = None  # node id -> label, as of the last poll
        self._recheck: set[str] = set()  # hosts whose actors' revisions are still to be checked
        self._next_sweep = 0.0
        self._placed: list[dict[str, Any]] = []  # the latest starts, for `server status`
        self._checked_at: float | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._watch_nodes, name="vigo-placement", daemon=True).start()

    def register_partition(self, partition: str, primary: str, term: int, data_dir: str,
                           standbys: list[str] | None = None, failover: dict[str, Any] | None = None,
                           hosts: dict[str, str] | None = None) -> dict[str, Any]:
        entry = super().register_partition(partition, primary, term, data_dir, standbys, failover, hosts)
        self._start_watchdog()
        return entry

    def set_deployment(self, spec: dict[str, Any]) -> dict[str, Any]:
        wanted = super().set_deployment(spec)
        self._labels = None  # the next round checks every wanted actor against the new spec
        return wanted

    def hold_failover(self, partition: str, seconds: float) -> None:
        """No automatic failover of ``partition`` for ``seconds`` (0 ends the hold): a deploy
        is restarting its primary on purpose, to apply new settings."""
        self._holds[partition] = time.monotonic() + float(seconds)

    def failover_held(self, partition: str) -> bool:
        return time.monotonic() < self._holds.get(partition, 0.0)

    def _start_watchdog(self) -> None:
        if self._watchdog is not None or not self.auto_failover():
            return
        self._watchdog = Watchdog(self, rt=self.rt)
        self._watchdog.start()

    # --- placement: start what the deployment wants on the nodes that are there ---------------

    def _watch_nodes(self) -> None:
        while not self._stop.wait(NODE_POLL_S):  # a deploy places what it can itself: no hurry
            try:
                self.poll_nodes()
            except Exception:  # the GCS is busy or restarting: next period
                log.exception("node poll failed")

    def poll_nodes(self, now: float | None = None) -> list[str]:
        """One round: read the labelled alive nodes; if they changed since the last round (or a
        sweep is due), start whatever the deployment wants and lacks on them. A node that
        arrived (a node id not seen before: a new worker, or a raylet back after Ray declared it
        dead) also has its existing actors checked: Ray restarts them with the arguments they
        were created with, and a deploy made while the node was away may have changed those."""
        now = time.monotonic() if now is None else now
        labels = self.rt.host_labels()
        self._checked_at = time.time()
        if self._known_nodes is None:  # control just started: what is there is not news
            self._known_nodes = dict(labels)
        arrived = {label for node, label in labels.items() if node not in self._known_nodes}
        self._known_nodes = dict(labels)
        spec = self.deployment()
        if spec is None or spec.get("paused"):
            self._labels = None  # resumed later: the first round after it places everything
            return []
        self._recheck = (self._recheck | arrived) & set(labels.values())
        if labels == self._labels and now < self._next_sweep and not self._recheck:
            return []
        self._labels, self._next_sweep = labels, now + SWEEP_S
        started = placement.place_missing(spec, set(labels.values()), self.rt)
        if started:
            log.info("placed %s (nodes that arrived: %s)", ", ".join(started), ", ".join(sorted(arrived)) or "none")
            self._placed = (self._placed + [{"name": n, "at": time.time()} for n in started])[-20:]
        for host in sorted(self._recheck):
            if placement.refresh(spec, host, self.rt):
                self._recheck.discard(host)
        return started

    def gateway_endpoints(self) -> list[str]:
        """The endpoints (HOST:PORT) of the registered gateways whose node Ray reports alive, as
        of the last node poll: what every gateway hands envoys in its check-in answers. A
        gateway whose node is gone (dead, or not polled alive since control started) is left
        out until it registers again from a live node."""
        alive = self._known_nodes
        return sorted({g["endpoint"] for g in self.topology.get("gateways", {}).values()
                       if g.get("endpoint") and (alive is None or g.get("node") in alive)})

    def placement_status(self) -> dict[str, Any]:
        """For `server status`: the labelled nodes last seen, what waits for its node, the
        latest actors placed by control, and the gateways with their node and start time."""
        labels = set((self._labels or {}).values()) if self._labels is not None else set(self.rt.host_labels().values())
        alive = self._known_nodes
        gateways = {name: {**g, "listed": alive is None or g.get("node") in alive}
                    for name, g in self.topology.get("gateways", {}).items()}
        return {"hosts": sorted(labels), "pending": pending(self.deployment(), labels, HOST_LABEL),
                "placed": list(self._placed), "checked_at": self._checked_at,
                "paused": bool((self.deployment() or {}).get("paused")),
                "gateways": gateways}

    def ping(self) -> str:
        return "ok"

    def pid(self) -> int:
        return os.getpid()

    def __repr__(self) -> str:
        parts = ", ".join(f"{p}@term{e.get('term')}" for p, e in sorted(self.topology["partitions"].items()))
        return f"vigo-control[{parts}]"
