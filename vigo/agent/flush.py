"""The envoy's results flush: the queue sent oldest first, one batch in flight, only
acknowledged run ids deleted. One implementation for `vigo-envoy run --once`
(``vigo.agent.once``, not paced) and the daemon's connection (``vigo.agent.link``, paced by the
rule in docs/envoy.md, whose numbers are ``vigo.agent.backoff``'s). The check-in round that opens
the connection, and ``CacheCall``, are ``vigo.agent.session``'s.

Batches hold at most FLUSH_MAX_REPORTS / FLUSH_MAX_BYTES. A batch refused for its content is sent
report by report, and a report refused alone is moved to the quarantine: it can never block the
queue. Reports queued under another envoy id (runs from before joining, or before a re-join) are
sent under the current id with ``queued_as`` naming the old one: the server knows this host by
the current id, and refuses reports that name another envoy.

This module is imported by the envoy: standard library, msgpack and cryptography only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vigo.agent.backoff import FLUSH_RETRY_BASE_S, FLUSH_RETRY_CAP_S, flush_pause
from vigo.agent.cache import Cache
from vigo.agent.session import CacheCall, nap
from vigo.agent.transport import EnvoyClient
from vigo.errors import ProtocolError, ServerError, UnavailableError
from vigo.retry import Backoff

# The session's logger: the flush's lines keep the name they have always had in the envoy's log.
log = logging.getLogger("vigo.agent.session")

#: Bounds of one ``results`` message.
FLUSH_MAX_REPORTS = 50
FLUSH_MAX_BYTES = 1024 * 1024
#: Codes that say one report (not the connection or the server) is unacceptable.
_REPORT_REFUSALS = frozenset({"bad_body", "forbidden", "frame_too_large"})


@dataclass
class FlushStats:
    """What one flush did."""

    acked: int = 0
    batches: int = 0
    retried: int = 0  # answers with retry_after_s that were honoured
    waited_s: float = 0.0  # time spent pausing and honouring retry-after
    drained: bool = False  # the queue was empty when it ended
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


async def flush(
    client: EnvoyClient,
    call: CacheCall,
    *,
    paced: bool,
    rng: random.Random | None = None,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FlushStats:
    """Send the queue oldest first, one batch in flight; delete only acknowledged run ids. A
    batch refused for its content is sent report by report, and a report refused alone is moved
    to the quarantine (it can never block the queue).

    ``paced``: the rule in docs/envoy.md (the daemon, which holds a connection while a fleet
    drains): a pause after each batch derived from the server's answer time and the batch's size,
    and ``retry_after_s`` honoured with jitter on top, then the same batch again. Not paced
    (``run --once``, a one-shot command): batches follow each other as fast as the server
    answers, and an ``overloaded``/``unavailable`` answer ends the flush like a lost connection
    (what is left stays queued for the next run).

    Returns when the queue is empty, when ``stop`` is set, or when a batch acknowledged
    nothing. Raises UnavailableError when the connection is gone (or, not paced, the server is
    busy) and ServerError for a refusal that is not about one report's content.
    """
    stats = FlushStats()
    envoy_id = await call(lambda c: c.envoy_id)
    retry = Backoff(FLUSH_RETRY_BASE_S, FLUSH_RETRY_CAP_S, rng=rng or random.Random(), clock=clock)
    while stop is None or not stop.is_set():
        batch = await call(lambda c: c.pending(limit=FLUSH_MAX_REPORTS, max_bytes=FLUSH_MAX_BYTES))
        if not batch:
            stats.drained = True
            return stats
        reports = [_as_sent(report, envoy_id) for report in batch]
        log.info("sending %d queued report(s) to %s", len(reports), client.server)
        started = clock()
        set_aside = 0
        try:
            acked = await client.send_results(envoy_id, reports)
        except UnavailableError as exc:
            stats.errors[exc.code] += 1
            if not paced or exc.retry_after_s is None:
                raise  # no answer at all: the connection is gone or useless
            wait = retry.delay(exc.retry_after_s)
            stats.retried += 1
            stats.waited_s += wait
            log.info("%s answered %s for a batch of %d report(s): retrying in %.2f s (asked %.2f s)",
                     client.server, exc.code, len(reports), wait, exc.retry_after_s)
            await nap(wait, stop)
            continue
        except (ServerError, ProtocolError) as exc:
            stats.errors[exc.code] += 1
            if exc.code not in _REPORT_REFUSALS:
                raise
            acked, set_aside = await _send_one_by_one(client, call, envoy_id, reports)
        answer_s = clock() - started
        retry.reset()
        acked_ids = list(acked)
        removed = await call(lambda c, ids=acked_ids: c.ack(ids))
        stats.acked += removed
        stats.batches += 1
        log.info("flushed %d report(s) to %s in %.3f s (%d acknowledged)", len(reports), client.server,
                 answer_s, removed)
        if removed == 0 and set_aside == 0:
            return stats
        pause = flush_pause(answer_s, len(reports), FLUSH_MAX_REPORTS) if paced else 0.0
        if pause > 0:
            stats.waited_s += pause
            await nap(pause, stop)
    return stats


async def _send_one_by_one(client: EnvoyClient, call: CacheCall, envoy_id: str,
                           reports: list[dict[str, Any]]) -> tuple[list[str], int]:
    """A batch was refused for its content: send each report alone, and move aside the ones
    refused alone (kept in the quarantine, never sent again) so they cannot block the queue.
    Returns the acknowledged ids and how many reports were set aside (both are progress)."""
    acked: list[str] = []
    set_aside = 0
    for report in reports:
        run_id = str(report["run_id"])
        try:
            acked += await client.send_results(envoy_id, [report])
        except (ServerError, ProtocolError) as exc:  # a TransportError goes up as it is
            if exc.code not in _REPORT_REFUSALS:
                raise
            reason = f"refused by {client.server}: {exc.code}: {exc.reason}"
            log.error("report %s %s; moved to the quarantine", run_id, reason)
            await call(lambda c, r=run_id, why=reason: c.quarantine_run(r, why))
            set_aside += 1
    return acked, set_aside


def record_flush(cache: Cache, server: str, acked: int) -> None:
    """Remember the last flush that ended without an error (meta ``last_flush``)."""
    cache.set_meta("last_flush", {"at": time.time(), "server": server, "acked": acked,
                                  "queued": cache.queue_stats().runs})


def _as_sent(report: dict[str, Any], envoy_id: str) -> dict[str, Any]:
    queued_as = report.get("envoy_id")
    if queued_as in (None, "", envoy_id):
        return report
    return {**report, "envoy_id": envoy_id, "queued_as": queued_as}
