"""Promotion over Ray: make a standby the primary at a higher term, and fence everyone else.

``promote()`` runs wherever a Ray driver is (`vigocli server promote`, a benchmark) or inside
the control actor (the auto-failover ``Watchdog``). What to do is decided by the pure
``plan_promotion`` (vigo.server.peer.promotion: the choice of standby, the refusals, the term
and the fencing order); this module gathers its inputs and carries it out:

1. Ask control for the partition's route; ask every member where it is (short timeouts: a
   member on a dead host does not answer, which is how "dead" is told here, without waiting for
   Ray's node-death detection; members on hosts Ray already declared dead are not asked).
2. Plan, or refuse.
3. Fence every other member at the new term, all at once, waiting only for those that answered.
4. Promote the chosen standby (it opens its database, adopts the term, starts a new stream
   generation and feeds the others), then commit the new route in control and tell the gateways
   to re-resolve. Envoys' next check-in lands on the new primary; no envoy re-joins.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from vigo.actors.runtime import RAY, Runtime
from vigo.errors import PromoteError
from vigo.server.peer import promotion

log = logging.getLogger("vigo.actors.failover")

#: How long a member may take to say where it is before it counts as unreachable, seconds.
PING_TIMEOUT_S = 1.5
#: How long the members that answered may take to acknowledge their fencing, seconds.
FENCE_TIMEOUT_S = PING_TIMEOUT_S * 2
#: How long the promoted standby may take to open its database and start serving, seconds.
PROMOTE_TIMEOUT_S = 60.0
#: Longest wait for control's answer, seconds.
CONTROL_TIMEOUT_S = 30.0
#: Longest wait for a gateway to re-resolve its route, seconds.
REROUTE_TIMEOUT_S = 5.0


class _RemoteControl:
    """Control's topology methods over Ray, for a driver. The watchdog passes the control
    object itself instead: calling its own actor from a thread inside it would wait on itself."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.handle = rt.actor("control")

    def route(self, partition: str) -> dict[str, Any] | None:
        return self.rt.call(self.handle, "route", partition, timeout_s=CONTROL_TIMEOUT_S)

    def set_primary(self, partition: str, primary: str, term: int) -> dict[str, Any]:
        return self.rt.call(self.handle, "set_primary", partition, primary, term, timeout_s=CONTROL_TIMEOUT_S)

    def get_topology(self) -> dict[str, Any]:
        return self.rt.call(self.handle, "get_topology", timeout_s=CONTROL_TIMEOUT_S)


def _ask(name: str, timeout_s: float = PING_TIMEOUT_S, rt: Runtime = RAY) -> dict[str, Any] | None:
    try:
        return rt.call(rt.actor(name), "ping", timeout_s=timeout_s)
    except Exception:
        return None


def _ask_all(names: list[str], timeout_s: float = PING_TIMEOUT_S, rt: Runtime = RAY) -> dict[str, dict[str, Any] | None]:
    """Ask every member at once, one deadline for all (a dead member costs the timeout once,
    not once per member); None for those that did not answer in time."""
    refs: dict[str, Any] = {}
    for name in names:
        try:
            refs[name] = rt.submit(rt.actor(name), "ping")
        except Exception:  # no such actor (any more): it does not answer
            continue
    rt.wait(list(refs.values()), timeout_s=timeout_s)
    out: dict[str, dict[str, Any] | None] = dict.fromkeys(names)
    for name, ref in refs.items():
        try:
            out[name] = rt.result(ref, timeout_s=0)
        except Exception:  # not ready (timed out) or failed (actor unavailable)
            continue
    return out


def _on_dead_hosts(route: dict[str, Any], rt: Runtime) -> set[str]:
    """Members whose host has no alive Ray node: Ray has declared them dead already, so
    waiting for their answer (or their fencing) would only add its timeout to the outage."""
    try:
        alive = set(rt.host_labels().values())
    except Exception:  # the GCS is busy: ask everyone, as before
        return set()
    return promotion.on_dead_hosts(route, alive)


