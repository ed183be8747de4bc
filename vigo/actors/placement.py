"""Starting vigo's actors from a deployment's spec: the one place that turns an entry of the
spec (vigo.server.topology: ``set_deployment``) into a Ray actor, used by `server deploy`
(vigo.actors.deploy) and by the control actor when a labelled node arrives later
(vigo.actors.control). Both start an actor with the same arguments, so its revision (what a
redeploy compares) is the same whoever started it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from vigo.actors.gateway import Gateway
from vigo.actors.member import Member
from vigo.actors.runtime import Runtime
from vigo.errors import ConfigError
from vigo.server.topology import gateway_name, gateway_revision, member_revision, wanted_actors

log = logging.getLogger("vigo.actors.placement")

#: Threads of a member actor: methods still run one at a time under the member's lock, but a
#: ping (`server promote` asking where a member is) answers while a long call runs.
MEMBER_CONCURRENCY = 8
#: Concurrent calls into a gateway (an async actor: every envoy batch and admin call is one).
GATEWAY_CONCURRENCY = 100000
#: Poll period while waiting for an actor to stop or to be up, seconds.
WAIT_POLL_S = 0.2
#: Longest wait for an actor to say which revision it runs, seconds.
ASK_TIMEOUT_S = 5.0


def start_member(entry: dict[str, Any], rt: Runtime) -> Any:
    """Create (or find) the member ``entry`` names (name, host, role, data_dir, cfg)."""
    return rt.start(Member, entry["name"], entry["data_dir"], entry["cfg"], entry["name"], entry["role"],
                    host=entry["host"], max_concurrency=MEMBER_CONCURRENCY)


def start_gateway(gateways: dict[str, Any], host: str, rt: Runtime) -> Any:
    """Create (or find) the gateway of the node labelled ``host``."""
    name = gateway_name(host)
    return rt.start(Gateway, name, name, gateways["partition"], gateways["listen_host"], gateways["port"],
                    gateways.get("settings"), host=host, max_concurrency=GATEWAY_CONCURRENCY)


def wanted_revision(spec: dict[str, Any], item: dict[str, Any]) -> str:
    """The revision the actor ``item`` (from ``wanted_actors``) must run at."""
    if item["kind"] == "member":
        m = item["member"]
        return member_revision(m["data_dir"], m["cfg"], m["name"])
    g = spec["gateways"]
    return gateway_revision(item["name"], g["partition"], g["listen_host"], g["port"], g.get("settings"))


def start(spec: dict[str, Any], item: dict[str, Any], rt: Runtime) -> Any:
    if item["kind"] == "member":
        return start_member(item["member"], rt)
    return start_gateway(spec["gateways"], item["host"], rt)


def exists(name: str, rt: Runtime) -> bool:
    try:
        rt.actor(name)
    except ValueError:
        return False
    return True


def place_missing(spec: dict[str, Any] | None, labels: set[str], rt: Runtime) -> list[str]:
    """Start every actor the deployment wants on the nodes labelled ``labels`` that does not
    exist (a node that joined, an actor that died for good). Actors that exist are left alone,
    RESTARTING ones included: Ray brings those back on their node. Returns the names started."""
    started = []
    for item in wanted_actors(spec, labels):
        if exists(item["name"], rt):
            continue
        try:
            start(spec, item, rt)
        except Exception:  # one that cannot be created must not keep the others from starting
            log.exception("could not start %s on %s", item["name"], item["host"])
            continue
        log.info("started %s on the node labelled %s", item["name"], item["host"])
        started.append(item["name"])
    return started


def running_revision(item: dict[str, Any], rt: Runtime, timeout_s: float = ASK_TIMEOUT_S) -> str | None:
    """The revision the actor ``item`` runs at, once it is up (its role taken, or serving);
    None while it is starting. Raises when it does not answer."""
    if item["kind"] == "member":
        info = rt.call(rt.actor(item["name"]), "ping", timeout_s=timeout_s)
        return info.get("revision") if info.get("role") in ("primary", "standby") else None
    info = rt.call(rt.actor(item["name"]), "status", timeout_s=timeout_s)
    return info.get("revision") if info.get("state", "serving") == "serving" else None


def refresh(spec: dict[str, Any], host: str, rt: Runtime, timeout_s: float = 60.0) -> bool:
    """Bring the actors on the node labelled ``host`` (one that just came back) to the wanted
    revision: Ray restarted them with the arguments they were created with, which a deploy made
    while the node was away may have changed. One at a time. True once every one of them was
    checked; False if one is not up yet (the caller tries again at its next round)."""
    for item in wanted_actors(spec, {host}):
        if not exists(item["name"], rt):
            continue  # place_missing starts it, at the wanted revision
        want = wanted_revision(spec, item)
        try:
            running = running_revision(item, rt)
        except Exception:
            return False
        if running is None:
            return False
        if running != want:
            log.info("%s came back with an older revision: restarting it with the deployed settings", item["name"])
            replace(rt, item["name"], want, "ping" if item["kind"] == "member" else "status",
                    lambda item=item: start(spec, item, rt), timeout_s)
    return True


def until(what: str, probe: Callable[[], Any], timeout_s: float) -> Any:
    """``probe()`` until it returns something true (a ConfigError ends the wait at once); at the
    deadline a ConfigError naming ``what`` and the last answer or error."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            got = probe()
            if got:
                return got
        except ConfigError:
            raise
        except Exception as exc:  # not created yet, restarting, answering slowly
            lines = str(exc).strip().splitlines()
            last = f"{type(exc).__name__}: {lines[-1][:200] if lines else ''}"
        if time.monotonic() >= deadline:
            raise ConfigError(f"{what} within {timeout_s:.0f} s (last: {last})")
        time.sleep(WAIT_POLL_S)


def replace(rt: Runtime, name: str, want: str, method: str, start: Callable[[], Any], timeout_s: float) -> None:
    """Kill ``name`` and start it again. If someone placed the new one first (control does for a
    missing wanted actor), that one is kept: it runs at the wanted revision too."""
    with contextlib.suppress(ValueError):
        rt.kill(rt.actor(name))

    def replaced() -> bool:
        try:
            handle = rt.actor(name)
        except ValueError:
            start()
            return True
        try:  # still there: the old one exiting, or one just placed by someone else
            return rt.call(handle, method, timeout_s=1.0).get("revision") == want
        except Exception:
            return False

    until(f"{name} was not replaced", replaced, timeout_s)
