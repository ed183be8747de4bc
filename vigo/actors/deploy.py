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


def member_data_dir(cfg: ServerConfig, host: str) -> str:
    """A member's data dir on its host: ``data_dir`` with ``{host}`` replaced by the host's
    label (one path for all hosts on a real cluster; distinct ones when hosts share a disk)."""
    return cfg.data_dir.replace("{host}", host)


def deploy(cfg: ServerConfig, *, host: str | None = None, control_dir: str | None = None,
           control_host: str | None = None, gateway_hosts: list[str] | None = None,
           timeout_s: float = 60.0) -> dict[str, Any]:
    """Create (or find) control, the partition's primary, its standbys and one gateway per node.

    ``host`` is the vigo-host label of the node whose disk holds the primary's data (default:
    this machine's hostname); each name in ``replication.standbys`` gets a standby on that
    host. ``control_host`` (default ``host``) should be a host that outlives the primary's, the
    Ray head's for instance, so a promotion can happen while the primary's host is down.
    Gateways go to ``gateway_hosts`` (default: every labelled node). Idempotent: actors that
    exist are reused, and a partition that was failed over keeps its current primary.
    """
    host = host or socket.gethostname()
    control_host = control_host or host
    labels = node_host_labels()
    standby_hosts = list(cfg.replication.standbys)
    for needed in (host, control_host, *standby_hosts, *(gateway_hosts or [])):
        if needed not in labels.values():
            raise ConfigError(
                f"no alive Ray node is labelled {HOST_LABEL}={needed}; start it with "
                f"`ray start ... --labels {HOST_LABEL}={needed}` (labels seen: {sorted(set(labels.values())) or 'none'})"
            )
    if host in standby_hosts:
        raise ConfigError(f"replication.standbys names the primary's own host {host}: a standby must live elsewhere")
    common = {"lifetime": "detached", "namespace": NAMESPACE, "max_restarts": -1, "get_if_exists": True}

    # Control keeps its topology on local disk too: pinned to its host.
    control = ray.remote(Control).options(
        name="control", num_cpus=PINNED_CPUS, label_selector={HOST_LABEL: control_host}, **common,
    ).remote(control_dir or member_data_dir(cfg, control_host))
    ray.get(control.ping.remote(), timeout=timeout_s)

    primary_name = f"primary-{cfg.partition}"
    standby_names = [f"standby-{cfg.partition}-{h}" for h in standby_hosts]
    route = ray.get(control.route.remote(cfg.partition), timeout=timeout_s)
    members = [(primary_name, host, "primary")] + [(n, h, "standby") for n, h in zip(standby_names, standby_hosts, strict=True)]
    handles = {}
    for name, member_host, role in members:
        member_cfg = cfg.to_dict()
        member_cfg["data_dir"] = member_data_dir(cfg, member_host)
        # A few threads: methods still run one at a time under the member's lock, but a ping
        # (`server promote` asking where a member is) answers while a long call runs.
        handles[name] = ray.remote(Primary).options(
            name=name, num_cpus=PINNED_CPUS, label_selector={HOST_LABEL: member_host}, max_concurrency=8, **common,
        ).remote(member_cfg["data_dir"], member_cfg, name, role)
    current = route["primary"] if route else primary_name
    ping = ray.get(handles.get(current, handles[primary_name]).ping.remote(), timeout=timeout_s)
    for name in standby_names:
        ray.get(handles[name].ping.remote(), timeout=timeout_s)
    failover = {"auto": cfg.replication.auto_failover, "after_s": cfg.replication.failover_after_s}
    ray.get(control.register_partition.remote(cfg.partition, primary_name, ping["term"],
                                              member_data_dir(cfg, host), standby_names, failover,
                                              {name: member_host for name, member_host, _ in members}))

    gateways = {}
    for label in sorted(set(gateway_hosts or labels.values())):
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
    log.info("deployed partition %s (term %d) with standbys %s and gateways %s", cfg.partition, ping["term"],
             standby_names or "none", endpoints)
    return {"partition": cfg.partition, "term": ping["term"], "primary": current, "standbys": standby_names,
            "gateways": endpoints}


