"""Which actors a vigo deployment has and where they go: control on its host, each partition's
members (primary and standbys) on theirs, one gateway per labelled node; applying a changed
server.yaml; and taking them down.

How Ray runs them (detached, named in namespace vigo, restarted forever, pinned to their host by
the ``vigo-host`` label) is applied by the runtime (vigo.actors.runtime): a member owns files on
one host's disk, so a node without its label leaves it RESTARTING, visibly, instead of starting
it elsewhere without its data.

A deploy needs only control's node and the primary's (the bolts' with spanner). Everything it
wants is recorded in control (``set_deployment``); what belongs on a node that is not there yet
(a standby host, a worker that joins later) is reported as pending and started by control when
the node arrives (vigo.actors.control). Redeploying applies a changed server.yaml: each actor
whose revision (vigo.server.topology) differs from the wanted one is restarted, one at a time,
waiting for each to be back before the next: standbys, then the primary, then the gateways one
by one, so envoys always have a gateway to go to. An unchanged deploy restarts nothing.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from vigo.actors import console as console_actor
from vigo.actors import placement
from vigo.actors.control import Control
from vigo.actors.runtime import HOST_LABEL, RAY, Runtime
from vigo.config import ServerConfig
from vigo.errors import ConfigError, UnavailableError
from vigo.server.spanner.bolt import bolt_name
from vigo.server.topology import gateway_hosts as wanted_gateway_hosts
from vigo.server.topology import gateway_name, gateway_revision, member_revision, pending

log = logging.getLogger("vigo.actors.deploy")

#: A gateway whose port has been taken this long is not waiting for a predecessor to exit:
#: deploy stops it and says why, seconds (a restarted gateway's old process frees the port
#: within about 1.5 s, notes/ray.md section 5).
BIND_GRACE_S = 5.0


def member_data_dir(cfg: ServerConfig, host: str) -> str:
    """A member's data dir on its host: ``data_dir`` with ``{host}`` replaced by the host's
    label (one path for all hosts on a real cluster; distinct ones when hosts share a disk)."""
    return cfg.data_dir.replace("{host}", host)


def member_entry(cfg: ServerConfig, name: str, host: str, role: str, *, partition: str | None = None,
                 data_dir: str | None = None, standbys: list[str] | None = None) -> dict[str, Any]:
    """One member of the deployment: its name, host, birth role, data dir and settings."""
    member_cfg = cfg.to_dict()
    member_cfg["data_dir"] = data_dir or member_data_dir(cfg, host)
    if partition is not None:
        member_cfg["partition"] = partition
    if standbys is not None:
        member_cfg["replication"]["standbys"] = list(standbys)
    return {"name": name, "host": host, "role": role, "data_dir": member_cfg["data_dir"], "cfg": member_cfg}


def gateway_spec(cfg: ServerConfig, partition: str, hosts: list[str] | None) -> dict[str, Any]:
    """The deployment's gateways: on ``hosts``, or on every labelled node (None)."""
    return {"hosts": sorted(set(hosts)) if hosts else None, "partition": partition,
            "listen_host": cfg.listen.host, "port": cfg.listen.port, "settings": cfg.to_dict()["gateway"]}


