"""The daemon's connection to its fleet (`vigo-envoy run`; the schedule is ``vigo.agent.daemon``).

    Link        tries the gateways in this envoy's order (``vigo.agent.gateways``: the list
                learned from the server, then the joined addresses; the ones that failed lately
                last), with exponential backoff and full jitter (vigo.agent.backoff) between
                rounds that found none; keeps one persistent mutual-TLS connection, checks in on
                connect (``session.check_in_round``: a bundle pushed while the envoy was away
                arrives here; an older serial or term is refused by the cache), receives
                ``notify``, pings every ``keepalive_s``. A dead link is noticed in seconds
                (TCP keepalive and TCP_USER_TIMEOUT on the socket, ``vigo.agent.transport``; a
                missed answer to a ping, a flush or a run's check-in) and dropped, and the next
                round starts at once with the next gateway (see ``abandon``). After the
                check-in on connect and after every run's check-in it renews the certificate
                when due (``join.try_renew``, in the background: neither the run nor the flush
                waits for it); the live connection carries on with the old certificate (valid
                until it expires), the next one presents the new. A lapsed certificate is not
                tried on the network: one line says to re-join, runs go on from the cache.
    flusher     part of the Link: after every run and after every (re)connect, sends the
                queue with ``flush.flush(paced=True)`` (one batch in flight, paced by the
                server's answer time, a random delay within the flush splay after a reconnect,
                retry-after honoured); only acknowledged run ids leave the queue.

The cache is reached only through a ``session.CacheCall`` (the daemon's ``CacheThread``), so
it is never used from two threads at once. Many Links can run in one process (the tests' and
benchmarks' in-process envoys) with ``persist=False``.

This module is imported by the envoy: standard library, msgpack and cryptography only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigo.agent import backoff as bo
from vigo.agent import flush, runner, session, traits
from vigo.agent.config import DEFAULT_SPLAY_S, EnvoyConfig
from vigo.agent.join import try_renew
from vigo.agent.session import CacheCall
from vigo.agent.transport import EnvoyClient
from vigo.errors import (
    AdmissionError,
    ConfigError,
    ProtocolError,
    RevokedError,
    ServerError,
    UnavailableError,
)
from vigo.retry import Backoff

# The daemon's lines, under the name operators know from its journal, whichever module writes them.
log = logging.getLogger("vigo.agent.daemon")

#: Flush retry after a server error that is not about the connection, seconds (bounds).
FLUSH_ERROR_BASE_S = 2.0
FLUSH_ERROR_CAP_S = 120.0
#: A keepalive ping not answered within this is a dead link, seconds. A live gateway answers a
#: ping without asking the primary (milliseconds).
PING_TIMEOUT_S = 5.0
#: A connection that served at least this long, then broke, is followed at once by a round with
#: the next gateway (and resets the backoff); one that broke sooner waits the backoff, so a
#: gateway that accepts and drops at once cannot make a hot loop. Seconds.
STABLE_S = 2.0


@dataclass
class LinkState:
    connected: bool = False
    server: str | None = None
    since: float | None = None  # connected since, or disconnected since
    error: str | None = None  # why the last attempt or connection failed

    def as_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LinkCounters:
    connects: int = 0
    attempts: int = 0
    acked: int = 0
    flushes: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


class Link:
    """One envoy's connection to its fleet: reconnect with backoff, check in, notify, flush."""

    def __init__(
        self,
        state_dir: Path,
        cache: CacheCall,
        config: EnvoyConfig,
        *,
        rng: random.Random | None = None,
        on_wake: Callable[[str], None] | None = None,
        persist: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.cache = cache
        self.config = config
        self.rng = rng or random.Random()
        self.on_wake = on_wake
        self.persist = persist
        self.backoff = Backoff(config.reconnect_base_s, config.reconnect_cap_s, rng=self.rng)
        self.client: EnvoyClient | None = None
        self.state = LinkState(since=time.time())
        self.counters = LinkCounters()
        self.answer_splay_s: float | None = None
        self.stop_event = asyncio.Event()
        self._kick = asyncio.Event()  # ends a reconnect wait early (new config)
        self._flush_wanted = asyncio.Event()
        self._flush_idle = asyncio.Event()
        self._flush_idle.set()
        self._splay_next_flush = False
        self._flush_splay_cap: float | None = None  # after a failover: a shorter first-flush delay
        #: Gateways that failed lately: address -> monotonic time (gateways.dial_order tries them last).
        self.failed: dict[str, float] = {}
        self._at_once = False  # the last connection broke after serving: the next round starts now
        self._failover_pending = False  # the next connection replaces one that broke (shorter flush delay)
        self._connected_at = 0.0  # monotonic time the live connection was made
        self._last_problem: str | None = None
        self._flush_retry = Backoff(FLUSH_ERROR_BASE_S, FLUSH_ERROR_CAP_S, rng=self.rng)
        self._retry_handle: asyncio.TimerHandle | None = None
        self._renewal: asyncio.Task[float | None] | None = None
        #: Certificate renewals that installed a new pair (tests, benchmarks).
        self.renewals = 0

    # -- public

    @property
    def connected(self) -> bool:
        return self.client is not None

    def request_flush(self) -> None:
        self._flush_wanted.set()

    async def run(self) -> None:
        """Connect, serve, reconnect, until ``stop()``. Never raises."""
        flusher = asyncio.create_task(self._flusher(), name="vigo-flush")
        try:
            while not self.stop_event.is_set():
                retry_after: float | None = None
                try:
                    retry_after = await self._round()
                except Exception as exc:
                    log.exception("connecting to the fleet failed unexpectedly (%s); trying again after a backoff", exc)
                if self.stop_event.is_set():
                    break
                if self._at_once:  # a working connection broke: the next gateway now, no backoff
                    self._at_once = False
                    self._failover_pending = True  # for the next round only
                    continue
                self._failover_pending = False
                wait = self.backoff.delay(retry_after)
                log.info("next connection attempt in %.2f s (attempt %d)", wait, self.backoff.attempt)
                await self._wait(wait)
        finally:
            for task in (flusher, self._renewal):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await self._drop("stopping")

    async def stop(self) -> None:
        self.stop_event.set()
        self._kick.set()
        await self._drop("stopping")

    def reconfigure(self, config: EnvoyConfig) -> None:
        """Take a new local config: new backoff bounds; a changed server list reconnects."""
        old, self.config = self.config, config
        self.backoff = Backoff(config.reconnect_base_s, config.reconnect_cap_s, rng=self.rng)
        if old.servers != config.servers and self.client is not None:
            log.info("server list changed: reconnecting")
            asyncio.get_running_loop().create_task(self._drop("server list changed"))
        self._kick.set()

    async def checkin(self, host_traits: dict[str, Any], trusted: Any) -> bool:
        """A check-in on the live connection (for a run); True when the answer is current.
        Raises ServerError/UnavailableError/ProtocolError when it fails."""
        client = self.client
        if client is None:
            return False
        try:
            stale, _accepted, answer = await session.check_in(client, self.cache, host_traits, trusted)
        except UnavailableError as exc:
            await self.abandon(f"checkin failed: {exc.reason}", client)
            raise
        except ServerError as exc:
            if exc.code == "revoked":
                await self._revoked(client.server, exc.reason)
                await self._drop("revoked", client)
            raise
        if stale is not None:
            await self._drop(stale, client)
            return False
        self.answer_splay_s = float(answer.get("splay_s") or 0.0)
        self.renew_soon(client)
        return True

    async def abandon(self, why: str, client: EnvoyClient | None = None) -> None:
        """A missed answer on the live connection (``client``, default whichever is live): a
        dead link. The gateway goes last in the dial order for a while, the connection is
        dropped, and the next round starts at once with the next gateway, without a backoff
        wait (the daemon calls this when a run's check-in misses its budget)."""
        current = self.client
        if current is None or (client is not None and client is not current):
            return
        now = time.monotonic()
        self.failed[current.server] = now
        if now - self._connected_at >= STABLE_S:
            self.backoff.reset()
            self._at_once = True
        log.warning("dropping the connection to %s: %s; %s", current.server, why,
                    "trying the next gateway now" if self._at_once else "reconnecting with backoff")
        await self._drop(why, current)

    def renew_soon(self, client: EnvoyClient) -> None:
        """Renew the certificate over ``client`` if due, in the background (one at a time)."""
        if self._renewal is not None and not self._renewal.done():
            return
        self._renewal = asyncio.get_running_loop().create_task(self._renew(client), name="vigo-renew")

    async def _renew(self, client: EnvoyClient) -> float | None:
        envoy_id = await self.cache(lambda c: c.envoy_id)
        renewed = await try_renew(client, self.state_dir, envoy_id)
        if renewed is not None:
            self.renewals += 1
        return renewed

    async def drain(self, budget_s: float) -> None:
        """Flush what is queued now, waiting at most ``budget_s`` (shutdown)."""
        if self.client is None:
            return
        self._splay_next_flush = False
        self._flush_idle.clear()
        self.request_flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget_s):
                await self._flush_idle.wait()

    # -- connecting

    async def _round(self) -> float | None:
        """One check-in round (``session.check_in_round``) over the gateways in this envoy's
        order; serve the first that answers with a current term until its connection ends.
        Returns the longest retry-after any gateway asked for (None: none asked)."""
        creds = await self._setup()
        if creds is None:
            return self.config.reconnect_cap_s

        async def host_traits() -> dict[str, Any]:
            # The last run's traits: a connect does not wait on trait scripts unless none ran yet.
            known = await self.cache(lambda c: c.last_traits())
            return known or await asyncio.to_thread(traits.collect, self.config.resolved_traits_dir())

        try:
            found = await session.check_in_round(self.cache, creds, host_traits, state_dir=self.state_dir,
                                                 stop=self.stop_event, keep_going=True)
        except RevokedError as exc:
            self.counters.errors["revoked"] += 1
            log.error("%s", exc)
            return self.config.reconnect_cap_s
        self.counters.attempts += found.attempts
        self.counters.errors.update(found.errors)
        now = time.monotonic()
        self.failed.update(dict.fromkeys(found.failed, now))
        if found.failures:
            self.state.error = found.failures[-1]
        if found.client is not None:
            assert found.answer is not None
            self.failed.pop(found.client.server, None)
            self.answer_splay_s = float(found.answer.get("splay_s") or 0.0)
            self.renew_soon(found.client)
            await self._serve(found.client, found.accepted)
            return None
        if found.lapsed is not None:  # the gateway's reason names its clock: one line per certificate
            self._problem(found.lapsed, key=f"certificate {creds.ident.serial:x} refused as expired")
            return self.config.reconnect_cap_s
        return found.retry_after_s

    async def _setup(self) -> session.Credentials | None:
        """What a round needs, or None (logged) when this envoy cannot connect now: not joined,
        revoked, certificate expired."""
        try:
            creds = await session.prepare(self.cache, self.state_dir, self.config.servers, self.failed)
        except (AdmissionError, ConfigError, ValueError, ssl.SSLError, OSError) as exc:
            self._problem(str(exc))
            return None
        if creds.lapsed is not None:
            self._problem(creds.lapsed)
            return None
        return creds

    async def _serve(self, client: EnvoyClient, accepted: bool) -> None:
        """Hold a live connection: notify → wake a run, keepalive pings, until it ends. A
        connection that served ``STABLE_S`` and then broke (not by ``stop``, not by a new
        server list) makes the next round start at once; the gateway goes last meanwhile."""
        failover = self._failover_pending
        self._failover_pending = False
        self.client = client
        self._last_problem = None
        self.counters.connects += 1
        started = self._connected_at = time.monotonic()
        await self._set_state(LinkState(True, client.server, time.time()))
        if self.persist:  # a current answer: the bundle in force is the fleet's again
            await self.cache(lambda c: runner.note_enforcement(c, offline=False, at=time.time()))
        log.info("connected to %s%s", client.server, " (failover: the previous connection broke)" if failover else "")
        self._splay_next_flush = True
        self._flush_splay_cap = bo.FAILOVER_FLUSH_SPLAY_S if failover else None
        self.request_flush()
        if accepted:
            self._wake("bundle")
        why = "closed by the gateway"
        lost = True  # False when this side ended it (stop, a new server list, abandon)
        try:
            while not self.stop_event.is_set() and self.client is client:
                try:
                    async with asyncio.timeout(self.config.keepalive_s):
                        frame = await client.conn.receive()
                except TimeoutError:
                    try:
                        async with asyncio.timeout(PING_TIMEOUT_S):
                            await client.request("ping", {})
                    except TimeoutError:
                        why = f"no answer to a keepalive ping within {PING_TIMEOUT_S:g} s"
                        break
                    continue
                if frame is None:
                    break
                if frame.type == "notify":
                    log.info("notify from %s (%s): converging now", client.server, frame.body.get("reason"))
                    self._wake("notify")
                elif frame.type == "error":
                    code = str(frame.body.get("code"))
                    self.counters.errors[code] += 1
                    why = f"gateway error {code}: {frame.body.get('reason')}"
                    if code == "revoked":
                        await self._revoked(client.server, str(frame.body.get("reason")))
                    break
                else:
                    log.debug("ignoring a %s frame from %s (a reply that came too late)", frame.type, client.server)
        except (ServerError, ProtocolError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            log.exception("connection to %s failed unexpectedly", client.server)
            why = f"{type(exc).__name__}: {exc}"
        finally:
            if self.client is not client or self.stop_event.is_set():
                lost = False  # dropped on purpose (abandon already marked the gateway)
            if lost:
                self.failed[client.server] = time.monotonic()
                stable = time.monotonic() - started >= STABLE_S
                if stable:
                    self.backoff.reset()
                    self._at_once = True
                log.warning("connection to %s lost (%s); %s", client.server, why,
                            "trying the next gateway now" if stable else "reconnecting with backoff")
            await self._drop(why, client)

    async def _drop(self, why: str, client: EnvoyClient | None = None) -> None:
        """Close the connection (``client``, if it is still the live one)."""
        current = self.client
        if current is None or (client is not None and client is not current):
            if client is not None:
                await client.close()
            return
        self.client = None
        await current.close()
        await self._set_state(LinkState(False, None, time.time(), why))

    async def _revoked(self, server: str, reason: str) -> None:
        log.error("%s", await session.note_revoked(self.cache, server, reason))

    async def _wait(self, seconds: float) -> None:
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._kick.wait()

    def _problem(self, text: str, key: str | None = None) -> None:
        """A reason this envoy cannot connect at all: logged once while it lasts (``key`` says
        what "the same reason" is when the text carries changing details)."""
        if (key or text) != self._last_problem:
            log.warning("not connecting: %s", text)
            self._last_problem = key or text
        self.state.error = text

    def _wake(self, reason: str) -> None:
        if self.on_wake is not None:
            self.on_wake(reason)

    async def _set_state(self, state: LinkState) -> None:
        self.state = state
        if self.persist:
            try:
                await self.cache(lambda c: c.set_meta("link", state.as_meta()))
            except Exception as exc:
                log.warning("cannot record the connection state in the cache: %s", exc)

    # -- flushing

    def flush_splay_bound(self) -> float:
        if self.config.splay_s is not None:
            return self.config.splay_s
        if self.answer_splay_s is not None:
            return self.answer_splay_s
        return DEFAULT_SPLAY_S

    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            client = self.client
            if client is None:
                self._flush_idle.set()
                continue
            self._flush_idle.clear()
            try:
                if self._splay_next_flush:
                    self._splay_next_flush = False
                    bound = self.flush_splay_bound()
                    if self._flush_splay_cap is not None:
                        bound = min(bound, self._flush_splay_cap)
                    delay = bo.flush_splay(bound, self.rng)
                    log.debug("first flush after connecting in %.2f s", delay)
                    await session.nap(delay, self.stop_event)
                    if self.client is not client:
                        continue
                stats = await flush.flush(client, self.cache, paced=True, rng=self.rng, stop=self.stop_event)
                self.counters.acked += stats.acked
                self.counters.flushes += 1
                self.counters.errors.update(stats.errors)
                self._flush_retry.reset()
                if self.persist and stats.batches:
                    await self.cache(lambda c, s=client.server, n=stats.acked: flush.record_flush(c, s, n))
            except UnavailableError as exc:
                self.counters.errors[exc.code] += 1
                log.warning("flush to %s stopped (%s); the rest stays queued and is sent after reconnecting",
                            client.server, exc.reason)
                await self.abandon(f"flush failed: {exc.reason}", client)
            except ServerError as exc:
                self.counters.errors[exc.code] += 1
                self._retry_flush_later(f"{client.server} refused the flush ({exc.code}): {exc.reason}")
            except Exception as exc:
                log.exception("flush to %s failed", client.server)
                self._retry_flush_later(f"{type(exc).__name__}: {exc}")
            finally:
                if not self._flush_wanted.is_set():
                    self._flush_idle.set()

    def _retry_flush_later(self, why: str) -> None:
        wait = self._flush_retry.delay()
        log.warning("flush stopped: %s; the rest stays queued, next try in %.1f s", why, wait)
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        self._retry_handle = asyncio.get_running_loop().call_later(wait, self.request_flush)

