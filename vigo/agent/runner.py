"""One run of the envoy, end to end: lock, trust, bundle, traits, converge, queue.

The order is the offline-first promise in code: the bundle comes from the command line (or, in
later issues, the server) *or* from the cache; traits are always fresh; the report is committed
to the LMDB queue before anything else is done with it (printed, sent).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigo.agent import engine, gateways, identity, traits
from vigo.agent.cache import DEFAULT_QUEUE_MAX_BYTES, Cache
from vigo.crypto.aead import Sealer
from vigo.crypto.keys import load_public_key, parse_public_key, public_pem
from vigo.errors import (
    AdmissionError,
    BundleError,
    BundleFormatError,
    CacheLockedError,
    ConfigError,
    VigoError,
)
from vigo.policy import bundle as bundle_mod

log = logging.getLogger("vigo.agent.runner")

LOCK_FILE = "run.lock"
#: Held by a running daemon for its whole life (one daemon per state directory).
DAEMON_LOCK_FILE = "daemon.lock"


@dataclass
class RunOptions:
    state_dir: Path
    bundle_path: Path | None = None
    trust_path: Path | None = None
    root: Path | None = None
    noop: bool = False
    traits_dir: Path | None = None
    offline: bool = False
    queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES
    env: dict[str, str] = field(default_factory=dict)


@contextmanager
def run_lock(state_dir: Path) -> Iterator[None]:
    """Exclusive per state directory: two runs must never converge (or queue) at once."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise CacheLockedError(
                f"another vigo-envoy run (pid {holder}) holds {state_dir / LOCK_FILE}; "
                "wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock, also when the process is killed


def open_cache(state_dir: Path, *, readonly: bool = False, queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES) -> Cache:
    sealer = None if readonly else Sealer.for_state_dir(state_dir)
    if not readonly:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Cache(state_dir, sealer=sealer, readonly=readonly, queue_max_bytes=queue_max_bytes)


def apply_once(opts: RunOptions) -> dict[str, Any]:
    """Converge once and queue the report; returns the report. Raises VigoError when no run
    can happen (no trusted key, bundle refused, no bundle at all)."""
    state_dir = opts.state_dir
    with run_lock(state_dir):
        sealer = Sealer.for_state_dir(state_dir)
        with Cache(state_dir, sealer=sealer, queue_max_bytes=opts.queue_max_bytes) as cache:
            trusted = _trusted_key(cache, opts.trust_path)
            current = None
            if opts.bundle_path is not None:
                incoming = bundle_mod.decode(_read_bundle(opts.bundle_path), trusted, origin=str(opts.bundle_path))
                cache.accept_bundle(incoming)  # raises BundleRefusedError on rollback
                current = incoming  # verified a moment ago: no need to decode it again
            else:
                current = cache.bundle_in_force(trusted)
            if current is None:  # a "no run" (exit 1), not a command-line error (ConfigError: 64)
                raise BundleError(
                    f"no bundle to enforce: the cache in {state_dir} holds none; "
                    "pass --bundle FILE (or join a server)"
                )
            return converge_and_queue(cache, current, opts, offline=opts.offline)


