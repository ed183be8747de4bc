"""The promotion decision as a pure function: which standby `server promote` makes primary, at
which term, whom it fences and whose fencing it waits for, or why it refuses (``PromoteError``,
exit code 5, nothing changed). Its inputs are control's route for the partition and what each
member answered when asked where it is (None: it did not answer, or its host is dead). Asking,
fencing and promoting over Ray is vigo.actors.failover's part.

The order a plan is carried out in, and why:

1. Fence every other member at the new term, the old primary first, all at once: whoever
   answers learns the term before anyone serves at it, so the old primary stops writing and no
   standby accepts its stream any more. Only the ones that answered are waited for; a dead host
   learns the term when it returns (from control's route).
2. Promote the chosen standby at the term, feeding the others.
3. Commit the new route in control, then tell the gateways to re-resolve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vigo.errors import PromoteError


@dataclass(frozen=True)
class MemberState:
    """What one partition member said when asked where it is (its ``ping`` answer)."""

    name: str
    role: str | None  # "primary" or "standby"
    term: int  # the highest term it has seen
    position: tuple[str, int, int] | None  # (generation, index, offset) it holds; None: no database yet
    committed_at: float = 0.0  # primary clock time of the newest commit it holds; 0: unknown

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> MemberState:
        pos = answer.get("position")
        return cls(name=str(answer.get("name")), role=answer.get("role"), term=int(answer.get("term") or 0),
                   position=(str(pos[0]), int(pos[1]), int(pos[2])) if pos else None,
                   committed_at=float(answer.get("committed_at") or 0.0))


@dataclass(frozen=True)
class PromotionPlan:
    partition: str
    old_primary: str
    standby: str  # the member that becomes primary
    term: int  # the new term: one above every term control or an answering member has seen
    fence: tuple[str, ...]  # every other member, old primary first, in route order
    await_fence: tuple[str, ...]  # those of them that answered: their fencing is waited for
    held: MemberState  # what the promoted standby holds
    primary: MemberState | None  # the old primary, if it still answers as primary


def members_to_ask(partition: str, route: Mapping[str, Any] | None, standby: str | None = None) -> list[str]:
    """The partition's members, old primary first; the refusals that need nobody's answer."""
    if not route:
        raise PromoteError(f"control knows no partition {partition!r}")
    standbys = list(route.get("standbys") or [])
    if not standbys:
        raise PromoteError(f"partition {partition} has no standby to promote "
                           "(set replication.standbys in server.yaml and deploy again)")
    if standby is not None and standby not in standbys:
        raise PromoteError(f"unknown standby {standby!r}: partition {partition}'s standbys are {', '.join(standbys)}")
    return [route["primary"], *standbys]


def on_dead_hosts(route: Mapping[str, Any], alive_hosts: set[str]) -> set[str]:
    """Members whose host has no alive node: nobody needs to wait for their answer."""
    return {name for name, host in (route.get("hosts") or {}).items() if host not in alive_hosts}


def plan_promotion(partition: str, route: Mapping[str, Any] | None, states: Mapping[str, MemberState | None], *,
                   standby: str | None = None, force: bool = False) -> PromotionPlan:
    """Decide a promotion from control's ``route`` and the members' ``states`` (a member missing
    from ``states`` or None there did not answer). ``standby`` names the member to promote
    (default: the standby holding the newest commit); ``force`` promotes it even if it is behind
    a primary that still answers. Raises PromoteError with the reason when it refuses."""
    members = members_to_ask(partition, route, standby)
    assert route is not None  # members_to_ask refused otherwise
    old, standbys = members[0], members[1:]
    primary = states.get(old)
    if primary is not None and primary.role != "primary":
        primary = None  # answers, but no longer as primary (fenced earlier)
    answered = {name: state for name in standbys if (state := states.get(name)) is not None}
    if standby is None:
        candidates = [n for n, s in answered.items() if s.role == "standby" and s.position]
        if not candidates:
            raise PromoteError(f"no standby of {partition} answers with a position "
                               f"(asked {', '.join(standbys)}); nothing to promote")
        standby = max(candidates, key=lambda n: _newest_first(answered[n]))  # ties: the first in route order
    chosen = answered.get(standby)
    if chosen is None:
        raise PromoteError(f"standby {standby} does not answer; choose another (--standby) or bring its host back")
    if not chosen.position:
        raise PromoteError(f"standby {standby} holds no database yet (still receiving its first snapshot)")
    if primary is not None and behind(chosen, primary) and not force:
        raise PromoteError(
            f"standby {standby} is behind the primary {old}, which is alive "
            f"(standby at {format_position(chosen.position)}, primary at {format_position(primary.position)}); "
            "wait for it to catch up (`vigocli server status`) or pass --force to lose the difference")
    term = max(int(route["term"]), chosen.term, primary.term if primary else 0) + 1
    others = tuple(n for n in members if n != standby)
    return PromotionPlan(partition=partition, old_primary=old, standby=standby, term=term, fence=others,
                         await_fence=tuple(n for n in others if states.get(n) is not None),
                         held=chosen, primary=primary)


def _newest_first(state: MemberState) -> tuple[float, int, int]:
    pos = state.position or ("", -1, -1)
    return (state.committed_at, pos[1], pos[2])


def behind(standby: MemberState, primary: MemberState) -> bool:
    """Whether ``standby`` lacks something ``primary`` holds (another generation counts as behind)."""
    s, p = standby.position, primary.position
    if not p:
        return False
    if not s or s[0] != p[0]:
        return True
    return (s[1], s[2]) < (p[1], p[2])


def format_position(pos: tuple[str, int, int] | list | None) -> str:
    if not pos:
        return "nothing"
    return f"{pos[0]}/{int(pos[1]):08x}/{int(pos[2])}"