def deploy(cfg: ServerConfig, *, host: str | None = None, control_dir: str | None = None,
           control_host: str | None = None, gateway_hosts: list[str] | None = None,
           timeout_s: float = 60.0, rt: Runtime = RAY) -> dict[str, Any]:
    """Create (or find) control, the partition's primary, its standbys and one gateway per node,
    and apply what changed since the last deploy.

    ``host`` is the vigo-host label of the node whose disk holds the primary's data (default:
    this machine's hostname); each name in ``replication.standbys`` gets a standby on that
    host. ``control_host`` (default ``host``) should be a host that outlives the primary's, the
    Ray head's for instance, so a promotion can happen while the primary's host is down.
    Gateways go to ``gateway_hosts`` (default: every labelled node, including those that join
    later). Only control's and the primary's nodes must be there; the rest is pending until
    its node arrives. A partition that was failed over keeps its current primary.
    """
    host = host or socket.gethostname()
    control_host = control_host or host
    standby_hosts = list(cfg.replication.standbys)
    if host in standby_hosts:
        raise ConfigError(f"replication.standbys names the primary's own host {host}: a standby must live elsewhere")
    present = set(rt.host_labels().values())
    _require(present, {"control": control_host})
    control = _start_control(cfg, control_host, control_dir, timeout_s, rt)

    primary_name = f"primary-{cfg.partition}"
    standby_names = [f"standby-{cfg.partition}-{h}" for h in standby_hosts]
    entries = [member_entry(cfg, primary_name, host, "primary")] + [
        member_entry(cfg, n, h, "standby") for n, h in zip(standby_names, standby_hosts, strict=True)]
    route = rt.call(control, "route", cfg.partition, timeout_s=timeout_s)
    # The node the partition is served from must be there: the birth primary's, or after a
    # promotion the promoted member's (the birth primary's host may be the one that is gone).
    current = route["primary"] if route else primary_name
    current_host = {e["name"]: e["host"] for e in entries}.get(current) or (route or {}).get("hosts", {}).get(current)
    _require(present, {f"the primary of {cfg.partition}": current_host or host})
    removed = _removed_members(route, {e["name"] for e in entries})
    spec = {"members": entries, "gateways": gateway_spec(cfg, cfg.partition, gateway_hosts)}
    previous = rt.call(control, "deployment", timeout_s=timeout_s)
    # From here on control places whatever the spec wants on nodes that arrive later.
    rt.call(control, "set_deployment", spec, timeout_s=timeout_s)

    started, changed, infos = _start_members(entries, present, timeout_s, rt)
    term = _member_up(rt, current, timeout_s)["term"] if current not in infos else infos[current]["term"]
    failover = {"auto": cfg.replication.auto_failover, "after_s": cfg.replication.failover_after_s}
    # Unbounded, as it always was: control answered its ping just above.
    entry = rt.call(control, "register_partition", cfg.partition, primary_name, term, member_data_dir(cfg, host),
                    standby_names, failover, {e["name"]: e["host"] for e in entries}, timeout_s=None)
    restarted = _restart_members(changed, {entry["primary"]}, control, timeout_s, rt)
    stopped = _stop(removed, timeout_s, rt)

    endpoints, gw_started, gw_restarted, gw_stopped = _apply_gateways(spec, previous, present, control, timeout_s, rt)
    console_url = apply_console(cfg, control_host, timeout_s, rt)
    waiting = pending(spec, present, HOST_LABEL)
    result = {"partition": cfg.partition, "term": int(entry["term"]), "primary": entry["primary"],
              "standbys": standby_names, "gateways": endpoints, "console": console_url, "pending": waiting,
              "started": started + gw_started, "restarted": restarted + gw_restarted, "stopped": stopped + gw_stopped}
    log.info("deployed partition %s (term %d) with standbys %s and gateways %s; started %s, restarted %s, "
             "stopped %s, pending %s", cfg.partition, result["term"], standby_names or "none", endpoints,
             result["started"] or "none", result["restarted"] or "none", result["stopped"] or "none",
             [w["name"] for w in waiting] or "none")
    return result


