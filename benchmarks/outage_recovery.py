"""Outage recovery: N envoys with queued reports, the whole server away for T seconds, then back.

What an operator needs to know about the offline-first promise at fleet scale: once the server
returns, how long until every report the fleet queued while it was away is stored, how fast
the flush goes, and that nothing was lost or stored twice.

Server: a real dev server on a local Ray (``vigocli server start --dev`` on free ports, its own
data dir and Ray temp dir), stopped with ``vigocli server stop --data-dir`` and started again
on the same data dir and ports, exactly as an operator would; never ``ray stop``.

Envoys: ``--envoys`` in-process asyncio envoys in this one process (500 daemon processes would
not fit a small machine), each running the daemon's real connection code
(``vigo.agent.link.Link``: TLS, check-in, reconnect backoff with full jitter, the paced flush
of ``vigo.agent.flush.flush``) over its own state dir, certificate (a real join) and LMDB
cache. The caches share one cache thread (each cache is only ever used from it).

1. start the server, push a one-file stack (into the dev server's stack folder, so a restart
   re-pushes the same content and keeps the serial), join every envoy, connect every envoy
   (each checks in and caches the bundle);
2. ``vigocli server stop``; every envoy converges ``--reports`` times offline, for real
   (``runner.converge_and_queue`` against the cached bundle, into its own root) — the reports
   queue up while the envoys back off;
3. after ``--outage-seconds`` (from the moment the stop returned), ``vigocli server start``
   again; the clock starts when the gateway accepts TCP connections again;
4. measured: time until the first report is acknowledged, until every queue is empty (every
   report acknowledged = stored: the server commits before it acknowledges), reports/s over
   the flush, the errors envoys were answered, reconnects;
5. verified server-side by run id (``envoys.show`` through the admin channel, per envoy):
   lost (queued but not stored), duplicated (stored twice), unexpected (stored, never made).

Target from the issue: 500 envoys x 10 queued reports fully flushed within 30 s of the server's
return. Writes ``benchmarks/results/outage_recovery.json``.

    .venv/bin/python benchmarks/outage_recovery.py [--envoys 500] [--reports 10] [--outage-seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vigo
from vigo.agent import backoff, runner, traits
from vigo.agent.config import EnvoyConfig
from vigo.agent.daemon import CacheThread
from vigo.agent.join import join_fleet
from vigo.agent.link import Link
from vigo.crypto.keys import parse_public_key

RESULTS_PATH = Path(__file__).parent / "results" / "outage_recovery.json"
TARGET_S = 30.0
BIN = Path(sys.executable).parent
TINY_POLICY = """name: tiny
description: one file per host, so the benchmark measures the flush, not the converge
resources:
  - file: /etc/vigo-bench/motd
    content: "managed by vigo\\n"
    mode: "0644"
