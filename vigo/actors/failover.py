"""Promotion: make a standby the primary at a higher term, and fence everyone else.

``promote()`` runs wherever a Ray driver is (`vigocli server promote`, a benchmark) or inside
the control actor (the auto-failover ``Watchdog``). The steps, in order:

1. Ask control for the partition's route; ask every member where it is (short timeouts: a
   member on a dead host does not answer, which is how "dead" is told here, without waiting for
   Ray's node-death detection).
2. Choose the standby (named, or the one holding the newest commit). If the primary still
   answers and the chosen standby is behind it, refuse unless forced.
3. Fence: every member that answers learns the new term first, so the old primary stops
   writing and no standby accepts its stream any more.
4. Promote the chosen standby (it opens its database, adopts the term, starts a new stream
   generation and feeds the others), then commit the new route in control and tell the gateways
   to re-resolve. Envoys' next check-in lands on the new primary; no envoy re-joins.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray

from vigo.actors import NAMESPACE
from vigo.errors import PromoteError

log = logging.getLogger("vigo.actors.failover")

#: How long a member may take to say where it is before it counts as unreachable, seconds.
PING_TIMEOUT_S = 1.5
#: How long the promoted standby may take to open its database and start serving, seconds.
PROMOTE_TIMEOUT_S = 60.0


def _ask(name: str, timeout_s: float = PING_TIMEOUT_S) -> dict[str, Any] | None:
    try:
        return ray.get(ray.get_actor(name, namespace=NAMESPACE).ping.remote(), timeout=timeout_s)
    except Exception:
        return None


def _ask_all(names: list[str], timeout_s: float = PING_TIMEOUT_S) -> dict[str, dict[str, Any] | None]:
    """Ask every member at once, one deadline for all (a dead member costs the timeout once,
    not once per member); None for those that did not answer in time."""
    refs: dict[str, Any] = {}
    for name in names:
        try:
            refs[name] = ray.get_actor(name, namespace=NAMESPACE).ping.remote()
        except Exception:  # no such actor (any more): it does not answer
            continue
    if refs:
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out: dict[str, dict[str, Any] | None] = dict.fromkeys(names)
    for name, ref in refs.items():
        try:
            out[name] = ray.get(ref, timeout=0)
        except Exception:  # not ready (timed out) or failed (actor unavailable)
            continue
    return out


def _on_dead_hosts(route: dict[str, Any]) -> set[str]:
    """Members whose host has no alive Ray node: Ray has declared them dead already, so
    waiting for their answer (or their fencing) would only add its timeout to the outage."""
    hosts = route.get("hosts") or {}
    try:
        from vigo.actors.deploy import HOST_LABEL

        alive = {(n.get("Labels") or {}).get(HOST_LABEL) for n in ray.nodes() if n.get("Alive")}
    except Exception:  # the GCS is busy: ask everyone, as before
        return set()
    return {name for name, host in hosts.items() if host not in alive}


def _order(info: dict[str, Any]) -> tuple:
    pos = info.get("position") or ["", -1, -1]
    return (float(info.get("committed_at") or 0.0), int(pos[1]), int(pos[2]))


def _behind(standby: dict[str, Any], primary: dict[str, Any]) -> bool:
    s, p = standby.get("position"), primary.get("position")
    if not p:
        return False
    if not s or s[0] != p[0]:
        return True
    return (int(s[1]), int(s[2])) < (int(p[1]), int(p[2]))


def promote(partition: str = "p0", standby: str | None = None, *, force: bool = False,
            control: Any = None, unreachable: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    started = time.monotonic()
    control = control or ray.get_actor("control", namespace=NAMESPACE)
    route = _call(control, "route", partition)
    if not route:
        raise PromoteError(f"control knows no partition {partition!r}")
    standbys = list(route.get("standbys") or [])
    if not standbys:
        raise PromoteError(f"partition {partition} has no standby to promote "
                           "(set replication.standbys in server.yaml and deploy again)")
    if standby is not None and standby not in standbys:
        raise PromoteError(f"unknown standby {standby!r}: partition {partition}'s standbys are {', '.join(standbys)}")
    old = route["primary"]
    # Members Ray already declared dead (or the caller knows are down) are not asked.
    down = _on_dead_hosts(route) | set(unreachable)
    asked = _ask_all([name for name in [old, *standbys] if name not in down])
    primary_info = asked.get(old)
    if primary_info is not None and primary_info.get("role") != "primary":
        primary_info = None  # answers, but no longer as primary (fenced earlier)
    infos = {name: info for name in standbys if (info := asked.get(name)) is not None}
    detected_s = time.monotonic() - started
    if standby is None:
        candidates = [n for n, i in infos.items() if i.get("role") == "standby" and i.get("position")]
        if not candidates:
            raise PromoteError(f"no standby of {partition} answers with a position "
                               f"(asked {', '.join(standbys)}); nothing to promote")
        standby = max(candidates, key=lambda n: _order(infos[n]))
    chosen = infos.get(standby)
    if chosen is None:
        raise PromoteError(f"standby {standby} does not answer; choose another (--standby) or bring its host back")
    if not chosen.get("position"):
        raise PromoteError(f"standby {standby} holds no database yet (still receiving its first snapshot)")
    if primary_info is not None and _behind(chosen, primary_info) and not force:
        raise PromoteError(
            f"standby {standby} is behind the primary {old}, which is alive "
            f"(standby at {_fmt(chosen.get('position'))}, primary at {_fmt(primary_info.get('position'))}); "
            "wait for it to catch up (`vigocli server status`) or pass --force to lose the difference")
    term = max(int(route["term"]), int(chosen.get("term") or 0),
               int((primary_info or {}).get("term") or 0)) + 1
    # Fence first: whoever answers learns the term before anyone serves at it, all at once.
    # The ones that did not answer are sent the term too, without waiting: a dead host learns
    # it when it returns (from control's route, or this message if Ray still delivers it).
    others = [n for n in [old, *standbys] if n != standby]
    refs: dict[str, Any] = {}
    for name in others:
        try:
            refs[name] = ray.get_actor(name, namespace=NAMESPACE).fence.remote(term)
        except Exception as exc:
            log.info("could not fence %s now (%s); it will follow control's route when it returns", name, type(exc).__name__)
    waited = {name: ref for name, ref in refs.items() if asked.get(name) is not None}
    if waited:
        ray.wait(list(waited.values()), num_returns=len(waited), timeout=PING_TIMEOUT_S * 2)
    fenced = []
    for name, ref in waited.items():
        try:
            ray.get(ref, timeout=0)
            fenced.append(name)
        except Exception as exc:
            log.info("could not fence %s now (%s); it will follow control's route when it returns", name, type(exc).__name__)
    t0 = time.monotonic()
    result = ray.get(ray.get_actor(standby, namespace=NAMESPACE).promote.remote(term, others), timeout=PROMOTE_TIMEOUT_S)
    _call(control, "set_primary", partition, standby, term)
    promoted_s = time.monotonic() - t0
    rerouted = _reroute_gateways(control)
    log.warning("promoted %s to primary of %s at term %d (old primary %s %s)", standby, partition, term, old,
                "alive, fenced" if primary_info else "unreachable")
    return {
        "partition": partition, "old_primary": old, "old_primary_alive": primary_info is not None,
        "new_primary": standby, "term": term, "held": chosen.get("position"),
        "primary_position": (primary_info or {}).get("position"), "fenced": fenced, "gateways": rerouted,
        "detect_s": round(detected_s, 3), "promotion_s": round(promoted_s, 3),
        "open_s": result.get("promotion_s"),
        "total_s": round(time.monotonic() - started, 3), "forced": force,
    }


def _call(actor: Any, method: str, *args: Any) -> Any:
    return ray.get(getattr(actor, method).remote(*args), timeout=30)


def _reroute_gateways(control: Any) -> list[str]:
    topology = _call(control, "get_topology")
    done = []
    for name in topology.get("gateways", {}):
        try:
            ray.get(ray.get_actor(name, namespace=NAMESPACE).reroute.remote(), timeout=5)
            done.append(name)
        except Exception as exc:  # it re-resolves by itself at its next failed call
            log.info("gateway %s not told to reroute (%s)", name, type(exc).__name__)
    return done


def _fmt(pos: Any) -> str:
    if not pos:
        return "nothing"
    return f"{pos[0]}/{int(pos[1]):08x}/{int(pos[2])}"


class Watchdog:
    """Auto failover inside the control actor: a partition whose primary has not answered for
    ``failover_after_s`` gets its most up-to-date standby promoted. The trade-off: a primary
    cut off by a network split (alive, unreachable) is replaced; it is fenced when it returns,
    and anything acknowledged only by it in asynchronous mode is lost."""

    def __init__(self, control: Any, period_s: float = 0.5) -> None:
        self.control = control
        self.period_s = period_s
        self.down_since: dict[str, float] = {}
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="vigo-watchdog", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                for partition, entry in list(self.control.topology["partitions"].items()):
                    failover = entry.get("failover") or {}
                    if not failover.get("auto") or not entry.get("standbys"):
                        continue
                    self._check(partition, entry, float(failover.get("after_s", 5.0)))
            except Exception:
                log.exception("failover watchdog round failed")

    def _check(self, partition: str, entry: dict[str, Any], after_s: float) -> None:
        asked_at = time.monotonic()  # unanswered since the question, not since its timeout
        info = _ask(entry["primary"], timeout_s=min(PING_TIMEOUT_S, after_s / 2))
        if info is not None and info.get("role") == "primary":
            self.down_since.pop(partition, None)
            return
        since = self.down_since.setdefault(partition, asked_at)
        if time.monotonic() - since < after_s:
            return
        log.warning("primary %s of %s has not answered for %.1f s: promoting a standby",
                    entry["primary"], partition, time.monotonic() - since)
        try:
            result = promote(partition, control=_Local(self.control), unreachable={entry["primary"]})
            log.warning("auto failover: %s", result)
            self.down_since.pop(partition, None)
        except PromoteError as exc:
            log.error("auto failover of %s refused: %s", partition, exc)


class _Local:
    """Control's own methods, called in-process by its watchdog, shaped like an actor handle
    (calling its own actor handle from a thread inside it would wait on itself)."""

    def __init__(self, control: Any) -> None:
        self._control = control

    def __getattr__(self, method: str) -> Any:
        target = getattr(self._control, method)

        class _Remote:
            @staticmethod
            def remote(*args: Any) -> Any:
                return ray.put(target(*args))

        return _Remote