def deploy_spanner(cfg: ServerConfig, *, control_host: str, gateway_hosts: list[str] | None = None,
                   control_dir: str | None = None, timeout_s: float = 60.0, rt: Runtime = RAY) -> dict[str, Any]:
    """Create (or find) control, one bolt per ``spanner.bolts`` host and the gateways, and apply
    what changed since the last deploy (as ``deploy`` does).

    Each bolt is a partition (``bolt-<host>``) whose primary has its own database in
    ``DATA_DIR/bolt-<host>`` on its host (``{host}`` in ``data_dir`` is replaced by the host's
    label) and its own TLS server certificate; with ``spanner.standbys_per_bolt`` it has standbys
    on the next bolt hosts, fed and promoted exactly like any partition's. The fleet CA and the bundle-signing key are the first bolt's,
    copied once into each other bolt's database by ``adopt_fleet_material`` over Ray's
    authenticated channel: envoy certificates and bundles then verify at every bolt, and the
    roster never carries a key. Every bolt host must be there; gateways follow the nodes.
    """
    hosts = list(cfg.spanner.bolts)
    if not hosts:
        raise ConfigError("spanner.bolts is empty: list the vigo-host labels of the bolts in server.yaml")
    present = set(rt.host_labels().values())
    _require(present, {"control": control_host, **{f"bolt {bolt_name(h)}": h for h in hosts}})
    names = [bolt_name(h) for h in hosts]
    per_bolt = cfg.spanner.standbys_per_bolt
    if per_bolt >= len(hosts):
        raise ConfigError(f"spanner.standbys_per_bolt: {per_bolt} needs more than {per_bolt} bolt hosts "
                          f"(a bolt's standbys live on other bolts' hosts), got {len(hosts)}")
    control = _start_control(cfg, control_host, control_dir, timeout_s, rt)

    entries, bolts = [], {}
    for i, (name, host) in enumerate(zip(names, hosts, strict=True)):
        # Bolt i's standbys on the next hosts of the list: every host holds one bolt's primary
        # and others' standbys, each member in its own folder (DATA_DIR/bolt-<host>).
        ring = [hosts[(i + k) % len(hosts)] for k in range(1, per_bolt + 1)]
        members = [(name, host, "primary")] + [(f"standby-{name}-{h}", h, "standby") for h in ring]
        bolts[name] = members
        entries += [member_entry(cfg, m, h, role, partition=name, data_dir=f"{member_data_dir(cfg, h)}/{name}",
                                 standbys=ring) for m, h, role in members]
    spec = {"members": entries, "gateways": gateway_spec(cfg, "spanner", gateway_hosts)}
    previous = rt.call(control, "deployment", timeout_s=timeout_s)
    rt.call(control, "set_deployment", spec, timeout_s=timeout_s)
    started, changed, infos = _start_members(entries, present, timeout_s, rt)

    failover = {"auto": cfg.replication.auto_failover, "after_s": cfg.replication.failover_after_s}
    primaries = set()
    for name, members in bolts.items():
        route = rt.call(control, "route", name, timeout_s=timeout_s)
        current = route["primary"] if route else name
        term = infos[current]["term"] if current in infos else _member_up(rt, current, timeout_s)["term"]
        entry = rt.call(control, "register_partition", name, name, term, f"{member_data_dir(cfg, members[0][1])}/{name}",
                        [m for m, _, r in members if r == "standby"], failover, {m: h for m, h, _ in members},
                        timeout_s=timeout_s)
        primaries.add(entry["primary"])
    restarted = _restart_members(changed, primaries, control, timeout_s, rt)

    def serving(name: str) -> Any:  # a failed-over bolt is served by its promoted standby
        return rt.actor(rt.call(control, "route", name, timeout_s=timeout_s)["primary"])

    material = rt.call(serving(names[0]), "fleet_material", timeout_s=timeout_s)
    for name in names[1:]:
        rt.call(serving(name), "adopt_fleet_material", material, timeout_s=timeout_s)
    ownership = {"suspicion_s": cfg.spanner.suspicion_s, "rejoin_hold_s": cfg.spanner.rejoin_hold_s}
    rt.call(control, "register_spanner", names, dict(zip(names, hosts, strict=True)), ownership, timeout_s=timeout_s)

    endpoints, gw_started, gw_restarted, gw_stopped = _apply_gateways(spec, previous, present, control, timeout_s, rt)
    waiting = pending(spec, present, HOST_LABEL)
    log.info("deployed spanner bolts %s with gateways %s; started %s, restarted %s, pending %s", names, endpoints,
             started + gw_started or "none", restarted + gw_restarted or "none", [w["name"] for w in waiting] or "none")
    return {"bolts": names, "gateways": endpoints, "pending": waiting, "started": started + gw_started,
            "restarted": restarted + gw_restarted, "stopped": gw_stopped}


def teardown(timeout_s: float = 30.0, rt: Runtime = RAY) -> list[str]:
    """Kill the actors the control actor knows, then control itself (data dirs stay). Control
    stops placing actors first, so nothing it kills comes back."""
    try:
        control = rt.actor("control")
    except ValueError:
        return []
    try:
        rt.call(control, "pause_placement", timeout_s=timeout_s)
    except Exception as exc:  # a control from before placement existed has nothing to pause
        log.info("control did not pause placement (%s)", type(exc).__name__)
    topology = rt.call(control, "get_topology", timeout_s=timeout_s)
    spec = topology.get("deployment") or {}
    names = [n for e in topology["partitions"].values() for n in (e["primary"], *e.get("standbys", []))]
    names += [m["name"] for m in spec.get("members", [])]
    gateways = set(topology["gateways"]) | {gateway_name(h) for h in (spec.get("gateways") or {}).get("hosts") or []}
    if spec.get("gateways"):
        gateways |= {gateway_name(h) for h in rt.host_labels().values()}
    names += sorted(gateways)
    names.append(console_actor.NAME)
    killed = []
    for name in dict.fromkeys(names):  # once each, in order
        try:
            rt.kill(rt.actor(name))
            killed.append(name)
        except ValueError:
            continue  # already gone, or never placed
    rt.kill(control)
    killed.append("control")
    return killed


