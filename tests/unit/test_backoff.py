"""vigo.retry (full jitter, retry-after floors) and vigo.agent.backoff (the envoy's pacing and
splay), on a seeded RNG and a fake clock (nothing sleeps)."""

from __future__ import annotations

import logging
import random
import statistics

import pytest

from vigo.agent import backoff as bo
from vigo.retry import Backoff, full_jitter
from vigo.server.fleet import splay_for


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_full_jitter_bounds_grow_then_stop_at_the_cap():
    rng = random.Random(7)
    for attempt in range(40):
        bound = min(60.0, 1.0 * 2**attempt)
        samples = [full_jitter(attempt, 1.0, 60.0, rng) for _ in range(200)]
        assert all(0.0 <= s <= bound for s in samples)
        # full jitter: the samples cover the whole window, not just its top
        assert min(samples) < 0.1 * bound and max(samples) > 0.9 * bound
    assert full_jitter(10_000, 1.0, 60.0, rng) <= 60.0  # no overflow for huge attempts


def test_full_jitter_is_uniform_over_the_window():
    rng = random.Random(11)
    samples = [full_jitter(20, 1.0, 300.0, rng) for _ in range(20_000)]
    assert statistics.mean(samples) == pytest.approx(150.0, rel=0.03)
    deciles = [sum(1 for s in samples if k * 30 <= s < (k + 1) * 30) for k in range(10)]
    assert all(1800 <= n <= 2200 for n in deciles), deciles


def test_same_seed_same_delays():
    a = Backoff(bo.RECONNECT_BASE_S, bo.RECONNECT_CAP_S, rng=random.Random(3), clock=FakeClock())
    b = Backoff(bo.RECONNECT_BASE_S, bo.RECONNECT_CAP_S, rng=random.Random(3), clock=FakeClock())
    assert [a.delay() for _ in range(12)] == [b.delay() for _ in range(12)]


def test_backoff_counts_attempts_resets_and_tracks_when_the_next_try_is_due():
    clock = FakeClock()
    b = Backoff(1.0, 8.0, rng=random.Random(1), clock=clock)
    delays = [b.delay() for _ in range(6)]
    assert b.attempt == 6
    for attempt, d in enumerate(delays):
        assert 0 <= d <= min(8.0, 2**attempt)
    assert b.remaining() == pytest.approx(delays[-1])
    clock.now += delays[-1] / 2
    assert b.remaining() == pytest.approx(delays[-1] / 2)
    clock.now += delays[-1]
    assert b.remaining() == 0.0
    b.reset()
    assert b.attempt == 0 and b.remaining() == 0.0
    assert b.delay() <= 1.0


def test_retry_after_is_a_floor_never_a_ceiling():
    b = Backoff(1.0, 300.0, rng=random.Random(5), clock=FakeClock())
    for _ in range(50):
        assert b.delay(retry_after_s=7.5) >= 7.5
    # once the jitter window is far above the floor, the dice still decide (never clamped down)
    b.attempt = 20
    rng_delays = [b.delay(retry_after_s=0.5) for _ in range(200)]
    assert all(d >= 0.5 for d in rng_delays) and max(rng_delays) > 100


def test_backoff_without_jitter_doubles_from_base_to_cap_and_keeps_the_floor():
    clock = FakeClock()
    b = Backoff(1.0, 10.0, jitter=False, clock=clock)
    assert [b.delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.remaining() == 10.0
    assert b.delay(retry_after_s=30.0) == 30.0
    b.reset()
    assert b.remaining() == 0.0 and b.delay() == 1.0


def test_retries_are_logged_loudly_only_at_the_first_tenth_and_every_fiftieth_failure():
    b = Backoff(1.0, 2.0, rng=random.Random(1), clock=FakeClock())
    loud = []
    for _ in range(120):
        b.delay()
        if b.log_level() == logging.WARNING:
            loud.append(b.attempt)
        else:
            assert b.log_level() == logging.DEBUG
    assert loud == [1, 10, 50, 100]


def test_backoff_rejects_nonsense_bounds():
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
    with pytest.raises(ValueError):
        full_jitter(-1, 1.0, 2.0, random.Random())


def test_splay_is_deterministic_spread_and_matches_the_server():
    ids = [f"{i:032x}" for i in range(2000)]
    offsets = [bo.splay(envoy_id, 60.0) for envoy_id in ids]
    assert offsets == [bo.splay(envoy_id, 60.0) for envoy_id in ids]
    assert all(0.0 <= o < 60.0 for o in offsets)
    assert statistics.mean(offsets) == pytest.approx(30.0, rel=0.08)
    assert [splay_for(envoy_id, 60.0) for envoy_id in ids[:50]] == offsets[:50]
    assert bo.splay("x", 0) == 0.0


def test_flush_splay_is_capped():
    rng = random.Random(2)
    assert all(0 <= bo.flush_splay(600.0, rng) <= bo.FLUSH_SPLAY_CAP_S for _ in range(500))
    assert all(0 <= bo.flush_splay(2.0, rng) <= 2.0 for _ in range(500))
    assert bo.flush_splay(0.0, rng) == 0.0


def test_flush_pause_follows_the_servers_answer_time_and_the_batch_size():
    assert bo.flush_pause(0.2, 50, 50) == pytest.approx(0.2 * bo.FLUSH_PACE_FACTOR)
    assert bo.flush_pause(0.2, 25, 50) == pytest.approx(0.1 * bo.FLUSH_PACE_FACTOR)
    assert bo.flush_pause(0.002, 50, 50) == pytest.approx(max(bo.FLUSH_PAUSE_MIN_S, 0.002))
    assert bo.flush_pause(120.0, 50, 50) == bo.FLUSH_PAUSE_MAX_S  # a slow server: at most 5 s
    assert bo.flush_pause(-1.0, 50, 50) == bo.FLUSH_PAUSE_MIN_S
    slower = [bo.flush_pause(t, 50, 50) for t in (0.01, 0.1, 0.5, 1.0, 3.0)]
    assert slower == sorted(slower)


def test_next_run_is_fixed_rate_and_skips_missed_slots():
    assert bo.next_run_at(100.0, 10.0, now=101.0) == 110.0
    assert bo.next_run_at(100.0, 10.0, now=109.9) == 110.0
    assert bo.next_run_at(100.0, 10.0, now=135.0) == 140.0  # the run overran: no burst of catch-ups
    assert bo.next_run_at(100.0, 10.0, now=110.0) == 120.0
    with pytest.raises(ValueError):
        bo.next_run_at(0.0, 0.0, now=1.0)


def test_a_fleet_reconnecting_with_full_jitter_spreads_out():
    """1,000 envoys that lost the server at the same instant: after the window has grown past a
    few seconds, their retries in any one second are a small share of the fleet."""
    rng = random.Random(99)
    times = []
    for _ in range(1000):
        b = Backoff(1.0, 60.0, rng=rng, clock=FakeClock(0.0))
        t = 0.0
        for _attempt in range(8):
            t += b.delay()
            times.append(t)
    late = [t for t in times if t > 60.0]
    per_second: dict[int, int] = {}
    for t in late:
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    assert max(per_second.values()) < 80  # never a synchronised wave of 1,000
