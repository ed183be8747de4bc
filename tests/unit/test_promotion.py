"""The promotion decision (vigo.server.peer.promotion) as a pure function: every refusal, the
choice of standby, --standby, --force, members that do not answer, the term and the fencing
order. No Ray, no actors: a route and what each member said."""

from __future__ import annotations

import pytest

from vigo.errors import PromoteError
from vigo.server.peer.promotion import (
    MemberState,
    behind,
    format_position,
    members_to_ask,
    on_dead_hosts,
    plan_promotion,
)

GEN = "3f0c9a1d2b7e4411"
ROUTE = {"primary": "primary-p0", "term": 3, "standbys": ["standby-p0-b", "standby-p0-c"],
         "hosts": {"primary-p0": "a", "standby-p0-b": "b", "standby-p0-c": "c"}}


def primary(index: int = 4, offset: int = 1000, term: int = 3, committed_at: float = 100.0) -> MemberState:
    return MemberState("primary-p0", "primary", term, (GEN, index, offset), committed_at)


def standby(name: str, index: int = 4, offset: int = 1000, term: int = 3, committed_at: float = 100.0,
            generation: str = GEN) -> MemberState:
    return MemberState(name, "standby", term, (generation, index, offset), committed_at)


def in_sync() -> dict[str, MemberState | None]:
    return {"primary-p0": primary(), "standby-p0-b": standby("standby-p0-b"), "standby-p0-c": standby("standby-p0-c")}


# --- refusals (exit code 5, nothing changed) ----------------------------------------------------

def test_refuses_an_unknown_partition():
    with pytest.raises(PromoteError, match="control knows no partition 'p9'") as err:
        plan_promotion("p9", None, {})
    assert err.value.exit_code == 5


def test_refuses_a_partition_without_standbys():
    route = {"primary": "primary-p0", "term": 1, "standbys": []}
    with pytest.raises(PromoteError, match="partition p0 has no standby to promote"):
        plan_promotion("p0", route, {"primary-p0": primary()})


def test_refuses_an_unknown_standby_and_lists_the_known_ones():
    with pytest.raises(PromoteError, match=r"unknown standby 'standby-p0-zz': partition p0's standbys are "
                                           r"standby-p0-b, standby-p0-c"):
        plan_promotion("p0", ROUTE, in_sync(), standby="standby-p0-zz")


def test_the_refusals_that_need_no_answer_come_before_anyone_is_asked():
    assert members_to_ask("p0", ROUTE) == ["primary-p0", "standby-p0-b", "standby-p0-c"]
    assert members_to_ask("p0", ROUTE, "standby-p0-c") == ["primary-p0", "standby-p0-b", "standby-p0-c"]
    for partition, route, name in (("p9", None, None), ("p0", {**ROUTE, "standbys": []}, None),
                                   ("p0", ROUTE, "standby-p0-zz")):
        with pytest.raises(PromoteError):
            members_to_ask(partition, route, name)


def test_refuses_when_no_standby_answers_with_a_position():
    states = {"primary-p0": None, "standby-p0-b": None,
              "standby-p0-c": MemberState("standby-p0-c", "standby", 3, None)}
    with pytest.raises(PromoteError, match="no standby of p0 answers with a position "
                                           r"\(asked standby-p0-b, standby-p0-c\); nothing to promote"):
        plan_promotion("p0", ROUTE, states)


def test_refuses_a_named_standby_that_does_not_answer():
    states = {**in_sync(), "standby-p0-c": None}
    with pytest.raises(PromoteError, match="standby standby-p0-c does not answer; choose another"):
        plan_promotion("p0", ROUTE, states, standby="standby-p0-c")
    # a member missing from the states did not answer either
    del states["standby-p0-c"]
    with pytest.raises(PromoteError, match="standby standby-p0-c does not answer"):
        plan_promotion("p0", ROUTE, states, standby="standby-p0-c")


def test_refuses_a_named_standby_without_a_database_yet():
    states = {**in_sync(), "standby-p0-c": MemberState("standby-p0-c", "standby", 3, None)}
    with pytest.raises(PromoteError, match="standby standby-p0-c holds no database yet"):
        plan_promotion("p0", ROUTE, states, standby="standby-p0-c")


def test_refuses_a_standby_behind_a_live_primary_unless_forced():
    states = {**in_sync(), "standby-p0-b": standby("standby-p0-b", offset=500, committed_at=90.0),
              "standby-p0-c": standby("standby-p0-c", offset=600, committed_at=95.0)}
    with pytest.raises(PromoteError) as err:
        plan_promotion("p0", ROUTE, states)
    assert str(err.value) == (
        f"standby standby-p0-c is behind the primary primary-p0, which is alive (standby at {GEN}/00000004/600, "
        f"primary at {GEN}/00000004/1000); wait for it to catch up (`vigocli server status`) or pass --force "
        "to lose the difference")
    plan = plan_promotion("p0", ROUTE, states, force=True)
    assert plan.standby == "standby-p0-c" and plan.primary == primary()