def apply_console(cfg: ServerConfig, host: str, timeout_s: float, rt: Runtime) -> str | None:
    """The web console on ``host`` (control's): started if missing, restarted if its settings
    changed, stopped if ``console.enabled`` is off. Returns its URL (None when off). Ray
    restarts it on its node like every vigo actor; it holds no state but logins."""
    name = console_actor.NAME
    if not cfg.console.enabled:
        _stop([name], timeout_s, rt)
        return None
    args = (host, cfg.listen.host, cfg.console.port, cfg.console.session_ttl_s)
    want = console_actor.console_revision(*args)

    def start() -> Any:
        return rt.start(console_actor.Console, name, *args, host=host, max_concurrency=console_actor.CONCURRENCY)

    def serving() -> dict[str, Any]:
        status = rt.call(rt.actor(name), "status", timeout_s=min(10.0, timeout_s))
        if status.get("state") == "serving":
            return status
        raise UnavailableError("unavailable", status.get("error") or "starting")

    if not placement.exists(name, rt):
        start()
    status = placement.until("the console did not serve", serving, timeout_s)
    if status.get("revision") != want:
        placement.replace(rt, name, want, "status", start, timeout_s)
        status = placement.until("the console did not serve", serving, timeout_s)
    return status["url"]


# --- the steps ---------------------------------------------------------------------------------

def _require(present: set[str], needed: dict[str, str]) -> None:
    for what, host in needed.items():
        if host not in present:
            raise ConfigError(
                f"no alive Ray node is labelled {HOST_LABEL}={host} ({what} lives there); start it with "
                f"`ray start ... --labels {HOST_LABEL}={host}` (labels seen: {sorted(present) or 'none'})")


def _start_control(cfg: ServerConfig, control_host: str, control_dir: str | None, timeout_s: float,
                   rt: Runtime) -> Any:
    # Control keeps its topology on local disk too: pinned to its host.
    control = rt.start(Control, "control", control_dir or member_data_dir(cfg, control_host), host=control_host)
    rt.call(control, "ping", timeout_s=timeout_s)
    return control


def _member_up(rt: Runtime, name: str, timeout_s: float) -> dict[str, Any]:
    """Wait until member ``name`` answers in a role (primary or standby); its ping."""
    def probe() -> dict[str, Any] | None:
        info = rt.call(rt.actor(name), "ping", timeout_s=min(10.0, timeout_s))
        if info.get("role") in ("primary", "standby"):
            return info
        raise RuntimeError(info.get("error") or f"role {info.get('role')}")

    return placement.until(f"member {name} did not start", probe, timeout_s)


def _gateway_up(rt: Runtime, name: str, port: int, timeout_s: float) -> dict[str, Any]:
    """Wait until gateway ``name`` serves; its status. A port taken for longer than
    ``BIND_GRACE_S`` stops it (it would retry forever) with a ConfigError saying why."""
    def probe() -> dict[str, Any] | None:
        status = rt.call(rt.actor(name), "status", timeout_s=min(10.0, timeout_s))
        if status.get("state", "serving") == "serving" and status.get("advertise"):
            return status
        if float(status.get("bind_error_s") or 0.0) > BIND_GRACE_S:
            rt.kill(rt.actor(name))
            raise ConfigError(f"gateway {name} did not start on port {port}: {status.get('error')}")
        raise RuntimeError(status.get("error") or "starting")

    return placement.until(f"gateway {name} did not serve", probe, timeout_s)