"""


def log(message: str) -> None:
    print(f"[outage_recovery {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevServer:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.dash, self.ray_port, self.port = free_port(), free_port(), free_port()
        self.env = {**os.environ, "VIGO_ADDRESS": f"http://127.0.0.1:{self.dash}"}
        self.running = False

    @property
    def address(self) -> str:
        return self.env["VIGO_ADDRESS"]

    def vigocli(self, *args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(BIN / "vigocli"), *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"vigocli {' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
        return proc

    def start(self) -> dict[str, Any]:
        self.running = True
        out = self.vigocli("server", "start", "--dev", "--data-dir", self.data_dir, "--dashboard-port", self.dash,
                           "--ray-port", self.ray_port, "--port", self.port, "--json")
        return json.loads(out.stdout)

    def stop(self) -> None:
        self.vigocli("server", "stop", "--data-dir", self.data_dir)
        self.running = False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def join_all(states: list[Path], gateway: str, token: str, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(state: Path) -> None:
        nonlocal done
        async with gate:
            await join_fleet(state, [gateway], token)
            done += 1
            if done % 100 == 0:
                log(f"  {done}/{len(states)} joined")

    await asyncio.gather(*(one(s) for s in states))


def queue_offline(cache: Any, state: Path, host_traits: dict[str, Any], reports: int) -> list[str]:
    """On the cache thread: ``reports`` real offline runs of the cached bundle."""
    trusted = parse_public_key(cache.meta("trusted_key"), origin="trusted key")
    bundle = cache.bundle_in_force(trusted)
    if bundle is None:
        raise RuntimeError(f"{state}: no cached bundle (the envoy never checked in?)")
    opts = runner.RunOptions(state_dir=state, root=state / "root")
    ids = []
    for _ in range(reports):
        report = runner.converge_and_queue(cache, bundle, opts, offline=True, host_traits=host_traits)
        runner.note_enforcement(cache, offline=True, at=report["started_at"])
        ids.append(report["run_id"])
    return ids


async def verify(server: DevServer, expected: dict[str, list[str]]) -> dict[str, int]:
    """Per envoy, through the admin channel: which of its run ids the server stores."""
    from vigo.cli import client as admin_client

    os.environ["VIGO_ADDRESS"] = server.address
    token = admin_client.cluster_token()
    gateway = admin_client.find_gateways(server.address, token)[0]
    lost = duplicated = unexpected = stored_total = 0
    for envoy_id, ids in expected.items():
        shown = await admin_client._admin_call(gateway, token, "envoys.show", {"envoy_id": envoy_id, "runs": 1000})
        got = [r["run_id"] for r in shown["runs"]]
        stored_total += len(set(got))
        lost += len(set(ids) - set(got))
        unexpected += len(set(got) - set(ids))
        duplicated += (len(got) - len(set(got))) + (shown["run_count"] - len(got))
    return {"lost": lost, "duplicated": duplicated, "unexpected": unexpected, "stored": stored_total}


async def run(args: argparse.Namespace, server: DevServer, work: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    info = server.start()
    log(f"dev server up in {time.monotonic() - t0:.1f} s: gateway {info['gateway']}")
    stack = Path(info["stack_dir"])
    for path in sorted(stack.rglob("*"), reverse=True):
        if path.is_file():
            path.unlink()
    (stack / "tiny.yaml").write_text(TINY_POLICY)
    pushed = json.loads(server.vigocli("stack", "push", stack, "--json").stdout)
    token = json.loads(server.vigocli("token", "create", "--uses", args.envoys, "--json").stdout)["token"]

    states = [work / "envoys" / f"e{i:04d}" for i in range(args.envoys)]
    t0 = time.monotonic()
    await join_all(states, info["gateway"], token, args.join_concurrency)
    join_s = time.monotonic() - t0
    log(f"{args.envoys} envoys joined in {join_s:.1f} s")

    host_traits = traits.collect(None)
    executor = ThreadPoolExecutor(1, thread_name_prefix="bench-cache")
    caches = [CacheThread(lambda s=s: runner.open_cache(s), executor) for s in states]
    for cache in caches:
        await cache.open()
        await cache(lambda c: c.store_traits(host_traits))
    rng = random.Random(args.seed)
    config = EnvoyConfig()  # the daemon's defaults: backoff 1 s .. 20 s, splay from the server
    links = [Link(s, c, config, rng=random.Random(rng.random())) for s, c in zip(states, caches, strict=True)]
    tasks = [asyncio.create_task(link.run()) for link in links]
    try:
        t0 = time.monotonic()
        while not all(link.connected for link in links):
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"only {sum(link.connected for link in links)} of {len(links)} envoys connected")
            await asyncio.sleep(0.2)
        while True:
            have = await asyncio.gather(*(c(lambda cache: cache.bundle_info("current")) for c in caches))
            if all(have):
                break
            await asyncio.sleep(0.2)
        log(f"all {len(links)} envoys connected and hold bundle serial {pushed['serial']} "
            f"({time.monotonic() - t0:.1f} s)")

        t0 = time.monotonic()
        await asyncio.to_thread(server.stop)
        stopped = time.monotonic()
        log(f"server stopped ({stopped - t0:.1f} s); converging {args.reports} times offline per envoy")
        expected: dict[str, list[str]] = {}
        for state, cache in zip(states, caches, strict=True):
            envoy_id = await cache(lambda c: c.envoy_id)
            expected[envoy_id] = await cache(lambda c, s=state: queue_offline(c, s, host_traits, args.reports))
        queue_s = time.monotonic() - stopped
        total = sum(len(v) for v in expected.values())
        log(f"{total} offline reports queued in {queue_s:.1f} s")
        wait = args.outage_seconds - (time.monotonic() - stopped)
        if wait > 0:
            log(f"server stays away {wait:.1f} s more")
            await asyncio.sleep(wait)
        assert not any(link.connected for link in links)
        attempts_before = [link.backoff.attempt for link in links]

        returned: dict[str, float] = {}

        def watch_port() -> None:
            while "port" not in returned:
                if port_open(server.port):
                    returned["port"] = time.monotonic()
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=watch_port, daemon=True)
        watcher.start()
        start_called = time.monotonic()
        outage_s = start_called - stopped
        start_task = asyncio.create_task(asyncio.to_thread(server.start))
        first_ack: float | None = None
        all_connected: float | None = None
        samples: list[tuple[float, int, int]] = []
        while True:
            queued = sum(await asyncio.gather(*(c(lambda cache: cache.queue_stats().runs) for c in caches)))
            now = time.monotonic()
            connected = sum(link.connected or link.counters.connects > 1 for link in links)
            if all_connected is None and connected == len(links):
                all_connected = now
            samples.append((now, total - queued, connected))
            if first_ack is None and queued < total:
                first_ack = now
            if queued == 0:
                break
            if now - start_called > args.timeout:
                raise RuntimeError(f"{queued} reports still queued {args.timeout} s after the server was started")
            await asyncio.sleep(0.1)
        all_acked = time.monotonic()
        info2 = await start_task
        start_returned = time.monotonic()
        watcher.join(5)
        back = returned.get("port", start_returned)
        log(f"every queue empty {all_acked - back:.1f} s after the gateway came back")
    finally:
        for link in links:
            await link.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for cache in caches:
            await cache.close()
        executor.shutdown()

    checked = await verify(server, expected)
    errors: dict[str, int] = {}
    for link in links:
        for code, n in link.counters.errors.items():
            errors[code] = errors.get(code, 0) + n
    flush_s = max(1e-9, all_acked - (first_ack or all_acked))
    stored_s = all_acked - back
    return {
        "benchmark": "outage_recovery",
        "vigo": vigo.__version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "server": "Ray dev server (vigocli server start --dev), stopped and started again on the same data dir and ports",
        "envoys": args.envoys,
        "reports_per_envoy": args.reports,
        "reports_total": total,
        "settings": {
            "reconnect_base_s": config.reconnect_base_s, "reconnect_cap_s": config.reconnect_cap_s,
            "flush_splay_cap_s": backoff.FLUSH_SPLAY_CAP_S, "flush_max_reports": 50,
            "server_splay_s": "dev default (checkin.splay_s 5)",
        },
        "setup": {"join_s": round(join_s, 2), "queue_offline_s": round(queue_s, 2),
                  "reconnect_attempt_when_back_mean": round(sum(attempts_before) / len(attempts_before), 2)},
        "outage_s": round(outage_s, 2),
        "server_start_s": round(start_returned - start_called, 2),
        "gateway_back_after_start_called_s": round(back - start_called, 2),
        "first_report_stored_after_return_s": round((first_ack or all_acked) - back, 2),
        "all_envoys_reconnected_after_return_s": round((all_connected or all_acked) - back, 2),
        "all_reports_stored_after_return_s": round(stored_s, 2),
        "flush_window_s": round(flush_s, 2),
        "reports_per_s_during_flush": round(total / flush_s, 1),
        "lost": checked["lost"],
        "duplicated": checked["duplicated"],
        "unexpected": checked["unexpected"],
        "stored_server_side": checked["stored"],
        "envoy_errors": errors,
        "reconnects": sum(link.counters.connects for link in links) - len(links),
        "target": {"all_stored_within_s": TARGET_S, "met": stored_s <= TARGET_S and checked["lost"] == 0
                   and checked["duplicated"] == 0},
        # (seconds after the gateway came back, reports stored, envoys reconnected)
        "progress": [(round(t - back, 2), n, c) for t, n, c in samples[:: max(1, len(samples) // 60)]],
        "bundle_serial_after_restart": info2["bundle"]["serial"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envoys", type=int, default=500)
    parser.add_argument("--reports", type=int, default=10, help="queued reports per envoy")
    parser.add_argument("--outage-seconds", type=float, default=30.0,
                        help="how long the server stays away (at least as long as queueing takes)")
    parser.add_argument("--join-concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="vigo-outage-"))
    server = DevServer(work / "server")
    try:
        result = asyncio.run(run(args, server, work))
    finally:
        if server.running:
            try:
                server.stop()
            except Exception as exc:
                log(f"stopping the dev server failed: {exc}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"""outage recovery: {result['envoys']} envoys x {result['reports_per_envoy']} queued reports = {result['reports_total']}
  server away                  {result['outage_s']} s (then `vigocli server start`: {result['server_start_s']} s)
  first report stored          {result['first_report_stored_after_return_s']} s after the gateway came back
  every envoy reconnected      {result['all_envoys_reconnected_after_return_s']} s after (backoff: full jitter, cap {result['settings']['reconnect_cap_s']:g} s)
  every report stored          {result['all_reports_stored_after_return_s']} s after the gateway came back (target <= {TARGET_S:g} s)
  flush rate                   {result['reports_per_s_during_flush']} reports/s over {result['flush_window_s']} s
  lost / duplicated / unknown  {result['lost']} / {result['duplicated']} / {result['unexpected']}  (server-side, by run id)
  errors answered to envoys    {result['envoy_errors'] or 'none'}
  target met                   {result['target']['met']}
results: {args.out}""")
    return 0 if result["target"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
