"""The envoy's session with its fleet: what it needs to dial, and the check-in round. The
results flush that follows on the same connection is ``vigo.agent.flush``.

One implementation for both callers: `vigo-envoy run --once` (``vigo.agent.once``) and the
daemon's connection (``vigo.agent.link``). Each reaches the LMDB cache through a ``CacheCall``
(``run --once`` directly, the daemon on the one thread that owns its cache). The connection is
``vigo.agent.transport``; certificate renewal on it is ``vigo.agent.join.try_renew``.

    prepare         what a session needs before it dials: identity, gateways (in this envoy's
                    order, ``vigo.agent.gateways``), trusted key, TLS context. Not joined and
                    revoked are errors; a certificate expired by this host's clock is a lapse
                    (``Credentials.lapsed``): nothing is tried with it.
    check_in_round  tries the gateways in that order and keeps the first that answers a check-in
                    with a current term; its newer bundle is accepted, its gateway list learned.
    nap             a sleep that ``stop`` ends early (the flush's pauses, the daemon's waits).

Decisions:

* A gateway whose checkin answer carries a term lower than one this envoy has already seen is
  stale (a deposed primary behind it): its answer and bundle are ignored, the next gateway in
  the list is tried, and with none left the run is offline. Reports are not sent to it.
* ``revoked`` is not "unreachable": the fleet said this envoy must stop. It is remembered (meta
  ``revoked``) so later runs refuse at once, also while no server is reachable, until
  ``vigo-envoy join`` with a new token. The cached bundle is *not* enforced any more: an
  operator revokes a host to stop managing it, and a host that keeps converging would fight
  whoever took it over. Queued reports stay queued.
* A certificate that expired (by this host's clock, or answered ``expired`` by a gateway) is a
  lapse, not an outage: runs converge from the cache as offline runs do, reports stay queued,
  and one line says to re-join with a new token.

This module is imported by the envoy: standard library, msgpack and cryptography only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigo.agent import gateways, identity, runner
from vigo.agent.cache import Cache
from vigo.agent.enrolment import tls_client_context
from vigo.agent.transport import EnvoyClient
from vigo.errors import (
    AdmissionError,
    BundleError,
    BundleRefusedError,
    ProtocolError,
    RevokedError,
    ServerError,
    TransportError,
    UnavailableError,
)
from vigo.policy import bundle as bundle_mod
from vigo.timefmt import iso

log = logging.getLogger("vigo.agent.session")

#: ``await call(fn)`` runs ``fn(cache)`` wherever the caller keeps its cache and returns the result.
CacheCall = Callable[[Callable[[Cache], Any]], Awaitable[Any]]


def direct(cache: Cache) -> CacheCall:
    """A CacheCall for a cache this event loop's thread owns (``run --once``)."""
    async def call(fn: Callable[[Cache], Any]) -> Any:
        return fn(cache)
    return call


# --- before dialling ------------------------------------------------------------------------------


@dataclass
class Credentials:
    """What ``prepare`` found: enough to dial, or the reason not to (``lapsed``)."""

    ident: identity.Identity
    servers: list[str]  # every gateway to try, best first (gateways.dial_order)
    trusted: Any  # the bundle signing key
    context: ssl.SSLContext | None  # mutual TLS pinned to the fleet CA; None when lapsed
    lapsed: str | None  # the re-join line, when the certificate expired by this host's clock


async def prepare(call: CacheCall, state_dir: Path, servers: list[str] | None = None,
                  failed: dict[str, float] | None = None) -> Credentials:
    """Identity, gateways, trusted key and TLS context. The gateways: ``servers`` (envoy.yaml
    or ``run --server``) pin the list, in its order; else the learned list and the addresses
    `join` stored, in this envoy's rendezvous order (``vigo.agent.gateways``). Either way those
    in ``failed`` (address -> monotonic time it failed) go last while suspect.
    AdmissionError when not joined, RevokedError when the fleet revoked this envoy."""
    ident = await asyncio.to_thread(identity.load, state_dir)
    joined = list(servers or await call(lambda c: list(c.meta("servers", []) or [])))
    if not joined:
        raise AdmissionError(f"not joined: the cache in {state_dir} names no server; run `vigo-envoy join --server "
                             f"HOST:PORT --token TOKEN --state-dir {state_dir}` first")
    if servers:
        order = gateways.pinned_order(servers, failed)
    else:
        envoy_id, known = await call(lambda c: (c.envoy_id, gateways.learned(c.meta("gateways"))))
        order = gateways.dial_order(envoy_id or ident.subject, joined, known, failed)
    servers = order
    revoked = await call(lambda c: c.meta("revoked"))
    if revoked:
        raise RevokedError(revoked_text(await call(lambda c: c.envoy_id), revoked))
    trusted = await call(lambda c: runner._trusted_key(c, None))
    if ident.expired():
        return Credentials(ident, servers, trusted, None, lapsed_text(state_dir, joined, ident.not_after))
    context = tls_client_context(ident.ca_pem, ident.cert_pem, ident.key_pem)
    return Credentials(ident, servers, trusted, context, None)


