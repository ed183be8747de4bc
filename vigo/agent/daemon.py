"""`vigo-envoy run`: the envoy daemon. One asyncio process, three duties that never wait on each other.

    scheduler   runs on time (interval, per-host splay) whatever the network does: collect
                traits, check in if a live connection answers within RUN_CHECKIN_BUDGET_S,
                else converge from the cached bundle (the report is marked offline), queue
                the report, ask for a flush. A ``notify`` from the server, or a newer bundle
                arriving on reconnect, runs it at once. Converging is blocking work (resources
                run subprocesses): it runs in a worker thread under the run lock.
    Link        the connection: cycles through the gateways with exponential backoff and full
                jitter (vigo.agent.backoff), keeps one persistent mutual-TLS connection, checks
                in on connect (a bundle pushed while the envoy was away arrives here; an older
                serial or term is refused by the cache), receives ``notify``, pings every
                ``keepalive_s``. After the check-in on connect and after every run's check-in
                it renews the certificate when due (``client.try_renew``, in the background:
                neither the run nor the flush waits for it); the live connection carries on
                with the old certificate (valid until it expires), the next one presents the
                new. A lapsed certificate is not tried on the network: one line says to
                re-join, runs go on from the cache.
    flusher     part of the Link: after every run and after every (re)connect, sends the
                queue with ``client.flush_paced`` (one batch in flight, paced by the server's
                answer time, a random delay within the flush splay after a reconnect,
                retry-after honoured); only acknowledged run ids leave the queue.

The LMDB cache is owned by one thread (``CacheThread``); the event loop and the converging
worker both hand it functions to run, so the cache is never used from two threads at once.

No exception ends the daemon: every step is wrapped, logged with what was attempted, and the
daemon goes on. SIGTERM/SIGINT: the current run finishes, the queue gets one last flush
(at most SHUTDOWN_FLUSH_BUDGET_S), exit 0. SIGHUP: the local config file is read again (flags
given on the command line still win); a bad file is logged and the running config kept.

What the daemon is doing is written to the cache's meta for `vigo-envoy status`:
``daemon`` {pid, started_at}, ``link`` {connected, server, since, error},
``offline_since`` (enforcing from cache since), ``last_flush`` {at, server, acked, queued}.

The local config file (``/etc/vigo-envoy/envoy.yaml``, or ``--config``/``VIGO_ENVOY_CONFIG``)
is documented in docs/envoy.md; every key is optional (``EnvoyConfig``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import logging
import os
import random
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigo.agent import backoff as bo
from vigo.agent import identity, runner, traits
from vigo.agent.cache import Cache
from vigo.agent.client import (
    EnvoyClient,
    _lapsed_text,
    _nap,
    _revoked_text,
    checkin_body,
    flush_paced,
    note_refused_cert,
    parse_server,
    record_flush,
    take_checkin_answer,
    try_renew,
)
from vigo.agent.enrolment import tls_client_context
from vigo.errors import (
    AdmissionError,
    CacheError,
    CacheLockedError,
    ConfigError,
    ProtocolError,
    ServerError,
    UnavailableError,
)

log = logging.getLogger("vigo.agent.daemon")

#: The local config file read when neither --config nor VIGO_ENVOY_CONFIG names one (a missing
#: default file means "all defaults"; a missing file that was named is an error).
DEFAULT_CONFIG_PATH = Path("/etc/vigo-envoy/envoy.yaml")
TRAITS_DIR_DEFAULT = Path("/etc/vigo-envoy/traits.d")
#: Seconds between runs when neither the local config nor a server answer says.
DEFAULT_INTERVAL_S = 300.0
#: Splay bound (seconds) when neither the local config nor a server answer says.
DEFAULT_SPLAY_S = 60.0
#: How long a run waits for its check-in answer on a live connection before it converges from
#: the cache (offline) instead, seconds. The run never waits longer on the network.
RUN_CHECKIN_BUDGET_S = 5.0
#: A ping on an idle connection every this many seconds (dead peers are noticed, and the
#: gateway's idle timeout, 900 s by default, never closes a healthy envoy).
KEEPALIVE_S = 60.0
#: At SIGTERM, how long the last flush may take before the daemon exits anyway, seconds.
SHUTDOWN_FLUSH_BUDGET_S = 5.0
#: After an unexpected error in a loop, pause this long before going on (no hot loop), seconds.
STEP_ERROR_PAUSE_S = 1.0
#: Flush retry after a server error that is not about the connection, seconds (bounds).
FLUSH_ERROR_BASE_S = 2.0
FLUSH_ERROR_CAP_S = 120.0


# --- local config -------------------------------------------------------------------------------


@dataclass
class EnvoyConfig:
    """The daemon's local settings. None means "not set here" (the server's answer or the
    built-in default applies)."""

    #: Gateways, HOST:PORT, tried in order; None: the list `vigo-envoy join` stored.
    servers: list[str] | None = None
    #: Seconds between runs; None: the server's answer, else DEFAULT_INTERVAL_S.
    interval_s: float | None = None
    #: Bound of this host's per-run offset (and of the flush delay after a reconnect), seconds;
    #: None: the server's answer, else DEFAULT_SPLAY_S.
    splay_s: float | None = None
    #: Custom traits folder; None: VIGO_ENVOY_TRAITS_DIR, else /etc/vigo-envoy/traits.d.
    traits_dir: Path | None = None
    #: Re-base every managed path under this folder (tests, demos); None: the real root.
    root: Path | None = None
    #: Seconds between keepalive pings on an idle connection.
    keepalive_s: float = KEEPALIVE_S
    #: Reconnect backoff bounds, seconds (see vigo.agent.backoff).
    reconnect_base_s: float = bo.RECONNECT_BASE_S
    reconnect_cap_s: float = bo.RECONNECT_CAP_S
    #: How long a run waits for its check-in answer, seconds.
    run_checkin_budget_s: float = RUN_CHECKIN_BUDGET_S

    def resolved_traits_dir(self) -> Path:
        if self.traits_dir is not None:
            return self.traits_dir
        return Path(os.environ.get("VIGO_ENVOY_TRAITS_DIR", str(TRAITS_DIR_DEFAULT)))

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


#: key: (kind, smallest allowed value)
_CONFIG_KEYS: dict[str, tuple[str, float | None]] = {
    "servers": ("servers", None),
    "interval_s": ("number", 0.1),
    "splay_s": ("number", 0.0),
    "traits_dir": ("path", None),
    "root": ("path", None),
    "keepalive_s": ("number", 0.5),
    "reconnect_base_s": ("number", 0.01),
    "reconnect_cap_s": ("number", 0.01),
    "run_checkin_budget_s": ("number", 0.1),
}


def config_path(explicit: Path | None) -> tuple[Path, bool]:
    """The config file to read and whether it must exist (it must when it was named)."""
    if explicit is not None:
        return explicit, True
    env = os.environ.get("VIGO_ENVOY_CONFIG")
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(path: Path, *, required: bool) -> EnvoyConfig:
    """Read and check the local config file; ConfigError naming the key and the value."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(f"envoy config {path} does not exist") from None
        return EnvoyConfig()
    except OSError as exc:
        raise ConfigError(f"cannot read envoy config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _CONFIG_KEYS:
            raise ConfigError(f"{path}: {key}: unknown setting (expected one of {', '.join(sorted(_CONFIG_KEYS))})")
        if value is None:
            continue
        values[key] = _coerce(path, str(key), value)
    cfg = EnvoyConfig(**values)
    if cfg.reconnect_cap_s < cfg.reconnect_base_s:
        raise ConfigError(f"{path}: reconnect_cap_s ({cfg.reconnect_cap_s}) is below reconnect_base_s "
                          f"({cfg.reconnect_base_s})")
    return cfg


def _coerce(path: Path, key: str, value: Any) -> Any:
    kind, low = _CONFIG_KEYS[key]
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: {key}: expected a number of seconds, got {value!r}")
        if low is not None and value < low:
            raise ConfigError(f"{path}: {key}: {value!r} is below the smallest allowed value {low}")
        return float(value)
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: {key}: expected a folder path, got {value!r}")
        return Path(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: servers: expected a list of HOST:PORT, got {value!r}")
    for server in value:
        try:
            parse_server(server)
        except ConfigError as exc:
            raise ConfigError(f"{path}: servers: {exc}") from None
    return [v.strip() for v in value]


def with_overrides(cfg: EnvoyConfig, overrides: dict[str, Any]) -> EnvoyConfig:
    """``cfg`` with every override that is not None (command-line flags win over the file)."""
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


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


# --- the connection -----------------------------------------------------------------------------


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
        cache: CacheThread,
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
        self.backoff = bo.Backoff(config.reconnect_base_s, config.reconnect_cap_s, rng=self.rng)
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
        self._next = 0  # index of the gateway to try first (the last one that worked)
        self._last_problem: str | None = None
        self._flush_retry = bo.Backoff(FLUSH_ERROR_BASE_S, FLUSH_ERROR_CAP_S, rng=self.rng)
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
        self.backoff = bo.Backoff(config.reconnect_base_s, config.reconnect_cap_s, rng=self.rng)
        if old.servers != config.servers:
            self._next = 0
            if self.client is not None:
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
            stale, _accepted = await self._checkin(client, host_traits, trusted)
        except UnavailableError:
            await self._drop("checkin failed", client)
            raise
        except ServerError as exc:
            if exc.code == "revoked":
                await self._revoked(client.server, exc.reason)
                await self._drop("revoked", client)
            raise
        if stale is not None:
            await self._drop(stale, client)
            return False
        self.renew_soon(client)
        return True

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
        """Try each gateway once, starting with the last good one; serve the first that checks
        in with a current answer until its connection ends. Returns the longest retry-after any
        gateway asked for (None: none asked)."""
        setup = await self._setup()
        if setup is None:
            return self.config.reconnect_cap_s
        ctx, servers, trusted, ident = setup
        retry_after: float | None = None
        refused: str | None = None
        start = self._next % len(servers)
        for index in [*range(start, len(servers)), *range(start)]:
            if self.stop_event.is_set():
                return None
            server = servers[index]
            self.counters.attempts += 1
            try:
                client = await EnvoyClient.open(server, ctx)
            except UnavailableError as exc:
                self._failed(server, exc.reason, exc)
                continue
            except ServerError as exc:  # a TLS "certificate expired" alert
                refused = await self.cache(lambda c, s=server, r=exc.reason: note_refused_cert(c, s, r, ident))
                continue
            try:
                host_traits = await self.cache(lambda c: c.last_traits())
                if not host_traits:
                    host_traits = await asyncio.to_thread(traits.collect, self.config.resolved_traits_dir())
                stale, accepted = await self._checkin(client, host_traits, trusted)
            except ServerError as exc:
                await client.close()
                self.counters.errors[exc.code] += 1
                if exc.code == "revoked":
                    await self._revoked(server, exc.reason)
                    return self.config.reconnect_cap_s
                if exc.code == "expired":  # by that gateway's clock: another one may differ
                    refused = await self.cache(lambda c, s=server, r=exc.reason: note_refused_cert(c, s, r, ident))
                    continue
                if exc.retry_after_s is not None:
                    retry_after = max(retry_after or 0.0, exc.retry_after_s)
                self._failed(server, f"checkin refused ({exc.code}): {exc.reason}", exc)
                continue
            except Exception as exc:  # our own body, or the cache: say so and try the next one
                await client.close()
                self._failed(server, f"checkin failed: {type(exc).__name__}: {exc}", exc)
                continue
            if stale is not None:
                await client.close()
                self._failed(server, stale, None)
                continue
            self._next = index
            self.renew_soon(client)
            await self._serve(client, accepted)
            return None
        if refused is not None:  # the gateway's reason names its clock: one line per certificate
            self._problem(_lapsed_text(self.state_dir, servers, ident.not_after, refused),
                          key=f"certificate {ident.serial:x} refused as expired")
            return self.config.reconnect_cap_s
        return retry_after

    async def _setup(self) -> tuple[ssl.SSLContext, list[str], Any, identity.Identity] | None:
        """TLS context, gateways, trusted key and identity, or None (logged) when this envoy
        cannot connect now: not joined, revoked, certificate expired."""
        try:
            ident = await asyncio.to_thread(identity.load, self.state_dir)
            servers = list(self.config.servers or await self.cache(lambda c: list(c.meta("servers", []) or [])))
            if not servers:
                raise AdmissionError(f"not joined: the cache in {self.state_dir} names no server; run "
                                     f"`vigo-envoy join --server HOST:PORT --token TOKEN --state-dir {self.state_dir}`")
            revoked = await self.cache(lambda c: c.meta("revoked"))
            if revoked:
                envoy_id = await self.cache(lambda c: c.envoy_id)
                raise AdmissionError(_revoked_text(envoy_id, revoked))
            if ident.expired():
                raise AdmissionError(_lapsed_text(self.state_dir, servers, ident.not_after))
            trusted = await self.cache(lambda c: runner._trusted_key(c, None))
            ctx = tls_client_context(ident.ca_pem, ident.cert_pem, ident.key_pem)
        except (AdmissionError, ConfigError, ValueError, ssl.SSLError, OSError) as exc:
            self._problem(str(exc))
            return None
        return ctx, servers, trusted, ident

    async def _checkin(self, client: EnvoyClient, host_traits: dict[str, Any],
                       trusted: Any) -> tuple[str | None, bool]:
        body = await self.cache(lambda c: checkin_body(c, host_traits))
        answer = await client.checkin(body)
        stale, accepted = await self.cache(lambda c: take_checkin_answer(c, client.server, answer, trusted))
        if stale is None:
            self.answer_splay_s = float(answer.get("splay_s") or 0.0)
        return stale, accepted

    async def _serve(self, client: EnvoyClient, accepted: bool) -> None:
        """Hold a live connection: notify → wake a run, keepalive pings, until it ends."""
        self.client = client
        self.backoff.reset()
        self._last_problem = None
        self.counters.connects += 1
        await self._set_state(LinkState(True, client.server, time.time()))
        if self.persist:  # a current answer: the bundle in force is the fleet's again
            await self.cache(lambda c: runner.note_enforcement(c, offline=False, at=time.time()))
        log.info("connected to %s", client.server)
        self._splay_next_flush = True
        self.request_flush()
        if accepted:
            self._wake("bundle")
        why = "closed by the gateway"
        try:
            while not self.stop_event.is_set() and self.client is client:
                try:
                    async with asyncio.timeout(self.config.keepalive_s):
                        frame = await client.conn.receive()
                except TimeoutError:
                    await client.request("ping", {})
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
            if self.client is client and not self.stop_event.is_set():
                log.warning("connection to %s lost (%s); reconnecting with backoff", client.server, why)
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
        record = {"at": time.time(), "server": server, "reason": reason}
        await self.cache(lambda c: c.set_meta("revoked", record))
        envoy_id = await self.cache(lambda c: c.envoy_id)
        log.error("%s", _revoked_text(envoy_id, record))

    async def _wait(self, seconds: float) -> None:
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._kick.wait()

    def _failed(self, server: str, reason: str, exc: BaseException | None) -> None:
        level = logging.INFO if isinstance(exc, UnavailableError) else logging.WARNING
        text = reason if reason.startswith(server) else f"{server}: {reason}"
        log.log(level, "gateway %s", text)
        self.state.error = text

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
                    delay = bo.flush_splay(self.flush_splay_bound(), self.rng)
                    log.debug("first flush after connecting in %.2f s", delay)
                    await _nap(delay, self.stop_event)
                    if self.client is not client:
                        continue
                stats = await flush_paced(client, self.cache, rng=self.rng, stop=self.stop_event)
                self.counters.acked += stats.acked
                self.counters.flushes += 1
                self.counters.errors.update(stats.errors)
                self._flush_retry.reset()
                if self.persist and stats.batches:
                    await self.cache(lambda c, s=client.server, n=stats.acked: record_flush(c, s, n))
            except UnavailableError as exc:
                self.counters.errors[exc.code] += 1
                log.warning("flush to %s stopped (%s); the rest stays queued and is sent after reconnecting",
                            client.server, exc.reason)
                await self._drop(f"flush failed: {exc.reason}", client)
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
        pause = bo.Backoff(1.0, 60.0, rng=self.rng)
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
        await _nap(seconds, self.stopping)

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
            log.error("no run: %s", _revoked_text(envoy_id, revoked))
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
            try:
                async with asyncio.timeout(budget):
                    online = await link.checkin(host_traits, trusted)
            except TimeoutError:
                log.warning("no checkin answer within %g s: this run converges from the cache", budget)
            except (ServerError, ProtocolError, OSError) as exc:
                revoked = await self.cache(lambda c: c.meta("revoked"))
                if revoked:  # the fleet said stop: the cached bundle is not enforced any more
                    envoy_id = await self.cache(lambda c: c.envoy_id)
                    log.error("no run: %s", _revoked_text(envoy_id, revoked))
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
