"""`vigo-envoy run --once`: one online run over the session, then exit.

check in (first gateway with a current answer) → converge the bundle in force (fresh or
cached) → queue the report → flush (not paced: a one-shot command does not wait out a busy
server; what is left stays queued) → renew the certificate if due, on the same connection. No
gateway reachable: converge from the cache with ``offline=True``, keep the reports queued, say
so in one line. Revoked: converge nothing, exit 1. A lapsed certificate: offline, with the
re-join line. The daemon does the same over its persistent connection (``vigo.agent.link``).

This module is imported by the envoy: standard library, msgpack and cryptography only.
"""

from __future__ import annotations

import logging
from typing import Any

from vigo.agent import runner, traits
from vigo.agent.flush import flush, record_flush
from vigo.agent.join import try_renew
from vigo.agent.session import check_in_round, direct, prepare
from vigo.errors import BundleError, ServerError, TransportError

log = logging.getLogger("vigo.agent.once")


async def run_once(opts: runner.RunOptions) -> dict[str, Any]:
    """One online run (the module doc); returns ``{"report", "server", "flushed", "queued"}``.

    Raises VigoError when no run can happen: not joined, revoked, no bundle at all.
    """
    state_dir = opts.state_dir
    with runner.run_lock(state_dir), runner.open_cache(state_dir, queue_max_bytes=opts.queue_max_bytes) as cache:
        call = direct(cache)
        creds = await prepare(call, state_dir)
        host_traits = traits.collect(opts.traits_dir)
        if creds.lapsed is not None:
            log.error("%s", creds.lapsed)

        async def fresh() -> dict[str, Any]:
            return host_traits

        found = await check_in_round(call, creds, fresh, state_dir=state_dir)
        client = found.client
        if found.lapsed is not None:
            log.error("%s", found.lapsed)
        lapsed = creds.lapsed is not None or found.lapsed is not None
        try:
            current = cache.bundle_in_force(creds.trusted)
            report = None
            if current is not None:
                report = runner.converge_and_queue(cache, current, opts, offline=client is None,
                                                   host_traits=host_traits)
            if report is not None:
                runner.note_enforcement(cache, offline=client is None, at=report["started_at"])
            flushed = 0
            if client is not None:
                try:
                    flushed = (await flush(client, call, paced=False)).acked
                    record_flush(cache, client.server, flushed)
                except (ServerError, TransportError) as exc:  # the run happened; the rest stays queued
                    log.warning("flush to %s stopped (%s): %s; the rest stays queued", client.server, exc.code,
                                exc.reason)
                # Last, on the same connection: converging never waits for it.
                await try_renew(client, state_dir, cache.envoy_id)
            queued = cache.queue_stats().runs
        finally:
            if client is not None:
                await client.close()
        if client is None and not lapsed:  # a lapse was said in its own line already
            log.warning("offline: no gateway answered (%s); %s, %d report(s) queued", "; ".join(found.failures),
                        "converged from the cached bundle" if report is not None else "no cached bundle either",
                        queued)
        if report is None:
            why = ("the server has no stack pushed yet" if client is not None
                   else "this envoy's certificate lapsed" if lapsed else "no gateway reachable")
            raise BundleError(f"no bundle to enforce: {why} and the cache in {state_dir} holds none")
        return {"report": report, "server": client.server if client else None, "flushed": flushed, "queued": queued}
