"""The partition member's upkeep round (vigo.actors.member, on the fake runtime): every step runs
on its own guard, so one that fails is logged by name and the later ones still run."""

from __future__ import annotations

import logging

from tests.fakeruntime import FakeRuntime
from vigo.actors import member as member_mod


class WantsSnapshot:
    """A replication log whose standbys want a snapshot (all the upkeep round asks of it)."""

    snapshot_wanted = True

    def status(self) -> list[dict]:
        return []


def test_a_failing_first_upkeep_step_skips_none_of_the_later_ones(tmp_path, monkeypatch, caplog):
    member = member_mod.Member(str(tmp_path / "a"), None, "primary-p0", "primary", rt=FakeRuntime())
    member._stop.set()  # no upkeep thread: the round below is the only one
    try:
        partition = member.partition
        assert partition is not None and partition.upkeep_steps()[0][0] == "checkpoint"
        ran: list[str] = []

        def checkpoint() -> None:
            ran.append("checkpoint")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(partition.store, "checkpoint", checkpoint)
        monkeypatch.setattr(partition.archive, "snapshot_if_due", lambda: ran.append("scheduled snapshot"))
        monkeypatch.setattr(partition.store.stream, "snapshot", lambda: ran.append("snapshot for the standbys"))
        monkeypatch.setattr(member, "replication", WantsSnapshot())
        real_export = member._export_lag
        monkeypatch.setattr(member, "_export_lag", lambda: (ran.append("metrics export"), real_export()))

        with caplog.at_level(logging.ERROR, logger="vigo.actors.member"):
            member._upkeep_round()

        assert ran == ["checkpoint", "scheduled snapshot", "snapshot for the standbys", "metrics export"]
        failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(failures) == 1
        assert "primary-p0 upkeep: checkpoint failed" in failures[0] and "No space left on device" in failures[0]

        # A failing later step is named too, and the round still reaches the metrics.
        ran.clear()
        caplog.clear()
        monkeypatch.setattr(partition.store, "checkpoint", lambda: ran.append("checkpoint"))
        monkeypatch.setattr(partition.archive, "snapshot_if_due", lambda: 1 / 0)
        with caplog.at_level(logging.ERROR, logger="vigo.actors.member"):
            member._upkeep_round()
        assert ran == ["checkpoint", "snapshot for the standbys", "metrics export"]
        assert ["scheduled snapshot failed: ZeroDivisionError" in r.getMessage() for r in caplog.records] == [True]
    finally:
        member.partition.close()
