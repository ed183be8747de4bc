"""When to try again: exponential backoff, with full jitter by default, and a server-given floor.

One implementation for every retrier in vigo: the envoy's reconnects and flush retries
(vigo/agent/link.py, flush.py, daemon.py; their pacing rules are vigo/agent/backoff.py's),
the archiver's uploads (vigo/snapshots/archiver.py), and the start-up retries of the member and
gateway actors. A bottom-layer module (standard library only). Everything here is arithmetic on
numbers given to it: the random source and the clock are parameters (``random.Random`` and a
``() -> float`` clock), so tests drive it with a seeded RNG and a fake clock, and nothing here
sleeps.

Attempt ``n`` (0 for the first failure) waits ``uniform(0, min(cap, base * 2**n))`` seconds.
Full jitter (rather than "exponential plus a little noise") is what spreads a fleet that lost
its server at the same instant: after a few attempts the retries are uniformly spread over the
whole window instead of arriving in synchronised waves. A lone retrier that nothing else
synchronises with may do without it (``jitter=False``: exactly ``min(cap, base * 2**n)``). A
server's ``retry_after_s`` is a floor: never retry sooner than the server asked, whatever the
dice said.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

Clock = Callable[[], float]


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """``uniform(0, min(cap_s, base_s * 2**attempt))`` seconds; attempt 0 is the first retry."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    return rng.uniform(0.0, max(0.0, bound(attempt, base_s, cap_s)))


def bound(attempt: int, base_s: float, cap_s: float) -> float:
    """``min(cap_s, base_s * 2**attempt)``: the longest wait of attempt ``attempt`` (>= 0)."""
    return min(cap_s, base_s * 2 ** min(attempt, 62))  # 2**62 * base is past any cap


class Backoff:
    """Exponential backoff (full jitter unless ``jitter=False``) with a server-given floor.

    ``delay()`` after each failure returns how long to wait and remembers when the next try is
    due (``not_before``, on ``clock``); ``reset()`` after a success. ``attempt`` counts failures
    since the last success.
    """

    def __init__(
        self,
        base_s: float,
        cap_s: float,
        *,
        jitter: bool = True,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError(f"backoff needs 0 < base_s <= cap_s, got base {base_s}, cap {cap_s}")
        self.base_s = base_s
        self.cap_s = cap_s
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.clock = clock
        self.attempt = 0
        self.not_before = clock()

    def delay(self, retry_after_s: float | None = None) -> float:
        """The wait before the next try, seconds: this attempt's (jittered) bound, never below
        ``retry_after_s`` when the server gave one. Counts the attempt."""
        if self.jitter:
            wait = full_jitter(self.attempt, self.base_s, self.cap_s, self.rng)
        else:
            wait = bound(self.attempt, self.base_s, self.cap_s)
        if retry_after_s is not None and retry_after_s > wait:
            wait = float(retry_after_s)
        self.attempt += 1
        self.not_before = self.clock() + wait
        return wait

    def log_level(self) -> int:
        """How loudly to log the failure ``delay`` just counted: WARNING at the 1st, the 10th
        and every 50th, DEBUG otherwise, so a long outage stays visible without flooding the
        log."""
        loud = self.attempt in (1, 10) or self.attempt % 50 == 0
        return logging.WARNING if loud else logging.DEBUG

    def remaining(self) -> float:
        """Seconds until the next try is due (0 when it is due now)."""
        return max(0.0, self.not_before - self.clock())

    def reset(self) -> None:
        self.attempt = 0
        self.not_before = self.clock()