def test_a_standby_of_another_generation_is_behind_whatever_its_offset():
    assert behind(standby("s", index=9, offset=9999, generation="other"), primary())
    assert behind(MemberState("s", "standby", 3, None), primary())
    assert not behind(standby("s"), primary())
    assert not behind(standby("s", offset=2000), primary())
    assert not behind(standby("s"), MemberState("primary-p0", "primary", 3, None))  # the primary holds nothing


# --- the choice ---------------------------------------------------------------------------------

def test_chooses_the_standby_holding_the_newest_commit():
    states = {**in_sync(), "standby-p0-b": standby("standby-p0-b", committed_at=99.0, offset=2000),
              "standby-p0-c": standby("standby-p0-c", committed_at=100.0)}
    assert plan_promotion("p0", ROUTE, states).standby == "standby-p0-c"  # newest commit wins
    states["standby-p0-b"] = standby("standby-p0-b", committed_at=100.0, offset=2000)
    assert plan_promotion("p0", ROUTE, states).standby == "standby-p0-b"  # same commit time: further on


def test_equal_standbys_go_by_route_order():
    assert plan_promotion("p0", ROUTE, in_sync()).standby == "standby-p0-b"


def test_only_members_answering_as_standby_with_a_position_are_candidates():
    states = {**in_sync(), "standby-p0-b": MemberState("standby-p0-b", "primary", 3, (GEN, 9, 9), 999.0)}
    assert plan_promotion("p0", ROUTE, states).standby == "standby-p0-c"


def test_a_named_standby_wins_over_a_newer_one():
    states = {**in_sync(), "standby-p0-b": standby("standby-p0-b", committed_at=200.0, offset=5000)}
    plan = plan_promotion("p0", ROUTE, states, standby="standby-p0-c")
    assert plan.standby == "standby-p0-c" and plan.held == states["standby-p0-c"]


# --- dead members, the term and the fencing order ------------------------------------------------

def test_a_dead_primary_is_not_waited_for_and_never_refuses():
    states = {"primary-p0": None, "standby-p0-b": standby("standby-p0-b", offset=10),
              "standby-p0-c": standby("standby-p0-c", offset=20)}
    plan = plan_promotion("p0", ROUTE, states)
    assert plan.standby == "standby-p0-c" and plan.primary is None
    assert plan.fence == ("primary-p0", "standby-p0-b")  # the dead primary is sent the term too
    assert plan.await_fence == ("standby-p0-b",)  # but only those that answered are waited for


def test_a_primary_that_answers_as_standby_was_fenced_earlier():
    states = {**in_sync(), "primary-p0": MemberState("primary-p0", "standby", 3, (GEN, 9, 9), 999.0)}
    plan = plan_promotion("p0", ROUTE, states)  # its newer position does not make the standby "behind"
    assert plan.primary is None and plan.standby == "standby-p0-b"
    assert plan.await_fence == ("primary-p0", "standby-p0-c")  # it answers: its fencing is waited for


def test_fencing_order_is_old_primary_first_then_standbys_in_route_order():
    plan = plan_promotion("p0", ROUTE, in_sync(), standby="standby-p0-c")
    assert (plan.old_primary, plan.fence, plan.await_fence) == (
        "primary-p0", ("primary-p0", "standby-p0-b"), ("primary-p0", "standby-p0-b"))


def test_the_new_term_is_above_every_term_seen():
    assert plan_promotion("p0", ROUTE, in_sync()).term == 4
    states = {**in_sync(), "standby-p0-b": standby("standby-p0-b", term=7)}
    assert plan_promotion("p0", ROUTE, states).term == 8  # the chosen standby saw a later term
    states = {**in_sync(), "primary-p0": primary(term=9)}
    assert plan_promotion("p0", ROUTE, states).term == 10  # the live primary did
    states = {**in_sync(), "standby-p0-c": standby("standby-p0-c", term=12)}
    assert plan_promotion("p0", ROUTE, states).term == 4  # an unchosen standby's term does not count


def test_members_on_dead_hosts():
    assert on_dead_hosts(ROUTE, {"b", "c", "head"}) == {"primary-p0"}
    assert on_dead_hosts(ROUTE, {"a", "b", "c"}) == set()
    assert on_dead_hosts({"primary": "x", "term": 1}, set()) == set()  # no hosts recorded: nobody is skipped


def test_member_state_from_a_ping_answer():
    answer = {"partition": "p0", "name": "standby-p0-b", "role": "standby", "term": 3, "pid": 1,
              "position": [GEN, 4, 1000], "committed_at": 100.5}
    assert MemberState.from_answer(answer) == MemberState("standby-p0-b", "standby", 3, (GEN, 4, 1000), 100.5)
    empty = MemberState.from_answer({"name": "s", "role": "standby", "term": None, "position": None,
                                     "committed_at": None})
    assert (empty.term, empty.position, empty.committed_at) == (0, None, 0.0)
    assert format_position([GEN, 4, 1000]) == f"{GEN}/00000004/1000" and format_position(None) == "nothing"