def promote(partition: str = "p0", standby: str | None = None, *, force: bool = False,
            control: Any = None, unreachable: set[str] | frozenset[str] = frozenset(),
            rt: Runtime = RAY) -> dict[str, Any]:
    """Promote ``standby`` (default: the one holding the newest commit) of ``partition``.
    ``control`` is anything with control's ``route``/``set_primary``/``get_topology`` (default:
    the control actor); ``unreachable`` names members known to be down (not asked)."""
    started = time.monotonic()
    control = control if control is not None else _RemoteControl(rt)
    route = control.route(partition)
    members = promotion.members_to_ask(partition, route, standby)  # refusals that need nobody's answer
    down = _on_dead_hosts(route, rt) | set(unreachable)
    answers = _ask_all([name for name in members if name not in down], rt=rt)
    states = {name: promotion.MemberState.from_answer(a) if a is not None else None for name, a in answers.items()}
    detected_s = time.monotonic() - started
    plan = promotion.plan_promotion(partition, route, states, standby=standby, force=force)
    fenced = _fence(plan, rt)
    t0 = time.monotonic()
    result = rt.call(rt.actor(plan.standby), "promote", plan.term, list(plan.fence), timeout_s=PROMOTE_TIMEOUT_S)
    control.set_primary(partition, plan.standby, plan.term)
    promoted_s = time.monotonic() - t0
    rerouted = _reroute_gateways(control, rt=rt)
    log.warning("promoted %s to primary of %s at term %d (old primary %s %s)", plan.standby, partition, plan.term,
                plan.old_primary, "alive, fenced" if plan.primary else "unreachable")
    return {
        "partition": partition, "old_primary": plan.old_primary, "old_primary_alive": plan.primary is not None,
        "new_primary": plan.standby, "term": plan.term, "held": list(plan.held.position) if plan.held.position else None,
        "primary_position": list(plan.primary.position) if plan.primary and plan.primary.position else None,
        "fenced": fenced, "gateways": rerouted,
        "detect_s": round(detected_s, 3), "promotion_s": round(promoted_s, 3),
        "open_s": result.get("promotion_s"),
        "total_s": round(time.monotonic() - started, 3), "forced": force,
    }


def _fence(plan: promotion.PromotionPlan, rt: Runtime) -> list[str]:
    """Send the term to every member of ``plan.fence`` at once; wait (bounded) for those that
    answered. Returns who acknowledged. The others learn it when they return, from control's
    route (or this message, if Ray still delivers it)."""
    refs: dict[str, Any] = {}
    for name in plan.fence:
        try:
            refs[name] = rt.submit(rt.actor(name), "fence", plan.term)
        except Exception as exc:
            log.info("could not fence %s now (%s); it will follow control's route when it returns", name, type(exc).__name__)
    waited = {name: ref for name, ref in refs.items() if name in plan.await_fence}
    rt.wait(list(waited.values()), timeout_s=FENCE_TIMEOUT_S)
    fenced = []
    for name, ref in waited.items():
        try:
            rt.result(ref, timeout_s=0)
            fenced.append(name)
        except Exception as exc:
            log.info("could not fence %s now (%s); it will follow control's route when it returns", name, type(exc).__name__)
    return fenced


def _reroute_gateways(control: Any, rt: Runtime = RAY) -> list[str]:
    topology = control.get_topology()
    done = []
    for name in topology.get("gateways", {}):
        try:
            rt.call(rt.actor(name), "reroute", timeout_s=REROUTE_TIMEOUT_S)
            done.append(name)
        except Exception as exc:  # it re-resolves by itself at its next failed call
            log.info("gateway %s not told to reroute (%s)", name, type(exc).__name__)
    return done


class Watchdog:
    """Auto failover inside the control actor: a partition whose primary has not answered for
    ``failover_after_s`` gets its most up-to-date standby promoted. The trade-off: a primary
    cut off by a network split (alive, unreachable) is replaced; it is fenced when it returns,
    and anything acknowledged only by it in asynchronous mode is lost."""

    def __init__(self, control: Any, period_s: float = 0.5, rt: Runtime = RAY) -> None:
        self.control = control
        self.period_s = period_s
        self.rt = rt
        self.down_since: dict[str, float] = {}
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="vigo-watchdog", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.round()
            except Exception:
                log.exception("failover watchdog round failed")

    def round(self) -> None:
        """Check every partition that asked for automatic failover and has a standby."""
        for partition, entry in list(self.control.topology["partitions"].items()):
            failover = entry.get("failover") or {}
            if not failover.get("auto") or not entry.get("standbys"):
                continue
            held = getattr(self.control, "failover_held", None)
            if held is not None and held(partition):  # a deploy restarts the primary on purpose
                self.down_since.pop(partition, None)
                continue
            self._check(partition, entry, float(failover.get("after_s", 5.0)))

    def _check(self, partition: str, entry: dict[str, Any], after_s: float) -> None:
        asked_at = time.monotonic()  # unanswered since the question, not since its timeout
        info = _ask(entry["primary"], timeout_s=min(PING_TIMEOUT_S, after_s / 2), rt=self.rt)
        if info is not None and info.get("role") == "primary":
            self.down_since.pop(partition, None)
            return
        since = self.down_since.setdefault(partition, asked_at)
        if time.monotonic() - since < after_s:
            return
        log.warning("primary %s of %s has not answered for %.1f s: promoting a standby",
                    entry["primary"], partition, time.monotonic() - since)
        try:
            # Control's own methods, in-process: its actor handle would wait on this very actor.
            result = promote(partition, control=self.control, unreachable={entry["primary"]}, rt=self.rt)
            log.warning("auto failover: %s", result)
            self.down_since.pop(partition, None)
        except PromoteError as exc:
            log.error("auto failover of %s refused: %s", partition, exc)
