"""`vigo-envoy run`: the envoy daemon. One asyncio process, three duties that never wait on each other.

    scheduler   runs on time (interval, per-host splay) whatever the network does: collect
                traits, check in if a live connection answers within ``run_checkin_budget_s``,
                else converge from the cached bundle (the report is marked offline), queue
                the report, ask for a flush. A ``notify`` from the server, or a newer bundle
                arriving on reconnect, runs it at once. Converging is blocking work (resources
                run subprocesses): it runs in a worker thread under the run lock.
    connection  ``vigo.agent.link.Link``: reconnect with backoff, check in, notify, keepalive,
                renewal, and the paced flush after every run and every (re)connect.
    config      ``vigo.agent.config``: envoy.yaml, re-read on SIGHUP.

The LMDB cache is owned by one thread (``CacheThread``); the event loop and the converging
worker both hand it functions to run, so the cache is never used from two threads at once.

No exception ends the daemon: every step is wrapped, logged with what was attempted, and the
daemon goes on. SIGTERM/SIGINT: the current run finishes, the queue gets one last flush
(at most SHUTDOWN_FLUSH_BUDGET_S), exit 0. SIGHUP: the local config file is read again (flags
given on the command line still win); a bad file is logged and the running config kept.

What the daemon is doing is written to the cache's meta for `vigo-envoy status`:
``daemon`` {pid, started_at}, ``link`` {connected, server, since, error},
``offline_since`` (enforcing from cache since), ``last_flush`` {at, server, acked, queued}.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vigo.agent import backoff as bo
from vigo.agent import runner, traits
from vigo.agent.cache import Cache
from vigo.agent.config import (
    DEFAULT_INTERVAL_S,
    DEFAULT_SPLAY_S,
    config_path,
    load_config,
    with_overrides,
)
from vigo.agent.link import Link
from vigo.agent.session import nap, revoked_text
from vigo.errors import (
    CacheError,
    CacheLockedError,
    ConfigError,
    ProtocolError,
    ServerError,
)
from vigo.retry import Backoff

log = logging.getLogger("vigo.agent.daemon")

#: At SIGTERM, how long the last flush may take before the daemon exits anyway, seconds.
SHUTDOWN_FLUSH_BUDGET_S = 5.0
#: After an unexpected error in a loop, pause this long before going on (no hot loop), seconds.
STEP_ERROR_PAUSE_S = 1.0


# --- the cache, owned by one thread -------------------------------------------------------------


class CacheThread:
    """One ``Cache`` used only from one thread. ``await ct(fn)`` runs ``fn(cache)`` there (from
    the event loop); ``ct.sync(fn)`` does the same from another thread (the converging worker).

    Several CacheThreads may share one executor (the benchmarks' in-process envoys): each Cache
    is still only ever touched from that executor's single thread.
    """

    def __init__(self, opener: Callable[[], Cache], executor: ThreadPoolExecutor | None = None) -> None:
        self._opener = opener
        self._own = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="vigo-cache")
        self.cache: Cache | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.cache = await loop.run_in_executor(self._executor, self._opener)

    async def __call__(self, fn: Callable[[Cache], Any]) -> Any:
        if self.cache is None:
            raise CacheError("the envoy cache is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self.cache)

    def sync(self, fn: Callable[[Cache], Any]) -> Any:
        if self.cache is None:
            raise CacheError("the envoy cache is not open")
        return self._executor.submit(fn, self.cache).result()

    async def close(self) -> None:
        if self.cache is not None:
            cache, self.cache = self.cache, None
            await asyncio.get_running_loop().run_in_executor(self._executor, cache.close)
        if self._own:
            self._executor.shutdown(wait=False)


# --- the daemon ---------------------------------------------------------------------------------


class Daemon:
    def __init__(self, state_dir: Path, *, config_file: Path | None = None,
                 overrides: dict[str, Any] | None = None, rng: random.Random | None = None) -> None:
        self.state_dir = state_dir
        self.config_file, self.config_required = config_path(config_file)
        self.overrides = dict(overrides or {})
        self.config = with_overrides(load_config(self.config_file, required=self.config_required), self.overrides)
        self.rng = rng or random.Random()
        self.cache = CacheThread(lambda: runner.open_cache(self.state_dir))
        self.link: Link | None = None
        self.stopping = asyncio.Event()
        self._wake_event = asyncio.Event()
        self._wake_reasons: list[str] = []
        self._lock_fd: int | None = None
        self.runs = 0

    # -- lifecycle

    def _lock(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.state_dir / runner.DAEMON_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheLockedError(
                f"a vigo-envoy daemon (pid {holder}) already runs for {self.state_dir}; one daemon per state dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    async def main(self) -> int:
        self._lock()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self._open_cache()
            if self.stopping.is_set():
                return 0
            await self.cache(lambda c: c.set_meta("daemon", {"pid": os.getpid(), "started_at": time.time(),
                                                            "config": self.config.as_dict()}))
            self.link = Link(self.state_dir, self.cache, self.config, rng=self.rng, on_wake=self.wake)
            link_task = asyncio.create_task(self._supervise("connection", self.link.run), name="vigo-link")
            log.info("daemon started for %s (pid %d, config %s%s)", self.state_dir, os.getpid(), self.config_file,
                     "" if self.config_file.exists() else ", not present: defaults")
            try:
                await self._scheduler()
            finally:
                with contextlib.suppress(Exception):
                    await self.link.drain(SHUTDOWN_FLUSH_BUDGET_S)
                await self.link.stop()
                link_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await link_task
            log.info("daemon stopped after %d run(s)", self.runs)
            return 0
        finally:
            await self.cache.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self._lock_fd is not None:
                os.close(self._lock_fd)

    async def _open_cache(self) -> None:
        pause = Backoff(1.0, 60.0, rng=self.rng)
        while not self.stopping.is_set():
            try:
                await self.cache.open()
                return
            except CacheError as exc:
                wait = pause.delay()
                log.error("cannot open the envoy cache (%s); trying again in %.0f s", exc, wait)
                await self._sleep(wait)

    def request_stop(self, why: str = "stop") -> None:
        if not self.stopping.is_set():
            log.info("%s: finishing the current run, then exiting", why)
        self.stopping.set()
        self.wake("stop")

    def reload(self) -> None:
        try:
            cfg = with_overrides(load_config(self.config_file, required=self.config_required), self.overrides)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running configuration: %s", exc)
            return
        self.config = cfg
        if self.link is not None:
            self.link.reconfigure(cfg)
        log.info("SIGHUP: configuration reloaded from %s: %s", self.config_file, cfg.as_dict())
        self.wake("reload")

    def wake(self, reason: str) -> None:
        self._wake_reasons.append(reason)
        self._wake_event.set()

    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        while not self.stopping.is_set():
            try:
                await fn()
            except Exception:
                log.exception("the %s task failed; restarting it", name)
            if not self.stopping.is_set():
                await self._sleep(STEP_ERROR_PAUSE_S)

    async def _sleep(self, seconds: float) -> None:
        await nap(seconds, self.stopping)

    # -- schedule

    async def _interval(self) -> float:
        if self.config.interval_s is not None:
            return self.config.interval_s
        answered = await self.cache(lambda c: c.meta("interval_s"))
        return float(answered) if answered else DEFAULT_INTERVAL_S

    async def _offset(self) -> float:
        envoy_id = await self.cache(lambda c: c.envoy_id)
        if self.config.splay_s is not None:
            return bo.splay(envoy_id, self.config.splay_s)
        answered = await self.cache(lambda c: c.meta("splay_s"))
        if answered is not None:
            return float(answered)  # the server already derived it from this envoy's id
        return bo.splay(envoy_id, DEFAULT_SPLAY_S)

    async def _scheduler(self) -> None:
        interval = await self._interval()
        due = time.monotonic() + await self._offset()
        log.info("first run in %.1f s, then every %g s", max(0.0, due - time.monotonic()), interval)
        while not self.stopping.is_set():
            reasons = await self._wait_until(due)
            if self.stopping.is_set():
                break
            if reasons == ["reload"]:
                interval = await self._interval()
                due = min(due, time.monotonic() + interval)
                continue
            reason = ",".join(dict.fromkeys(r for r in reasons if r != "reload")) or "schedule"
            try:
                await self._run(reason)
            except Exception:
                log.exception("run (%s) failed unexpectedly; the daemon goes on", reason)
                await self._sleep(STEP_ERROR_PAUSE_S)
            if "schedule" in reason:
                interval = await self._interval()
                due = bo.next_run_at(due, interval, time.monotonic())

    async def _wait_until(self, due: float) -> list[str]:
        if not self._wake_reasons:
            self._wake_event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    await self._wake_event.wait()
        reasons, self._wake_reasons = self._wake_reasons, []
        self._wake_event.clear()
        return reasons or ["schedule"]

    # -- one run

    async def _run(self, reason: str) -> dict[str, Any] | None:
        revoked = await self.cache(lambda c: c.meta("revoked"))
        if revoked:
            envoy_id = await self.cache(lambda c: c.envoy_id)
            log.error("no run: %s", revoked_text(envoy_id, revoked))
            return None
        try:
            trusted = await self.cache(lambda c: runner._trusted_key(c, None))
        except ConfigError as exc:
            log.warning("no run: %s (join a fleet with `vigo-envoy join`)", exc)
            return None
        host_traits = await asyncio.to_thread(traits.collect, self.config.resolved_traits_dir())
        online = False
        link = self.link
        if link is not None and link.connected:
            budget = self.config.run_checkin_budget_s
            asked = link.client
            try:
                async with asyncio.timeout(budget):
                    online = await link.checkin(host_traits, trusted)
            except TimeoutError:
                log.warning("no checkin answer within %g s: this run converges from the cache", budget)
                # A missed answer is a dead link: the next gateway now, not after a later timeout.
                await link.abandon(f"no checkin answer within {budget:g} s", asked)
            except (ServerError, ProtocolError, OSError) as exc:
                revoked = await self.cache(lambda c: c.meta("revoked"))
                if revoked:  # the fleet said stop: the cached bundle is not enforced any more
                    envoy_id = await self.cache(lambda c: c.envoy_id)
                    log.error("no run: %s", revoked_text(envoy_id, revoked))
                    return None
                log.warning("checkin failed (%s): this run converges from the cache", exc)
        report = await asyncio.to_thread(self._converge, trusted, host_traits, not online, reason)
        if report is None:
            return None
        self.runs += 1
        await self.cache(lambda c: runner.note_enforcement(c, offline=report["offline"], at=report["started_at"]))
        if report["offline"]:
            queued = await self.cache(lambda c: c.queue_stats().runs)
            log.warning("offline run %s: enforced the cached bundle %s serial %d against fresh traits; "
                        "%d report(s) queued", report["run_id"], report["bundle_version"], report["serial"], queued)
        if link is not None:
            link.request_flush()
        return report

    def _converge(self, trusted: Any, host_traits: dict[str, Any], offline: bool, reason: str) -> dict[str, Any] | None:
        """In a worker thread: lock, converge the bundle in force, queue the report."""
        opts = runner.RunOptions(state_dir=self.state_dir, root=self.config.root,
                                 traits_dir=self.config.resolved_traits_dir())
        try:
            with runner.run_lock(self.state_dir):
                bundle = self.cache.sync(lambda c: c.bundle_in_force(trusted))
                if bundle is None:
                    log.warning("no run (%s): no bundle to enforce yet (none cached, none received)", reason)
                    return None
                envoy_id = self.cache.sync(lambda c: c.envoy_id)
                self.cache.sync(lambda c: c.store_traits(host_traits))
                log.info("converging bundle %s serial %d (%s%s)", bundle.version, bundle.serial, reason,
                         ", offline" if offline else "")
                report = runner.converge_report(bundle, host_traits, opts, envoy_id=envoy_id, offline=offline)
                return self.cache.sync(lambda c: runner.queue_report(c, report))
        except CacheLockedError as exc:
            log.warning("run (%s) skipped: %s", reason, exc)
            return None


def run_daemon(state_dir: Path, *, config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> int:
    """`vigo-envoy run`: build the daemon (a bad config file is a ConfigError here, before
    anything starts) and run it until SIGTERM/SIGINT. Returns the exit code."""
    async def go() -> int:
        daemon = Daemon(state_dir, config_file=config_file, overrides=overrides)
        return await daemon.main()

    return asyncio.run(go())