def converge_and_queue(
    cache: Cache,
    bundle: bundle_mod.Bundle,
    opts: RunOptions,
    *,
    offline: bool,
    host_traits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Converge a verified ``bundle`` against traits (fresh unless given) and commit the report
    to the queue before returning it. The caller holds the run lock and owns ``cache``."""
    if host_traits is None:
        host_traits = traits.collect(opts.traits_dir)
    cache.store_traits(host_traits)
    report = converge_report(bundle, host_traits, opts, envoy_id=cache.envoy_id, offline=offline)
    return queue_report(cache, report)


def converge_report(
    bundle: bundle_mod.Bundle,
    host_traits: dict[str, Any],
    opts: RunOptions,
    *,
    envoy_id: str,
    offline: bool,
) -> dict[str, Any]:
    """Converge and return the report, touching no cache (the daemon converges in a worker
    thread while its event loop keeps the cache; it queues with ``queue_report``)."""
    return engine.converge(
        bundle,
        host_traits,
        root=opts.root,
        noop=opts.noop,
        envoy_id=envoy_id,
        offline=offline,
        env=opts.env,
        digest=traits.traits_digest(host_traits),
    )


def queue_report(cache: Cache, report: dict[str, Any]) -> dict[str, Any]:
    """Commit a run's report to the queue (durably, before anything else sees it); log it."""
    cache.enqueue(report, last_run=last_run_summary(report))
    log.info(
        "run %s bundle %s serial %d%s: %s", report["run_id"], report["bundle_version"],
        report["serial"], " (offline)" if report["offline"] else "", _counts_text(report["counts"]),
    )
    return report


def note_enforcement(cache: Cache, *, offline: bool, at: float) -> None:
    """Remember since when this envoy enforces from its cache: set by the first offline run
    after an online one, cleared by the next online run (meta ``offline_since``)."""
    since = cache.meta("offline_since")
    if offline and since is None:
        cache.set_meta("offline_since", at)
    elif not offline and since is not None:
        cache.set_meta("offline_since", None)


def _trusted_key(cache: Cache, trust_path: Path | None):
    """The key bundles must be signed with: from --trust (remembered), else the remembered one."""
    if trust_path is not None:
        key = load_public_key(trust_path)
        pem = public_pem(key)
        if cache.meta("trusted_key") != pem:
            if cache.meta("trusted_key") is not None:
                log.warning("trusted bundle key replaced by %s", trust_path)
            cache.set_meta("trusted_key", pem)
        return key
    pem = cache.meta("trusted_key")
    if pem is None:
        raise ConfigError(
            "no trusted bundle key: pass --trust KEY.pub (the public half of the key the "
            "bundles are signed with)"
        )
    return parse_public_key(pem, origin="trusted key in the envoy cache")


def _read_bundle(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > bundle_mod.MAX_BUNDLE_BYTES:
            raise BundleFormatError(
                f"{path}: {size} bytes is over the {bundle_mod.MAX_BUNDLE_BYTES}-byte bundle limit"
            )
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read bundle {path}: {exc.strerror or exc}") from exc


def last_run_summary(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": report["run_id"],
        "started_at": report["started_at"],
        "duration_s": report["duration_s"],
        "bundle_version": report["bundle_version"],
        "serial": report["serial"],
        "noop": report["noop"],
        "offline": report["offline"],
        "counts": report["counts"],
    }


def status(state_dir: Path) -> dict[str, Any]:
    """What `vigo-envoy status` shows; reads the cache without taking the run lock."""
    with Cache(state_dir, readonly=True) as cache:
        stats = cache.queue_stats()
        return {
            "state_dir": str(state_dir),
            "envoy_id": cache.meta("envoy_id"),
            "bundle": cache.bundle_info("current"),
            "previous_bundle": cache.bundle_info("previous"),
            "highest_serial": cache.meta("highest_serial", 0),
            "highest_term": cache.meta("highest_term", 0),
            "queue": stats.as_dict(),
            "last_run": cache.meta("last_run"),
            "servers": cache.meta("servers", []),
            # Learned from check-in answers ({list, at, server, since}); and every address in
            # the order this envoy tries them (without the daemon's memory of recent failures).
            "gateways": cache.meta("gateways"),
            "dial_order": _dial_order(cache),
            "last_checkin_at": cache.meta("last_checkin_at"),
            "revoked": cache.meta("revoked"),
            "quarantined": cache.quarantined(),
            "checked_at": time.time(),
            # Written by the daemon (`vigo-envoy run`); `link` is only believed while it runs.
            "daemon": _daemon_status(state_dir, cache.meta("daemon")),
            "link": cache.meta("link"),
            "offline_since": cache.meta("offline_since"),
            "last_flush": cache.meta("last_flush"),
            "certificate": certificate_status(state_dir, cache.meta("cert_refused"), cache.meta("last_checkin_at")),
        }


def certificate_status(state_dir: Path, refused: dict[str, Any] | None = None,
                       last_checkin_at: float | None = None, *, now: float | None = None) -> dict[str, Any] | None:
    """The envoy certificate as `status` shows it (None: not joined): serial, validity, whether
    it expired, when renewal is due, and a gateway's refusal of it as expired (remembered in
    meta ``cert_refused``) unless a check-in with it succeeded since."""
    try:
        ident = identity.load(state_dir)
    except AdmissionError:
        return None
    serial = format(ident.serial, "x")
    if not (refused and refused.get("serial") == serial and (refused.get("at") or 0) > (last_checkin_at or 0)):
        refused = None
    return {
        "serial": serial,
        "not_before": ident.not_before,
        "not_after": ident.not_after,
        "expired": ident.expired(now),
        "renew_after": ident.renew_after(),
        "refused": refused,
    }


def daemon_pid(state_dir: Path) -> int | None:
    """The pid of the daemon holding ``STATE_DIR/daemon.lock``, or None if no daemon runs."""
    path = state_dir / DAEMON_LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _dial_order(cache: Cache) -> list[str]:
    """The gateways in the order a connection tries them: the daemon's pinned ``servers`` (its
    config, recorded at its start), else the learned list and the joined addresses in this
    envoy's rendezvous order (without the daemon's memory of recent failures)."""
    pinned = ((cache.meta("daemon") or {}).get("config") or {}).get("servers")
    if pinned:
        return gateways.pinned_order(pinned)
    return gateways.dial_order(cache.meta("envoy_id") or "", cache.meta("servers", []) or [],
                               gateways.learned(cache.meta("gateways")))


def _daemon_status(state_dir: Path, recorded: dict[str, Any] | None) -> dict[str, Any]:
    pid = daemon_pid(state_dir)
    return {"running": pid is not None, "pid": pid if pid and pid > 0 else None,
            "started_at": (recorded or {}).get("started_at") if pid is not None else None}


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items())


__all__ = [
    "RunOptions", "VigoError", "apply_once", "converge_and_queue", "converge_report", "daemon_pid",
    "note_enforcement", "open_cache", "queue_report", "run_lock", "status",
]