def deploy_spanner(cfg: ServerConfig, *, control_host: str, gateway_hosts: list[str] | None = None,
                   control_dir: str | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
    """Create (or find) control, one bolt per ``spanner.bolts`` host and the gateways.

    Each bolt is a partition (``bolt-<host>``) whose primary has its own database in
    ``DATA_DIR/bolt-<host>`` on its host (``{host}`` in ``data_dir`` is replaced by the host's
    label) and its own TLS server certificate; with ``spanner.standbys_per_bolt`` it has standbys
    on the next bolt hosts, fed and promoted exactly like any partition's. The fleet CA and the bundle-signing key are the first bolt's,
    copied once into each other bolt's database by ``adopt_fleet_material`` over Ray's
    authenticated channel: envoy certificates and bundles then verify at every bolt, and the
    roster never carries a key.
    """
    from vigo.server.bolt import bolt_name

    hosts = list(cfg.spanner.bolts)
    if not hosts:
        raise ConfigError("spanner.bolts is empty: list the vigo-host labels of the bolts in server.yaml")
    labels = node_host_labels()
    for needed in (control_host, *hosts, *(gateway_hosts or [])):
        if needed not in labels.values():
            raise ConfigError(f"no alive Ray node is labelled {HOST_LABEL}={needed} "
                              f"(labels seen: {sorted(set(labels.values())) or 'none'})")
    common = {"lifetime": "detached", "namespace": NAMESPACE, "max_restarts": -1, "get_if_exists": True}
    control = ray.remote(Control).options(
        name="control", num_cpus=PINNED_CPUS, label_selector={HOST_LABEL: control_host}, **common,
    ).remote(control_dir or member_data_dir(cfg, control_host))
    ray.get(control.ping.remote(), timeout=timeout_s)

    names = [bolt_name(h) for h in hosts]
    per_bolt = cfg.spanner.standbys_per_bolt
    if per_bolt >= len(hosts):
        raise ConfigError(f"spanner.standbys_per_bolt: {per_bolt} needs more than {per_bolt} bolt hosts "
                          f"(a bolt's standbys live on other bolts' hosts), got {len(hosts)}")
    handles, standby_handles = {}, []
    failover = {"auto": cfg.replication.auto_failover, "after_s": cfg.replication.failover_after_s}
    for i, (name, host) in enumerate(zip(names, hosts, strict=True)):
        # Bolt i's standbys on the next hosts of the list: every host holds one bolt's primary
        # and others' standbys, each member in its own folder (DATA_DIR/bolt-<host>).
        ring = [hosts[(i + k) % len(hosts)] for k in range(1, per_bolt + 1)]
        members = [(name, host, "primary")] + [(f"standby-{name}-{h}", h, "standby") for h in ring]
        member_hosts = {}
        for member, member_host, role in members:
            member_cfg = cfg.to_dict()
            member_cfg["partition"] = name
            member_cfg["data_dir"] = f"{member_data_dir(cfg, member_host)}/{name}"
            member_cfg["replication"]["standbys"] = ring
            handle = ray.remote(Primary).options(
                name=member, num_cpus=PINNED_CPUS, label_selector={HOST_LABEL: member_host}, max_concurrency=8,
                **common,
            ).remote(member_cfg["data_dir"], member_cfg, member, role)
            member_hosts[member] = member_host
            if role == "primary":
                handles[name] = handle
            else:
                standby_handles.append(handle)
        route = ray.get(control.route.remote(name), timeout=timeout_s)
        current = route["primary"] if route else name
        ping = ray.get((handles[name] if current == name else ray.get_actor(current, namespace=NAMESPACE)).ping.remote(),
                       timeout=timeout_s)
        ray.get(control.register_partition.remote(name, name, ping["term"], f"{member_data_dir(cfg, host)}/{name}",
                                                  [m for m, _, r in members if r == "standby"], failover, member_hosts),
                timeout=timeout_s)
    for handle in standby_handles:
        ray.get(handle.ping.remote(), timeout=timeout_s)
    def serving(name: str) -> Any:  # a failed-over bolt is served by its promoted standby
        route = ray.get(control.route.remote(name), timeout=timeout_s)
        return ray.get_actor(route["primary"], namespace=NAMESPACE)

    material = ray.get(serving(names[0]).fleet_material.remote(), timeout=timeout_s)
    for name in names[1:]:
        ray.get(serving(name).adopt_fleet_material.remote(material), timeout=timeout_s)
    ownership = {"suspicion_s": cfg.spanner.suspicion_s, "rejoin_hold_s": cfg.spanner.rejoin_hold_s}
    ray.get(control.register_spanner.remote(names, dict(zip(names, hosts, strict=True)), ownership), timeout=timeout_s)

    endpoints = {}
    for label in sorted(set(gateway_hosts or labels.values())):
        name = f"gateway-{label}"
        gw = ray.remote(Gateway).options(
            name=name, num_cpus=PINNED_CPUS, label_selector={HOST_LABEL: label}, max_concurrency=100000, **common,
        ).remote(name, "spanner", cfg.listen.host, cfg.listen.port)
        try:
            endpoints[name] = ray.get(gw.status.remote(), timeout=timeout_s)["advertise"]
        except Exception as exc:
            ray.kill(gw, no_restart=True)
            raise ConfigError(f"gateway {name} did not start on port {cfg.listen.port}: "
                              f"{str(exc).strip().splitlines()[-1]}") from exc
    log.info("deployed spanner bolts %s with gateways %s", names, endpoints)
    return {"bolts": names, "gateways": endpoints}


def teardown(timeout_s: float = 30.0) -> list[str]:
    """Kill the actors the control actor knows, then control itself (data dirs stay)."""
    try:
        control = ray.get_actor("control", namespace=NAMESPACE)
    except ValueError:
        return []
    topology = ray.get(control.get_topology.remote(), timeout=timeout_s)
    names = [n for e in topology["partitions"].values() for n in (e["primary"], *e.get("standbys", []))]
    names += [*sorted(topology["gateways"]), "control"]
    killed = []
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            killed.append(name)
        except ValueError:
            continue  # already gone
    return killed