def lapsed_text(state_dir: Path, servers: list[str], not_after: float, refused: str | None = None) -> str:
    """The one line an envoy whose certificate lapsed prints (and logs) on every run."""
    how = refused or f"certificate expired at {iso(not_after)} while this envoy was offline"
    server_flags = " ".join(f"--server {s}" for s in servers) or "--server HOST:PORT"
    return (f"{how}; re-join with `vigo-envoy join {server_flags} --token TOKEN --state-dir {state_dir}` "
            "(a new token); enforcing the cached bundle meanwhile, reports stay queued")


def revoked_text(envoy_id: str, record: dict[str, Any]) -> str:
    return (
        f"this envoy ({envoy_id}) was revoked by the fleet (server {record.get('server')} at "
        f"{iso(record.get('at') or None)}: {record.get('reason')}); nothing was converged and the cached bundle "
        "is no longer enforced. Run `vigo-envoy join` with a new token to be managed again"
    )


def note_refused_cert(cache: Cache, server: str, reason: str, ident: identity.Identity) -> str:
    """Remember that a gateway refused this certificate as expired (meta ``cert_refused``, for
    `vigo-envoy status`); returns the line that says so."""
    cache.set_meta("cert_refused", {"at": time.time(), "server": server, "reason": reason,
                                    "serial": format(ident.serial, "x")})
    return (f"certificate refused as expired by {server} ({reason}), though by this host's clock it is valid "
            f"until {iso(ident.not_after)}: check both clocks")


async def note_revoked(call: CacheCall, server: str, reason: str) -> RevokedError:
    """Remember that the fleet revoked this envoy (meta ``revoked``); the error that says so."""
    record = {"at": time.time(), "server": server, "reason": reason}
    await call(lambda c: c.set_meta("revoked", record))
    return RevokedError(revoked_text(await call(lambda c: c.envoy_id), record))


# --- check-in -------------------------------------------------------------------------------------


def checkin_body(cache: Cache, host_traits: dict[str, Any]) -> dict[str, Any]:
    """What a check-in tells the server: traits, the bundle in force, the queue."""
    stats = cache.queue_stats()
    info = cache.bundle_info("current")
    return {
        "envoy_id": cache.envoy_id,
        "traits": host_traits,
        "bundle_version": info["version"] if info else None,
        "serial": int(cache.meta("highest_serial", 0) or 0),
        "term": int(cache.meta("highest_term", 0) or 0),
        "queue_depth": stats.runs,
        "oldest_queued_at": stats.oldest_started_at,
        "last_run": cache.meta("last_run"),
        "offline_runs": stats.offline_runs,
    }


def take_checkin_answer(cache: Cache, server: str, answer: dict[str, Any],
                        trusted: Any) -> tuple[str | None, bool]:
    """Believe a checkin answer, or not: ``(why it is stale, None if current; whether a newer
    bundle was accepted)``. A current answer updates the schedule and term in the cache and its
    bundle (if any) is verified and accepted unless it would roll policy back; its gateway list
    (if any) is kept (``gateways.learn``)."""
    high_term = int(cache.meta("highest_term", 0) or 0)
    if answer["term"] < high_term:
        log.warning("gateway %s answered with term %d but this envoy has seen term %d: a stale "
                    "server; its answer is ignored", server, answer["term"], high_term)
        return f"{server} is stale (term {answer['term']} < {high_term})", False
    values = {
        "highest_term": max(high_term, answer["term"]),
        "interval_s": answer["interval_s"],
        "splay_s": answer["splay_s"],
        "last_checkin_at": time.time(),
        "last_server": server,
    }
    known = gateways.learn(cache.meta("gateways"), answer.get("gateways"), server)
    if known is not None:
        values["gateways"] = known
    cache.update_meta(values)
    accepted = False
    if answer.get("bundle") is not None:
        try:
            incoming = bundle_mod.decode(answer["bundle"], trusted, origin=f"bundle from {server}")
            accepted = cache.accept_bundle(incoming)
        except BundleRefusedError as exc:  # the last good bundle stays in force
            log.error("%s; keeping the bundle in force", exc)
        except BundleError as exc:
            log.error("refusing the bundle from %s: %s; keeping the bundle in force", server, exc)
    return None, accepted


