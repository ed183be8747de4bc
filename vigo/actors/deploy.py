"""Where Ray is applied to vigo's actor classes: names, lifetimes, restarts, placement.

Every actor is detached and named in namespace ``vigo`` with ``max_restarts=-1``: a restarted
actor reruns its constructor and rebuilds itself from its own disk. ``max_task_retries`` stays
0 (Ray's default): state-changing calls are at-most-once, and vigo's own protocols (run ids,
sequence numbers) make the resend safe when vigo decides to resend.

Placement: the primary owns files on one host's disk, so it is pinned to that host by the
``vigo-host`` node label (``ray start --labels vigo-host=<name>``), never by a node id (a
restarted raylet gets a new id; a label survives). A node without the label leaves the primary
RESTARTING, visibly, instead of starting it elsewhere without its data. Gateways are one per
node, pinned the same way when nodes are labelled.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import ray

from vigo.actors import NAMESPACE
from vigo.actors.control import Control
from vigo.actors.gateway import Gateway
from vigo.actors.primary import Primary
from vigo.config import ServerConfig
from vigo.errors import ConfigError

log = logging.getLogger("vigo.actors.deploy")

HOST_LABEL = "vigo-host"
#: A small CPU request so a pinned actor is scheduled where asked (see notes/ray.md section 2).
PINNED_CPUS = 0.01


def node_host_labels() -> dict[str, str]:
    """node id -> vigo-host label, for alive nodes that carry one."""
    out = {}
    for node in ray.nodes():
        if node.get("Alive") and (label := (node.get("Labels") or {}).get(HOST_LABEL)):
            out[node["NodeID"]] = label
    return out


def deploy(cfg: ServerConfig, *, host: str | None = None, control_dir: str | None = None,
           timeout_s: float = 60.0) -> dict[str, Any]:
    """Create (or find) control, the partition's primary and one gateway per labelled node.

    ``host`` is the vigo-host label of the node whose disk holds ``cfg.data_dir`` (default:
    this machine's hostname). Idempotent: actors that exist are reused.
    """
    host = host or socket.gethostname()
    labels = node_host_labels()
    if host not in labels.values():
        raise ConfigError(
            f"no alive Ray node is labelled {HOST_LABEL}={host}; start it with "
            f"`ray start ... --labels {HOST_LABEL}={host}` (labels seen: {sorted(set(labels.values())) or 'none'})"
        )
    common = {"lifetime": "detached", "namespace": NAMESPACE, "max_restarts": -1, "get_if_exists": True}

    # Control keeps its topology on local disk too: pinned beside the primary's data.
    control = ray.remote(Control).options(
        name="control", num_cpus=PINNED_CPUS, label_selector={HOST_LABEL: host}, **common,
    ).remote(control_dir or cfg.data_dir)
    ray.get(control.ping.remote(), timeout=timeout_s)

    primary_name = f"primary-{cfg.partition}"
    primary = ray.remote(Primary).options(
        name=primary_name, num_cpus=PINNED_CPUS, label_selector={HOST_LABEL: host}, **common,
    ).remote(cfg.data_dir, cfg.to_dict())
    ping = ray.get(primary.ping.remote(), timeout=timeout_s)
    ray.get(control.register_partition.remote(cfg.partition, primary_name, ping["term"], cfg.data_dir))

    gateways = {}
    for label in sorted(set(labels.values())):
        name = f"gateway-{label}"
        gw = ray.remote(Gateway).options(
            name=name, num_cpus=PINNED_CPUS, label_selector={HOST_LABEL: label}, max_concurrency=100000,
            **common,
        ).remote(name, cfg.partition, cfg.listen.host, cfg.listen.port)
        gateways[name] = gw
    endpoints = {}
    for name, gw in gateways.items():
        try:
            endpoints[name] = ray.get(gw.status.remote(), timeout=timeout_s)["advertise"]
        except Exception as exc:
            # A gateway that cannot start (port taken) would restart forever: stop it, say why.
            ray.kill(gw, no_restart=True)
            raise ConfigError(
                f"gateway {name} did not start on port {cfg.listen.port}: {str(exc).strip().splitlines()[-1]}"
            ) from exc
    log.info("deployed partition %s (term %d) with gateways %s", cfg.partition, ping["term"], endpoints)
    return {"partition": cfg.partition, "term": ping["term"], "primary": primary_name, "gateways": endpoints}


def teardown(timeout_s: float = 30.0) -> list[str]:
    """Kill the actors the control actor knows, then control itself (data dirs stay)."""
    try:
        control = ray.get_actor("control", namespace=NAMESPACE)
    except ValueError:
        return []
    topology = ray.get(control.get_topology.remote(), timeout=timeout_s)
    names = [e["primary"] for e in topology["partitions"].values()] + sorted(topology["gateways"]) + ["control"]
    killed = []
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            killed.append(name)
        except ValueError:
            continue  # already gone
    return killed
