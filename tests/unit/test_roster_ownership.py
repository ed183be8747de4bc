"""Slice ownership: rendezvous hashing over live bolts, suspicion, hold-down, split brain."""

from __future__ import annotations

import pytest

from vigo.errors import ConfigError, RosterError
from vigo.roster import Ownership, OwnershipConfig, rank, weight

BOLTS = [f"bolt{i}" for i in range(5)]
ENVOYS = [f"web-{i:05d}.example.com" for i in range(20_000)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def started(bolts=BOLTS, **kw) -> tuple[Clock, Ownership]:
    clock = Clock()
    own = Ownership(bolts, now=clock, **kw)
    own.update(bolts)
    return clock, own


def owners(own: Ownership) -> dict[str, str | None]:
    return {e: own.owner(e) for e in ENVOYS}


def test_only_a_dead_bolts_envoys_move_and_they_spread_evenly():
    clock, own = started()
    before = owners(own)
    own.update([b for b in BOLTS if b != "bolt2"])
    clock.t = 4.0  # the suspicion delay
    own.update([b for b in BOLTS if b != "bolt2"])
    after = owners(own)
    moved = [e for e in ENVOYS if before[e] != after[e]]
    orphans = [e for e in ENVOYS if before[e] == "bolt2"]
    assert sorted(moved) == sorted(orphans)
    # Each survivor takes at most 1.2 / (K - 1) of the dead bolt's envoys.
    k = len(BOLTS)
    for bolt in BOLTS:
        if bolt != "bolt2":
            share = sum(after[e] == bolt for e in orphans) / len(orphans)
            assert share <= 1.2 / (k - 1), (bolt, share)
    # Each moved to its own runner-up.
    assert all(after[e] == rank(e, BOLTS)[1] for e in orphans)


def test_a_dead_bolt_stays_owner_during_the_suspicion_delay():
    clock, own = started()
    envoy = next(e for e in ENVOYS if own.owner(e) == "bolt1")
    own.update([b for b in BOLTS if b != "bolt1"])
    clock.t = 3.9
    assert own.owner(envoy) == "bolt1" and own.reassignments == 0
    assert own.stats()["suspected"] == ["bolt1"]
    clock.t = 4.0
    assert own.owner(envoy) == rank(envoy, BOLTS)[1]
    assert own.reassignments == 1


def test_a_stall_shorter_than_the_suspicion_delay_moves_nothing():
    clock, own = started()
    for step in range(30):
        clock.t = step * 1.0
        own.update(BOLTS if step % 4 else [b for b in BOLTS if b != "bolt0"])
    assert own.reassignments == 0


def test_a_returning_bolt_reclaims_its_envoys_after_the_hold_down():
    clock, own = started()
    before = owners(own)
    without = [b for b in BOLTS if b != "bolt3"]
    own.update(without)
    clock.t = 10.0
    own.update(without)
    assert "bolt3" not in own.live()
    clock.t = 15.0
    own.update(BOLTS)  # back (a restarted actor, same name)
    clock.t = 60.0
    own.update(BOLTS)
    assert "bolt3" not in own.live()  # held down until 60 s after it left (at 4 s)
    assert own.stats()["held_down"] == ["bolt3"]
    clock.t = 64.0
    own.update(BOLTS)
    assert owners(own) == before
    assert own.reassignments == 2


def test_five_flaps_in_sixty_seconds_cause_at_most_two_reassignments():
    clock, own = started()
    # Down 6 s, up 6 s, five times: every down period is long enough to be believed.
    for step in range(int(120 / 0.5)):
        clock.t = step * 0.5
        phase = clock.t % 12.0
        flapping = clock.t < 60.0 and phase < 6.0
        own.update([b for b in BOLTS if not (b == "bolt4" and flapping)])
    assert own.reassignments <= 2
    assert own.live() == frozenset(BOLTS)  # and it is back once it stopped flapping


def test_a_minority_keeps_its_envoys_and_takes_over_nothing():
    clock, own = started(self_name="bolt0")
    mine = {e for e in ENVOYS if own.serves(e)}
    assert mine == {e for e in ENVOYS if rank(e, BOLTS)[0] == "bolt0"}
    # A partition: bolt0 sees only bolt1 (2 of 5, not more than half).
    own.update(["bolt0", "bolt1"])
    clock.t = 5.0
    own.update(["bolt0", "bolt1"])
    assert not own.has_quorum()
    assert {e for e in ENVOYS if own.owner(e) == "bolt0"} > mine  # what routing alone would give
    assert {e for e in ENVOYS if own.serves(e)} == mine
    # Healed (and past the hold-down): a quorum again, and the same slice.
    for t in (70.0, 75.0):
        clock.t = t
        own.update(BOLTS)
    assert own.has_quorum()
    assert {e for e in ENVOYS if own.serves(e)} == mine


def test_rank_and_weight_are_deterministic_and_owner_needs_a_live_bolt():
    assert weight("web-1", "bolt0") == weight("web-1", "bolt0") != weight("web-1", "bolt1")
    assert rank("web-1", BOLTS) == rank("web-1", list(reversed(BOLTS)))
    clock = Clock()
    own = Ownership(BOLTS, now=clock)
    assert own.owner("web-1") is None and own.standby("web-1") is None
    own.update(["bolt1"])
    assert own.owner("web-1") == "bolt1" and own.standby("web-1") is None


def test_bad_arguments_are_refused():
    with pytest.raises(RosterError, match="at least one configured bolt"):
        Ownership([])
    with pytest.raises(RosterError, match="not among the configured bolts"):
        Ownership(BOLTS, self_name="bolt9")
    with pytest.raises(RosterError, match="without self_name"):
        Ownership(BOLTS).serves("web-1")
    with pytest.raises(ConfigError, match="quorum_fraction"):
        Ownership(BOLTS, config=OwnershipConfig(quorum_fraction=1.0))
    with pytest.raises(ConfigError, match="suspicion_s"):
        Ownership(BOLTS, config=OwnershipConfig(suspicion_s=-1))