async def check_in(client: EnvoyClient, call: CacheCall, host_traits: dict[str, Any],
                   trusted: Any) -> tuple[str | None, bool, dict[str, Any]]:
    """One check-in on an open connection: ``(why the answer is stale or None, whether a newer
    bundle was accepted, the answer)``. The gateway's errors are raised."""
    body = await call(lambda c: checkin_body(c, host_traits))
    answer = await client.checkin(body)
    stale, accepted = await call(lambda c: take_checkin_answer(c, client.server, answer, trusted))
    return stale, accepted, answer


@dataclass
class Round:
    """What one check-in round found."""

    client: EnvoyClient | None = None  # open, with a current answer; None: offline
    accepted: bool = False  # its answer carried a newer bundle, now in force
    answer: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)  # why each gateway failed, in order
    failed: list[str] = field(default_factory=list)  # the addresses that failed (unreachable, refused, stale)
    lapsed: str | None = None  # the re-join line, when gateways refused the certificate as expired
    retry_after_s: float | None = None  # the longest retry-after a gateway asked for
    attempts: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # codes answered


async def check_in_round(
    call: CacheCall,
    creds: Credentials,
    host_traits: Callable[[], Awaitable[dict[str, Any]]],
    *,
    state_dir: Path,
    stop: asyncio.Event | None = None,
    keep_going: bool = False,
) -> Round:
    """Try each gateway once, in ``creds.servers``'s order; keep the first whose check-in
    answer is current. ``host_traits()`` is asked once, when a first connection opens.

    RevokedError (remembered first) when a gateway says so. An error that is not a gateway's
    answer ends the round with ``keep_going=False`` (``run --once``: a body this envoy cannot
    encode makes the run offline, anything else is the command's error), and with
    ``keep_going=True`` is logged as that gateway's failure (the daemon: nothing ends it).
    """
    found = Round()
    if creds.context is None:
        found.failures.append(f"certificate expired at {iso(creds.ident.not_after)}")
        return found
    servers = creds.servers
    collected: dict[str, Any] | None = None
    refused: str | None = None
    for server in servers:
        if stop is not None and stop.is_set():
            return found
        found.attempts += 1
        try:
            client = await EnvoyClient.open(server, creds.context)
        except UnavailableError as exc:
            log.info("gateway %s unreachable: %s", server, exc.reason)
            found.failures.append(exc.reason)
            found.failed.append(server)
            continue
        except ServerError as exc:  # a TLS "certificate expired" alert
            refused = await call(lambda c, s=server, r=exc.reason: note_refused_cert(c, s, r, creds.ident))
            found.failures.append(f"{server}: {exc.reason}")
            continue
        try:
            if collected is None:
                collected = await host_traits()
            stale, accepted, answer = await check_in(client, call, collected, creds.trusted)
        except (ServerError, TransportError) as exc:  # refused, or no answer (overloaded, lost)
            await client.close()
            found.errors[exc.code] += 1
            if exc.code == "revoked":
                raise await note_revoked(call, server, exc.reason) from exc
            if exc.code == "expired":  # by that gateway's clock: another one may differ
                refused = await call(lambda c, s=server, r=exc.reason: note_refused_cert(c, s, r, creds.ident))
                found.failures.append(f"{server}: {exc.reason}")
                continue
            if exc.retry_after_s is not None:
                found.retry_after_s = max(found.retry_after_s or 0.0, exc.retry_after_s)
            level = logging.INFO if isinstance(exc, TransportError) else logging.WARNING
            log.log(level, "gateway %s refused the checkin (%s): %s", server, exc.code, exc.reason)
            found.failures.append(f"{server} refused the checkin ({exc.code}): {exc.reason}")
            found.failed.append(server)
            continue
        except Exception as exc:
            await client.close()
            if keep_going:
                log.warning("gateway %s: checkin failed: %s: %s", server, type(exc).__name__, exc)
                found.failures.append(f"{server}: checkin failed: {type(exc).__name__}: {exc}")
                found.failed.append(server)
                continue
            if isinstance(exc, ProtocolError):  # our own body: no gateway will take it
                log.error("cannot send the checkin: %s", exc)
                found.failures.append(f"checkin not sendable: {exc}")
                return found
            raise
        if stale is not None:
            await client.close()
            found.failures.append(stale)
            found.failed.append(server)
            continue
        found.client, found.accepted, found.answer = client, accepted, answer
        return found
    if refused is not None:
        found.lapsed = lapsed_text(state_dir, servers, creds.ident.not_after, refused)
    return found


async def nap(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep, waking early when ``stop`` is set."""
    if seconds <= 0:
        return
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