def _start_members(entries: list[dict[str, Any]], present: set[str], timeout_s: float,
                   rt: Runtime) -> tuple[list[str], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Start the members whose host is there and that do not exist; wait until each of them
    is in its role. Returns (started, the existing ones whose revision changed, their pings)."""
    here = [e for e in entries if e["host"] in present]
    started = []
    for e in here:
        if not placement.exists(e["name"], rt):
            placement.start_member(e, rt)
            started.append(e["name"])
    infos, changed = {}, []
    for e in here:
        infos[e["name"]] = _member_up(rt, e["name"], timeout_s)
        if e["name"] not in started and infos[e["name"]].get("revision") != member_revision(
                e["data_dir"], e["cfg"], e["name"]):
            changed.append(e)
    return started, changed, infos


def _restart_members(changed: list[dict[str, Any]], primaries: set[str], control: Any, timeout_s: float,
                     rt: Runtime) -> list[str]:
    """Restart each changed member, one at a time, those serving as primary last; each is back
    in its role before the next goes. Automatic failover is held while a primary restarts: its
    silence is planned."""
    done = []
    for e in sorted(changed, key=lambda e: e["name"] in primaries):
        want = member_revision(e["data_dir"], e["cfg"], e["name"])
        partition = e["cfg"]["partition"]
        held = e["name"] in primaries
        if held:
            rt.call(control, "hold_failover", partition, 3 * timeout_s, timeout_s=timeout_s)
        try:
            placement.replace(rt, e["name"], want, "ping", lambda e=e: placement.start_member(e, rt), timeout_s)
            _member_up(rt, e["name"], timeout_s)
        finally:
            if held:
                rt.call(control, "hold_failover", partition, 0, timeout_s=timeout_s)
        log.info("restarted %s with the new settings", e["name"])
        done.append(e["name"])
    return done


def _removed_members(route: dict[str, Any] | None, configured: set[str]) -> list[str]:
    """Members the route has and the config no longer names (a standby host dropped from
    replication.standbys): stopped after the primary restarted without them."""
    if not route:
        return []
    gone = sorted({route["primary"], *route.get("standbys", [])} - configured)
    if route["primary"] in gone:
        raise ConfigError(f"{route['primary']} is the primary of its partition now (after a promotion) and "
                          "server.yaml no longer names its host: promote another member first "
                          "(`vigocli server promote`), then deploy")
    return gone


def _stop(names: list[str], timeout_s: float, rt: Runtime) -> list[str]:
    stopped = []
    for name in names:
        try:
            rt.kill(rt.actor(name))
        except ValueError:
            continue
        placement.until(f"{name} did not stop", lambda name=name: not placement.exists(name, rt), timeout_s)
        stopped.append(name)
    return stopped


def _apply_gateways(spec: dict[str, Any], previous: dict[str, Any] | None, present: set[str], control: Any,
                    timeout_s: float, rt: Runtime) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """One gateway per wanted host that is there: started if missing, restarted if its revision
    changed, one at a time, each serving before the next; gateways no longer wanted stopped
    last. Returns (endpoints, started, restarted, stopped)."""
    gw = spec["gateways"]
    endpoints: dict[str, str] = {}
    started, restarted = [], []
    for host in wanted_gateway_hosts(spec, present):
        name = gateway_name(host)
        want = gateway_revision(name, gw["partition"], gw["listen_host"], gw["port"], gw.get("settings"))
        if not placement.exists(name, rt):
            placement.start_gateway(gw, host, rt)
            started.append(name)
        status = _gateway_up(rt, name, gw["port"], timeout_s)
        if status.get("revision") != want:
            placement.replace(rt, name, want, "status", lambda host=host: placement.start_gateway(gw, host, rt), timeout_s)
            status = _gateway_up(rt, name, gw["port"], timeout_s)
            log.info("restarted %s with the new settings", name)
            restarted.append(name)
        endpoints[name] = status["advertise"]
    stopped = []
    if gw.get("hosts") is not None:  # a listed host dropped from the list loses its gateway
        topology = rt.call(control, "get_topology", timeout_s=timeout_s)
        before = set(topology.get("gateways", {}))
        before |= {gateway_name(h) for h in ((previous or {}).get("gateways") or {}).get("hosts") or []}
        for name in sorted(before - {gateway_name(h) for h in gw["hosts"]}):
            stopped += _stop([name], timeout_s, rt)
            rt.call(control, "unregister_gateway", name, timeout_s=timeout_s)
    return endpoints, started, restarted, stopped
