"""When the envoy tries the network again: its reconnect and flush-retry bounds, flush pacing,
per-host splay, the run schedule.

The backoff itself (exponential, full jitter, a server's ``retry_after_s`` as a floor) is
``vigo.retry.Backoff``, shared with the server side; this module holds the envoy's numbers and
rules. Everything here is arithmetic on numbers given to it: the random source is a parameter
(``random.Random``), so tests drive it with a seeded RNG, and nothing here sleeps.

Reconnect: ``Backoff(RECONNECT_BASE_S, RECONNECT_CAP_S)`` (envoy.yaml may set both). Full jitter
is what spreads a fleet that lost its server at the same instant; an envoy never retries sooner
than the server asked.

Flush pacing (the rule, also in docs/envoy.md):

1. at most one ``results`` batch in flight per envoy, batches bounded (50 reports / 1 MiB),
   oldest first;
2. after a (re)connect, the first flush starts after ``uniform(0, flush_splay)`` where
   ``flush_splay = min(splay_s, FLUSH_SPLAY_CAP_S)``: a thousand envoys that reconnect in the
   same second spread their first batches over that window;
3. between two batches the envoy pauses ``clamp(answer_s * batch_reports / FLUSH_MAX_REPORTS
   * FLUSH_PACE_FACTOR, FLUSH_PAUSE_MIN_S, FLUSH_PAUSE_MAX_S)``: the slower the server answered
   a full batch, the longer the envoy waits before the next one, so a loaded server sees its
   offered load fall as its answers slow down (self-clocking, like TCP's ack clock); a server
   that answers in milliseconds drains a queue at full speed;
4. ``overloaded`` / ``unavailable`` with ``retry_after_s``: wait at least that long (plus
   full jitter on the flush backoff), then resend the same batch; it was not stored, or it was
   stored and the resend is acknowledged again (the server stores run ids idempotently);
5. a report leaves the queue only when its run id is in an acknowledgement.
"""

from __future__ import annotations

import hashlib
import random

#: First reconnect wait bound, seconds (attempt 0 waits uniform(0, 1 s)).
RECONNECT_BASE_S = 1.0
#: Largest reconnect wait bound, seconds. It is also the longest an envoy takes to notice that a
#: server came back (10 s on average), so it bounds recovery after any outage: 20 s keeps "every
#: queued report stored within 30 s of the server's return" reachable. With full jitter a fleet's
#: retries at the cap are spread evenly over the window: 10,000 envoys try ~500 connections/s,
#: a SYN each against a dead server, a TLS handshake and one check-in each against a live one.
RECONNECT_CAP_S = 20.0
#: Flush retry backoff after an `overloaded`/`unavailable` answer (on top of retry_after_s).
FLUSH_RETRY_BASE_S = 0.5
FLUSH_RETRY_CAP_S = 30.0
#: Upper bound of the random delay before the first flush after a (re)connect, seconds. It matters
#: when reconnects are synchronised (a gateway restart drops every connection at once and they
#: come back within RECONNECT_BASE_S): 1,000 envoys then start flushing over 5 s, not 1 s.
FLUSH_SPLAY_CAP_S = 5.0
#: The same bound after a failover (a connection that stopped answering, dropped, and the next
#: gateway connected at once), seconds. Those envoys are one dead gateway's share of the fleet
#: spread over the others, already spread in time by when each noticed the dead link (TCP
#: keepalive timers run per connection); a short delay keeps their first acknowledged report
#: within the documented bound (docs/envoy.md, "A dead link").
FAILOVER_FLUSH_SPLAY_S = 1.0
#: Pause between two batches: the server's answer time for a full batch, times this.
FLUSH_PACE_FACTOR = 1.0
#: Bounds of the pause between two batches, seconds.
FLUSH_PAUSE_MIN_S = 0.0
FLUSH_PAUSE_MAX_S = 5.0


def splay(key: str, splay_s: float) -> float:
    """A deterministic per-host offset in [0, splay_s): the same host (key = its envoy id, or
    hostname before joining) always lands at the same point of the interval, and a fleet
    spreads evenly over it. Same function as the server's ``fleet.splay_for``."""
    if splay_s <= 0:
        return 0.0
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return (h / 2**64) * splay_s


def flush_splay(splay_s: float, rng: random.Random) -> float:
    """The random delay before the first flush after a (re)connect (rule 2), seconds."""
    return rng.uniform(0.0, max(0.0, min(splay_s, FLUSH_SPLAY_CAP_S)))


def flush_pause(answer_s: float, batch_reports: int, max_reports: int) -> float:
    """The pause before the next batch (rule 3), seconds: the server's answer time scaled to a
    full batch's share, clamped to [FLUSH_PAUSE_MIN_S, FLUSH_PAUSE_MAX_S]."""
    if max_reports <= 0:
        raise ValueError("max_reports must be positive")
    share = min(1.0, max(0, batch_reports) / max_reports)
    pause = max(0.0, answer_s) * share * FLUSH_PACE_FACTOR
    return min(FLUSH_PAUSE_MAX_S, max(FLUSH_PAUSE_MIN_S, pause))


def next_run_at(previous_due: float, interval_s: float, now: float) -> float:
    """The next scheduled run after one due at ``previous_due``: one interval later, skipping
    slots already missed (a run that overran its interval is not followed by a burst of
    catch-up runs). Fixed rate: the schedule does not drift by each run's duration."""
    if interval_s <= 0:
        raise ValueError(f"interval must be positive, got {interval_s}")
    due = previous_due + interval_s
    if due <= now:
        missed = int((now - due) // interval_s) + 1
        due += missed * interval_s
    return due
