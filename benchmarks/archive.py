"""Continuous archiving: recovery point under a steady write load, restore and backup speed.

Everything runs on the real core in this process, no Ray: a ``Partition`` in a temp dir (dev
settings, ``archive.sync_interval_s`` 1 s), its ``Archiver`` attached by ``start_archive()``,
and moto's S3 (``tests/s3server.py``) on 127.0.0.1 in a child process, so that the S3 server's
request handling does not share this interpreter's GIL with the archiver (a real S3 never
does; ``--s3-in-process`` measures the other way).

1. Lag (RPO), once per target (file, S3): ``--rate`` write transactions per second for
   ``--duration`` s, each one ``Partition.handle_batch`` with one envoy's ``results`` message
   carrying one run report of ~3 KB packed (20 resources, generated before the clock starts),
   as the gateway delivers them, with ``partition.tick()`` every second from the same thread
   (as the primary's upkeep does). Lag is commit to "the archive has it", measured twice:

   * the archiver's own record (``status_.lags_s``: seal time to the end of the PUT that
     carried the commit);
   * independently, from outside: a child process lists the target's newest WAL index
     prefixes every ``--poll-ms`` and notes when each object appears; a commit's lag is when
     the first object covering its position appeared, minus its seal time (an upper bound, by
     at most one poll plus one listing).

   Plus WAL objects and bytes uploaded, PUTs per second, PUT latency, upload throughput
   (bytes / time spent in PUTs), the write transactions' own latency (the spool write on
   every commit is in it) and the CPU of this process, the observer and moto during the load.
2. Restore: a database grown to ``--db-mb`` MB (bulk inserts into ``runs``, no archive yet),
   then both archives attached (the file one by ``start_archive()``, an S3 archiver beside it
   on the same stream), which snapshots; then ``--wal-tx`` more write transactions, so the
   restore replays WAL after the snapshot; once both spools are empty, ``restore()`` into a
   fresh dir from each target, timed whole (download, sha256 checks, WAL replay, PRAGMA
   integrity_check, fsyncs, trees) and broken down by phase. MB/s = restored database bytes /
   restore seconds. The restored database is checked against the source (row count, bytes).
   The archive's files and moto's objects are in the page cache (same machine, loopback).
3. Backups of that database: ``create_backup`` and ``verify_backup``, with the scrypt key
   derivation (n=2**17, r=8, p=1) timed separately and also included in verify's figure
   (verify starts from the passphrase, as ``vigocli backup verify`` does).

Targets from the issue: lag p99 <= 1.5 s at sync_interval_s=1; restore >= 100 MB/s from the
file target and >= 50 MB/s from S3 on loopback. Everything shares the machine's cores (and
disk) with whatever else runs there: the load average and CPU pressure are recorded with the
figures. The exit code says whether the benchmark ran,
not whether a target was met. Writes ``benchmarks/results/archive.json``.

    .venv/bin/python benchmarks/archive.py [--duration 30] [--rate 200] [--db-mb 200] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

# Runnable as a plain script from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import apsw

import vigo
from vigo.config import ServerConfig
from vigo.server import fleet
from vigo.server.partition import Partition
from vigo.snapshots import backup as backup_mod
from vigo.snapshots import layout
from vigo.snapshots import restore as restore_mod
from vigo.snapshots import targets as targets_mod
from vigo.snapshots.archiver import Archiver

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).parent / "results" / "archive.json"
TARGET_LAG_P99_S = 1.5
TARGET_RESTORE_FILE_MB_S = 100.0
TARGET_RESTORE_S3_MB_S = 50.0
SYNC_INTERVAL_S = 1.0
#: Envoys the load is spread over (rows in ``envoys``; each results message names one).
ENVOYS = 500
#: Resources per generated run report: ~3 KB packed, a typical small host.
REPORT_RESOURCES = 20
#: Reports per bulk-load transaction while the database grows (~10 MB each).
BULK_ROWS_PER_TX = 3000
BUCKET = "vigo-bench-archive"
#: How long to wait for an archiver's spool to drain before giving up, seconds.
DRAIN_TIMEOUT_S = 300.0
_S3_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.s3server import S3Server
server = S3Server(int(sys.argv[2]))
server.start()
print("ready", flush=True)
sys.stdin.read()  # the parent closes our stdin to stop us
server.stop()
"""


def log(message: str) -> None:
    print(f"[archive {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def dist(values: list[float], digits: int = 3) -> dict[str, Any]:
    """p50/p99/max/mean of ``values`` (seconds), rounded."""
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)
    return {"n": len(values), "p50": r(pct(values, 50)), "p99": r(pct(values, 99)),
            "max": r(max(values) if values else None), "mean": r(statistics.fmean(values) if values else None)}


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (this one if None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_load() -> dict[str, Any]:
    """Load average and CPU pressure (share of time some task waited for a CPU, last 10 s):
    other work on the machine shows up in every figure here."""
    out: dict[str, Any] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.suppress(OSError, IndexError, ValueError):
        some = Path("/proc/pressure/cpu").read_text().split("\n")[0]
        out["cpu_pressure_some_avg10_pct"] = float(some.split()[1].split("=")[1])
    return out


# --- the S3 server ------------------------------------------------------------------------------


class S3Service:
    """moto's S3 on loopback: in a child process (default) or in this one."""

    def __init__(self, in_process: bool) -> None:
        from tests.s3server import DUMMY_AWS_ENV, S3Server, free_port

        # boto3 must never see real credentials or config, whatever this shell holds.
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(DUMMY_AWS_ENV)
        self.in_process = in_process
        self.server = S3Server(free_port())
        self.proc: subprocess.Popen[str] | None = None

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url

    @property
    def pid(self) -> int | None:
        """The child's pid (None in process: its CPU is then this process's)."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if self.in_process:
            self.server.start()
            return
        self.proc = subprocess.Popen([sys.executable, "-c", _S3_CHILD, str(ROOT), str(self.server.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the moto S3 child process did not start (said {line!r}, exit {self.proc.poll()})")

    def stop(self) -> None:
        if self.in_process:
            self.server.stop()
            return
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()  # the child we started, by its own handle
            proc.wait(timeout=15)

    def create_bucket(self, name: str) -> None:
        self.server.create_bucket(name)


# --- instrumentation ----------------------------------------------------------------------------


class TimedTarget:
    """A target that delegates every call to the real one and records (op, key, bytes, seconds)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str, int, float]] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.inner.url

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def _timed(self, op: str, key: str, size: Callable[[], int]) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        with self._lock:
            self.calls.append((op, key, size(), seconds))

    def put(self, key: str, data: bytes, metadata: dict[str, str]) -> None:
        with self._timed("put", key, lambda: len(data)):
            self.inner.put(key, data, metadata)

    def put_file(self, key: str, path: Any, metadata: dict[str, str], progress: Any = None) -> None:
        with self._timed("put_file", key, lambda: os.path.getsize(path)):
            self.inner.put_file(key, path, metadata, progress)

    def get(self, key: str) -> bytes:
        out: list[bytes] = []
        with self._timed("get", key, lambda: len(out[0])):
            out.append(self.inner.get(key))
        return out[0]

    def get_file(self, key: str, path: Any, progress: Any = None) -> None:
        with self._timed("get_file", key, lambda: os.path.getsize(path)):
            self.inner.get_file(key, path, progress)

    def head(self, key: str) -> Any:
        with self._timed("head", key, lambda: 0):
            return self.inner.head(key)

    def list(self, prefix: str = "") -> Any:
        with self._timed("list", prefix, lambda: 0):
            return self.inner.list(prefix)

    def of(self, *ops: str) -> list[tuple[str, str, int, float]]:
        with self._lock:
            return [c for c in self.calls if c[0] in ops]


@contextlib.contextmanager
def timed_open_target() -> Iterator[list[TimedTarget]]:
    """While active, ``open_target`` hands out TimedTargets (start_archive imports it late)."""
    opened: list[TimedTarget] = []
    real = targets_mod.open_target

    def wrapper(*args: Any, **kwargs: Any) -> TimedTarget:
        opened.append(TimedTarget(real(*args, **kwargs)))
        return opened[-1]

    with mock.patch.object(targets_mod, "open_target", wrapper):
        yield opened


class CommitLog:
    """A stream consumer recording every commit's position and seal time (the archiver's clock)."""

    def __init__(self) -> None:
        self.commits: list[tuple[int, int, float]] = []  # (index, end offset, sealed at)
        self.recording = False

    def on_segment(self, seg: Any) -> None:
        if self.recording:
            self.commits.extend((seg.index, end, t) for end, _, t in seg.commits)

    def on_snapshot(self, snap: Any) -> None:
        pass

    def flush(self) -> None:
        pass


class Observer:
    """A child process (this script with ``--observe``) that lists the target's newest WAL index
    prefixes every ``poll_s`` and notes when each key first appeared. A process of its own, so
    its listing costs neither the primary's GIL nor its measurements; narrow prefixes, so each
    listing stays a few ms however many objects the archive holds."""

    def __init__(self, url: str, endpoint_url: str, prefix: str, first_index: int, poll_s: float) -> None:
        spec = {"url": url, "endpoint_url": endpoint_url or None, "prefix": prefix, "first_index": first_index,
                "poll_s": poll_s}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--observe", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the observer process did not start (said {line!r})")
        self.seen: dict[str, float] = {}
        self.list_s: list[float] = []

    def stop(self) -> None:
        """Ask the child for what it saw (it answers when its stdin closes)."""
        out, _ = self.proc.communicate(timeout=60)
        got = json.loads(out)
        self.seen, self.list_s = got["seen"], got["list_s"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait(timeout=15)

    def lags(self, commits: list[tuple[int, int, float]]) -> tuple[list[float], int]:
        """Per commit: when the first object covering it appeared, minus its seal time."""
        objects: dict[int, list[tuple[int, int, float]]] = {}
        for key, seen in self.seen.items():
            if (parsed := layout.parse_segment_key(key)) is not None:
                index, start, end = parsed
                objects.setdefault(index, []).append((start, end, seen))
        lags, missing = [], 0
        for index, end, sealed in commits:
            covering = [seen for start, stop, seen in objects.get(index, ()) if start < end <= stop]
            if covering:
                lags.append(min(covering) - sealed)
            else:
                missing += 1
        return lags, missing


def observe(raw: str) -> int:
    """The observer child: poll until stdin closes, then print {"seen", "list_s"} as JSON.

    WAL objects go up in order and an index never starts before the previous one is complete,
    so listing the current index and the next one sees every new object (an index lasts
    seconds: from one complete checkpoint to the next)."""
    spec = json.loads(raw)
    target = targets_mod.open_target(spec["url"], endpoint_url=spec["endpoint_url"])
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    seen: dict[str, float] = {}
    list_s: list[float] = []
    index = spec["first_index"]
    print("ready", flush=True)
    while not stop.is_set():
        for i in range(index, index + 2):
            t0 = time.time()
            keys = [o.key for o in target.list(f"{spec['prefix']}{i:08x}/")]
            now = time.time()
            list_s.append(now - t0)
            for key in keys:
                seen.setdefault(key, now)
            if keys:
                index = max(index, i)
        stop.wait(spec["poll_s"])
    print(json.dumps({"seen": seen, "list_s": list_s}))
    return 0


# --- load -------------------------------------------------------------------------------------


def make_report(rng: random.Random, envoy_id: str, started: float) -> dict[str, Any]:
    """A run report shaped like the engine's (vigo/agent/engine.py), ~3 KB packed."""
    resources, counts = [], {"ok": 0, "changed": 0, "failed": 0, "skipped": 0}
    for i in range(REPORT_RESOURCES):
        status = rng.choices(("ok", "changed", "failed", "skipped"), (85, 10, 2, 3))[0]
        counts[status] += 1
        entry: dict[str, Any] = {
            "id": f"file:/etc/app/conf.d/{i:03d}-{rng.getrandbits(32):08x}.conf", "type": "file",
            "policy": f"policy-{i % 5}", "status": status, "duration_s": round(rng.random() / 100, 6),
            "message": "" if status == "ok" else f"{status}: content {rng.getrandbits(64):016x}",
        }
        if status == "changed":
            entry["changes"] = ["content", "mode 0644 -> 0640"]
            entry["diff"] = "\n".join(f"-line {rng.getrandbits(48):012x}\n+line {rng.getrandbits(48):012x}" for _ in range(4))
        resources.append(entry)
    return {
        "kind": "run", "run_id": uuid.UUID(int=rng.getrandbits(128)).hex, "envoy_id": envoy_id,
        "started_at": started, "finished_at": started + 1.5, "duration_s": 1.5, "bundle_version": "v1-bench",
        "serial": 1, "term": 1, "noop": False, "offline": False, "traits_digest": f"{rng.getrandbits(128):032x}",
        "vigo_version": vigo.__version__, "counts": counts, "policy_errors": 0,
        "policies": [{"name": f"policy-{i}", "active": True} for i in range(5)], "resources": resources,
    }


def add_envoys(partition: Partition, count: int) -> list[str]:
    ids = [f"bench{i:05d}{uuid.uuid4().hex[:16]}" for i in range(count)]
    now = time.time()
    with partition.store.write() as db:
        for i, envoy_id in enumerate(ids):
            db.execute("INSERT INTO envoys(id, hostname, joined_at, traits) VALUES (?,?,?,?)",
                       (envoy_id, f"host-{i:05d}.bench", now, "{}"))
    return ids


class Load:
    """Results messages through ``handle_batch``, one per transaction, with a tick every second."""

    def __init__(self, partition: Partition, envoys: list[str], seed: int) -> None:
        self.partition, self.envoys = partition, envoys
        self.rng = random.Random(seed)
        self.tx_s: list[float] = []
        self.tick_s: list[float] = []
        self.report_bytes = 0
        self._ready: list[dict[str, Any]] = []

    def prepare(self, count: int) -> None:
        """Generate the reports up front: the load generator's CPU is not the primary's."""
        now = time.time()
        self._ready = [make_report(self.rng, self.rng.choice(self.envoys), now + i * 0.005) for i in range(count)]
        self.report_bytes = sum(len(json.dumps(r)) for r in self._ready)

    def one(self, report: dict[str, Any]) -> None:
        envoy_id = report["envoy_id"]
        t0 = time.perf_counter()
        answers = self.partition.handle_batch([{"type": "results", "envoy_id": envoy_id, "body": {"reports": [report]}}])
        self.tx_s.append(time.perf_counter() - t0)
        if "ok" not in answers[0]:
            raise RuntimeError(f"the primary refused a results message: {answers[0]}")

    def run(self, *, rate: float | None, seconds: float | None = None, count: int | None = None) -> dict[str, Any]:
        """At ``rate`` tx/s for ``seconds`` (late transactions catch up, never skipped), or
        ``count`` transactions as fast as possible."""
        total = count if count is not None else int(rate * seconds)
        if len(self._ready) != total:
            self.prepare(total)
        t0 = time.monotonic()
        next_tick = t0 + 1.0
        ticks = behind_max = 0.0
        for i in range(total):
            if rate:
                due = t0 + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                behind_max = max(behind_max, -delay)
            self.one(self._ready[i])
            if time.monotonic() >= next_tick:
                t1 = time.perf_counter()
                self.partition.tick()
                self.tick_s.append(time.perf_counter() - t1)
                ticks += 1
                next_tick += 1.0
        elapsed = time.monotonic() - t0
        return {"transactions": total, "seconds": round(elapsed, 3), "achieved_tx_per_s": round(total / elapsed, 1),
                "most_behind_schedule_s": round(behind_max, 3), "ticks": int(ticks)}


def wait_drained(archivers: dict[str, Archiver], what: str) -> dict[str, float]:
    """Seconds (from now) until each archiver's spool is empty."""
    t0 = time.monotonic()
    done: dict[str, float] = {}
    while len(done) < len(archivers):
        for name, archiver in archivers.items():
            if name not in done and archiver.status()["spool_files"] == 0:
                done[name] = time.monotonic() - t0
        if time.monotonic() - t0 > DRAIN_TIMEOUT_S:
            late = {n: (a.status()["spool_files"], a.status()["last_error"]) for n, a in archivers.items() if n not in done}
            raise RuntimeError(f"{what}: spools not empty after {DRAIN_TIMEOUT_S:.0f} s (items, last error): {late}")
        time.sleep(0.01)
    return done


def archive_url(kind: str, work: Path, name: str, s3: S3Service | None) -> tuple[str, str]:
    """(url, endpoint_url) of a fresh, empty archive location."""
    if kind == "file":
        root = work / f"{name}-archive"
        root.mkdir(parents=True)
        return root.as_uri(), ""
    assert s3 is not None
    return f"s3://{BUCKET}/{name}", s3.endpoint_url


# --- 1. lag ---------------------------------------------------------------------------------------


def lag_section(kind: str, args: argparse.Namespace, work: Path, s3: S3Service | None) -> dict[str, Any]:
    data_dir = work / f"lag-{kind}" / "data"
    cfg = ServerConfig.local(data_dir)
    cfg.archive.url, cfg.archive.endpoint_url = archive_url(kind, work, f"lag-{kind}", s3)
    cfg.archive.sync_interval_s = SYNC_INTERVAL_S
    partition = Partition(data_dir, cfg)
    try:
        envoys = add_envoys(partition, ENVOYS)
        with timed_open_target() as opened:
            partition.start_archive()
        archiver = partition.archiver
        assert archiver is not None
        target = opened[0]
        wait_drained({kind: archiver}, "first snapshot")
        gen = partition.store.stream.state.generation
        base = archiver.status()
        puts_before = len(target.calls)

        # The load, watched from outside by a second client of the same target.
        load = Load(partition, envoys, seed=1)
        load.prepare(int(args.rate * args.duration))
        commits = CommitLog()
        partition.store.stream.consumers.append(commits)
        observer = Observer(cfg.archive.url, cfg.archive.endpoint_url, layout.wal_prefix(cfg.partition, gen),
                            partition.store.stream.state.index, args.poll_ms / 1000)
        s3_pid = s3.pid if (kind == "s3" and s3 is not None) else None
        try:
            commits.recording = True
            log(f"lag/{kind}: {args.rate:g} tx/s for {args.duration:g} s")
            cpu0 = (cpu_s(), cpu_s(observer.proc.pid), cpu_s(s3_pid) if s3_pid else 0.0)
            ran = load.run(rate=args.rate, seconds=args.duration)
            cpu1 = (cpu_s(), cpu_s(observer.proc.pid), cpu_s(s3_pid) if s3_pid else 0.0)
            commits.recording = False
            drain_s = wait_drained({kind: archiver}, "after the load")[kind]
            time.sleep(2 * args.poll_ms / 1000 + 0.2)  # the observer's last listing sees the last object
            observer.stop()
        finally:
            observer.kill()

        # What the archiver recorded, what the listing saw, what the PUTs cost.
        st = archiver.status()
        recorded = list(archiver.status_.lags_s)
        listed, missing = observer.lags(commits.commits)
        puts = [c for c in target.calls[puts_before:] if c[0] in ("put", "put_file")]
        put_bytes, put_s = sum(c[2] for c in puts), sum(c[3] for c in puts)
        wal_bytes = st["bytes_uploaded"] - base["bytes_uploaded"]
        result = {
            "target": kind, "url": cfg.archive.url, "load": ran, "commits": len(commits.commits),
            "report_json_bytes_mean": round(load.report_bytes / max(1, len(load.tx_s))),
            "write_tx_s": dist(load.tx_s, 4),
            "tick_s": dist(load.tick_s, 4),
            "host_load_after": host_load(),
            # Share of one core during the load: this process (writer, archiver thread), the
            # observer child, the moto child (S3 only, when it runs in a child).
            "cpu_share_of_one_core": {name: round((b - a) / ran["seconds"], 2) for name, a, b in
                                      zip(("primary_process", "observer", "moto"), cpu0, cpu1, strict=True)},
            "lag_archiver_s": dist(recorded),
            "lag_archiver_note": None if len(recorded) < 10000 else "the archiver keeps the last 10000 commits only",
            "lag_listing_s": dist(listed),
            "lag_listing_missing_commits": missing,
            "listing_poll_s": args.poll_ms / 1000, "listing_call_s": dist(observer.list_s, 4),
            "drain_after_load_s": round(drain_s, 3),
            "objects_uploaded": st["objects_uploaded"] - base["objects_uploaded"],
            "wal_bytes_uploaded": wal_bytes,
            "wal_mb_per_s_shipped": round(wal_bytes / 1e6 / ran["seconds"], 2),
            "put_s": dist([c[3] for c in puts], 4),
            "put_mb_per_s_while_putting": round(put_bytes / 1e6 / put_s, 1) if put_s else None,
            "uploader_busy_fraction": round(put_s / ran["seconds"], 3),
        }
        log(f"lag/{kind}: archiver p50 {result['lag_archiver_s']['p50']} s p99 {result['lag_archiver_s']['p99']} s; "
            f"listing p99 {result['lag_listing_s']['p99']} s; {result['objects_uploaded']} objects, "
            f"{wal_bytes / 1e6:.1f} MB; achieved {ran['achieved_tx_per_s']} tx/s")
        return result
    finally:
        partition.close()


# --- 2. restore -----------------------------------------------------------------------------------


def grow(partition: Partition, envoys: list[str], db_bytes: int) -> dict[str, Any]:
    """Bulk-insert run reports in big transactions until the database file holds ``db_bytes``."""
    store = partition.store
    rng = random.Random(2)
    t0 = time.monotonic()
    rows = 0
    page_size = int(store.db.pragma("page_size"))
    while int(store.db.pragma("page_count")) * page_size < db_bytes:
        with store.write() as db:
            for _ in range(BULK_ROWS_PER_TX):
                envoy_id = rng.choice(envoys)
                fleet.store_reports(db, envoy_id, [make_report(rng, envoy_id, time.time() - rng.random() * 86400)],
                                    now=time.time())
        rows += BULK_ROWS_PER_TX
        store.checkpoint()
    store.checkpoint(force=True)
    size = int(store.db.pragma("page_count")) * page_size
    seconds = time.monotonic() - t0
    log(f"restore: database grown to {size / 1e6:.1f} MB ({rows} reports) in {seconds:.1f} s")
    return {"rows_inserted": rows, "seconds": round(seconds, 2), "database_bytes": size}


def content_of(conn: apsw.Connection) -> dict[str, int]:
    count, total = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(report)), 0) FROM runs").fetchone()
    envoys = conn.execute("SELECT COUNT(*) FROM envoys").fetchone()[0]
    return {"runs": count, "report_bytes": total, "envoys": envoys}


def timed_restore(kind: str, url: str, endpoint_url: str, dest: Path) -> dict[str, Any]:
    """``restore()`` with its phases timed (wrapping the module's own helpers while it runs)."""
    target = TimedTarget(targets_mod.open_target(url, endpoint_url=endpoint_url or None))
    phase: dict[str, float] = {}
    marks: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            marks.setdefault(f"{name}_start", time.perf_counter())
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phase[name] = phase.get(name, 0.0) + time.perf_counter() - t0
                marks[f"{name}_end"] = time.perf_counter()
        return inner

    class TimedApplier(restore_mod.Applier):
        install_snapshot = timed("install_snapshot", restore_mod.Applier.install_snapshot)
        accept = timed("apply_wal", restore_mod.Applier.accept)

    with contextlib.ExitStack() as stack:
        for attr, name in (("plan_restore", "plan"), ("_check_database", "integrity_check"), ("_materialise", "write_trees")):
            stack.enter_context(mock.patch.object(restore_mod, attr, timed(name, getattr(restore_mod, attr))))
        stack.enter_context(mock.patch.object(restore_mod, "Applier", TimedApplier))
        t0 = time.perf_counter()
        result = restore_mod.restore(url, dest, endpoint_url=endpoint_url or None, target=target,
                                     progress=lambda m: log(f"  restore/{kind}: {m}"))
        wall = time.perf_counter() - t0

    snap = target.of("get_file")
    wal = target.of("get")
    breakdown = {
        "plan_list_head": phase.get("plan", 0.0),
        "download_snapshot_sha256_fsync": sum(c[3] for c in snap),
        "install_snapshot_fsync": phase.get("install_snapshot", 0.0),
        # WAL objects download on a pool while earlier ones apply: the wall time of the phase.
        "wal_phase_wall": marks.get("integrity_check_start", 0.0) - marks.get("install_snapshot_end", 0.0),
        "apply_wal_cpu": phase.get("apply_wal", 0.0),
        "integrity_check": phase.get("integrity_check", 0.0),
        "write_trees": phase.get("write_trees", 0.0),
    }
    breakdown["other_fsync_rename"] = wall - sum(v for k, v in breakdown.items() if k != "apply_wal_cpu")
    size = result["database_bytes"]
    with contextlib.closing(apsw.Connection(str(dest / "state.db"))) as conn:
        content = content_of(conn)
    out = {
        "target": kind, "seconds": result["seconds"], "wall_s": round(wall, 3), "database_bytes": size,
        "mb_per_s": round(size / 1e6 / result["seconds"], 1), "mb_per_s_excluding_integrity_check":
            round(size / 1e6 / (result["seconds"] - breakdown["integrity_check"]), 1),
        "snapshot_bytes": sum(c[2] for c in snap), "wal_objects": result["wal_objects"],
        "wal_bytes_downloaded": sum(c[2] for c in wal), "breakdown_s": {k: round(v, 3) for k, v in breakdown.items()},
        "content": content,
    }
    log(f"restore/{kind}: {size / 1e6:.1f} MB in {result['seconds']:.2f} s = {out['mb_per_s']} MB/s "
        f"({', '.join(f'{k} {v:.2f}' for k, v in breakdown.items())})")
    return out


def backup_section(partition: Partition, work: Path) -> dict[str, Any]:
    passphrase = "correct horse battery staple, benchmark edition"
    out_dir = work / "backups"
    out_dir.mkdir()
    t0 = time.perf_counter()
    key = backup_mod.BackupKey.from_passphrase(passphrase)
    scrypt_s = time.perf_counter() - t0
    unit = out_dir / f"bench{backup_mod.SUFFIX}"
    t0 = time.perf_counter()
    created = backup_mod.create_backup(partition.store.db, unit, key, partition=partition.cfg.partition)
    create_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    verified = backup_mod.verify_backup(unit, passphrase)
    verify_s = time.perf_counter() - t0
    db_bytes = created["database_pages"] * int(partition.store.db.pragma("page_size"))
    result = {
        "kdf": key.kdf(), "scrypt_s": round(scrypt_s, 3),
        "create_s": round(create_s, 3), "create_plus_scrypt_s": round(create_s + scrypt_s, 3),
        "verify_s_scrypt_included": round(verify_s, 3),
        "database_bytes": db_bytes, "unit_bytes": created["size"], "entries": created["entries"],
        "create_mb_per_s": round(db_bytes / 1e6 / create_s, 1), "verify_mb_per_s": round(db_bytes / 1e6 / verify_s, 1),
        "verified_runs": verified["database"]["tables"].get("runs"),
    }
    log(f"backup: scrypt {scrypt_s:.2f} s, create {create_s:.2f} s, verify {verify_s:.2f} s "
        f"({created['size'] / 1e6:.1f} MB unit)")
    return result


def restore_section(args: argparse.Namespace, work: Path, s3: S3Service) -> dict[str, Any]:
    data_dir = work / "restore-src" / "data"
    cfg = ServerConfig.local(data_dir)
    cfg.archive.url, cfg.archive.endpoint_url = "", ""
    cfg.archive.sync_interval_s = SYNC_INTERVAL_S
    file_url, _ = archive_url("file", work, "restore-file", None)
    s3_url, endpoint = archive_url("s3", work, "restore-s3", s3)
    partition = Partition(data_dir, cfg)
    s3_archiver: Archiver | None = None
    try:
        envoys = add_envoys(partition, ENVOYS)
        grown = grow(partition, envoys, args.db_mb * 1_000_000)

        # Both archives on the one stream: the S3 archiver first, so start_archive's snapshot
        # reaches both; then the file archive exactly as the server attaches it.
        s3_target = TimedTarget(targets_mod.open_target(s3_url, endpoint_url=endpoint))
        s3_archiver = Archiver(s3_target, data_dir / "archive-spool-s3", partition=cfg.partition,
                               sync_interval_s=SYNC_INTERVAL_S)
        partition.store.stream.consumers.append(s3_archiver)
        s3_archiver.start()
        partition.cfg.archive.url = file_url
        t0 = time.perf_counter()
        with timed_open_target() as opened:
            partition.start_archive()
        snapshot_s = time.perf_counter() - t0
        file_archiver, file_target = partition.archiver, opened[0]
        assert file_archiver is not None
        snap_bytes = partition.store.stream.last_snapshot.size
        log(f"restore: snapshot of {snap_bytes / 1e6:.1f} MB taken in {snapshot_s:.2f} s; uploading")
        drained = wait_drained({"file": file_archiver, "s3": s3_archiver}, "snapshot")

        # WAL after the snapshot, then everything shipped.
        ran = Load(partition, envoys, seed=3).run(rate=None, count=args.wal_tx)
        log(f"restore: {args.wal_tx} write transactions after the snapshot in {ran['seconds']:.1f} s")
        wait_drained({"file": file_archiver, "s3": s3_archiver}, "WAL after the snapshot")
        uploads = {}
        for kind, target in (("file", file_target), ("s3", s3_target)):
            snap = target.of("put_file")
            segs = target.of("put")
            uploads[kind] = {
                "snapshot_put_s": round(sum(c[3] for c in snap), 3),
                "snapshot_put_mb_per_s": round(sum(c[2] for c in snap) / 1e6 / sum(c[3] for c in snap), 1) if snap else None,
                "snapshot_queued_to_uploaded_s": round(drained[kind], 3),
                "wal_objects": len([c for c in segs if "/wal/" in c[1]]),
                "wal_bytes": sum(c[2] for c in segs if "/wal/" in c[1]),
            }
        source = content_of(partition.store.db)
        db_file_bytes = (data_dir / "state.db").stat().st_size
        backups = backup_section(partition, work)
    finally:
        if s3_archiver is not None:
            s3_archiver.stop()
        partition.close()

    # Restores, one after the other, with nothing else running.
    restores = {}
    for kind, url, ep in (("file", file_url, ""), ("s3", s3_url, endpoint)):
        before = host_load()
        restores[kind] = timed_restore(kind, url, ep, work / f"restored-{kind}")
        restores[kind]["host_load_before"] = before
        restores[kind]["matches_source"] = restores[kind]["content"] == source
        shutil.rmtree(work / f"restored-{kind}", ignore_errors=True)
    return {"grow": grown, "source": {**source, "database_file_bytes": db_file_bytes}, "snapshot_bytes": snap_bytes,
            "snapshot_take_s": round(snapshot_s, 3), "wal_after_snapshot": ran, "uploads": uploads,
            "restore": restores, "backup": backups}


# --- report -------------------------------------------------------------------------------------


def figures(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure of the table: (name, value, unit, target text, met or None)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: Any, unit: str, target: str = "", met: bool | None = None) -> None:
        rows.append({"figure": name, "value": value, "unit": unit, "target": target, "met": met})

    for kind, lag in res["lag"].items():
        a, seen = lag["lag_archiver_s"], lag["lag_listing_s"]
        add(f"lag p50, {kind} (archiver)", a["p50"], "s")
        add(f"lag p99, {kind} (archiver)", a["p99"], "s", f"<= {TARGET_LAG_P99_S:g} s", a["p99"] is not None and a["p99"] <= TARGET_LAG_P99_S)
        add(f"lag max, {kind} (archiver)", a["max"], "s")
        add(f"lag p50, {kind} (listing)", seen["p50"], "s")
        add(f"lag p99, {kind} (listing)", seen["p99"], "s", f"<= {TARGET_LAG_P99_S:g} s",
            seen["p99"] is not None and seen["p99"] <= TARGET_LAG_P99_S and lag["lag_listing_missing_commits"] == 0)
        add(f"lag max, {kind} (listing)", seen["max"], "s")
        add(f"load achieved, {kind}", lag["load"]["achieved_tx_per_s"], "tx/s")
        add(f"write tx p99, {kind}", round(lag["write_tx_s"]["p99"] * 1000, 2), "ms")
        add(f"WAL objects / MB shipped, {kind}", f"{lag['objects_uploaded']} / {lag['wal_bytes_uploaded'] / 1e6:.1f}", "")
        add(f"WAL shipped, {kind}", lag["wal_mb_per_s_shipped"], "MB/s")
        add(f"PUTs per second, {kind}", round(lag["objects_uploaded"] / lag["load"]["seconds"], 1), "/s")
        add(f"uploader busy, {kind}", round(lag["uploader_busy_fraction"] * 100, 1), "%")
        cpu = lag["cpu_share_of_one_core"]
        add(f"CPU primary/observer/moto, {kind}",
            f"{cpu['primary_process']:.2f}/{cpu['observer']:.2f}/{cpu['moto']:.2f}" if kind == "s3"
            else f"{cpu['primary_process']:.2f}/{cpu['observer']:.2f}/-", "cores")
        add(f"PUT p50 / p99, {kind}", f"{lag['put_s']['p50'] * 1000:.1f} / {lag['put_s']['p99'] * 1000:.1f}", "ms")
        add(f"upload throughput while putting, {kind}", lag["put_mb_per_s_while_putting"], "MB/s")
    rs = res["restore"]
    for kind, up in rs["uploads"].items():
        add(f"snapshot upload ({rs['snapshot_bytes'] / 1e6:.0f} MB), {kind}", up["snapshot_put_mb_per_s"], "MB/s")
    for kind, target in (("file", TARGET_RESTORE_FILE_MB_S), ("s3", TARGET_RESTORE_S3_MB_S)):
        r = rs["restore"][kind]
        add(f"restore {r['database_bytes'] / 1e6:.0f} MB, {kind}", r["mb_per_s"], "MB/s", f">= {target:g} MB/s",
            r["mb_per_s"] >= target and r["matches_source"])
        add(f"restore seconds, {kind}", r["seconds"], "s")
        add(f"  of which integrity_check, {kind}", r["breakdown_s"]["integrity_check"], "s")
    b = rs["backup"]
    add("scrypt key derivation (n=2^17,r=8)", b["scrypt_s"], "s")
    add(f"backup create ({b['database_bytes'] / 1e6:.0f} MB), scrypt excluded", b["create_s"], "s")
    add("backup verify, scrypt included", b["verify_s_scrypt_included"], "s")
    return rows


def print_table(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"\narchive: {m['cpus']} cpus (loadavg {'/'.join(map(str, m['load_at_start']['loadavg']))} at start, "
          f"{'/'.join(map(str, m['load_at_end']['loadavg']))} at end), sync_interval_s {SYNC_INTERVAL_S:g}, "
          f"load {res['settings']['rate']:g} tx/s x {res['settings']['duration']:g} s, "
          f"S3 = moto on 127.0.0.1 ({res['settings']['s3']})")
    header = f"{'figure':46} {'value':>14} {'unit':5}  {'target':13} met"
    print(header)
    print("-" * len(header))
    for row in res["figures"]:
        met = "" if row["met"] is None else ("met" if row["met"] else "NOT met")
        value = "-" if row["value"] is None else row["value"]
        print(f"{row['figure']:46} {value!s:>14} {row['unit']:5}  {row['target']:13} {met}")
    for kind, r in res["restore"]["restore"].items():
        print(f"restore/{kind} breakdown (s): " + ", ".join(f"{k} {v}" for k, v in r["breakdown_s"].items())
              + f"; restored rows match the source: {r['matches_source']}")
    b = res["restore"]["backup"]
    print(f"backup: unit {b['unit_bytes'] / 1e6:.1f} MB, {b['entries']} entries; create {b['create_mb_per_s']} MB/s "
          f"(+ scrypt {b['scrypt_s']} s = {b['create_plus_scrypt_s']} s), verify {b['verify_mb_per_s']} MB/s "
          "(decrypt, sha256, integrity_check, trees cross-check; scrypt included)")
    missed = [r["figure"] for r in res["figures"] if r["met"] is False]
    print(f"targets: {'all met' if not missed else 'NOT met: ' + '; '.join(missed)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of steady load per target (lag)")
    parser.add_argument("--rate", type=float, default=200.0, help="write transactions per second (lag)")
    parser.add_argument("--db-mb", type=int, default=200, help="database size for restore and backup, MB (1e6 bytes)")
    parser.add_argument("--wal-tx", type=int, default=2000, help="write transactions after the snapshot (restore replays them)")
    parser.add_argument("--poll-ms", type=float, default=50.0, help="how often the observer lists the target")
    parser.add_argument("--s3-in-process", action="store_true",
                        help="run moto in this process (it then shares the GIL with the archiver and restore)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 s at 50 tx/s, 20 MB database, 200 WAL tx")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help="where the JSON results go")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and print where")
    parser.add_argument("--observe", metavar="SPEC", help=argparse.SUPPRESS)  # the observer child
    args = parser.parse_args()
    if args.observe:
        return observe(args.observe)
    if args.quick:
        args.duration, args.rate, args.db_mb, args.wal_tx = 5.0, 50.0, 20, 200
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    load_at_start = host_load()
    work = Path(tempfile.mkdtemp(prefix="vigo-archive-bench-"))
    s3 = S3Service(in_process=args.s3_in_process)
    try:
        s3.start()
        s3.create_bucket(BUCKET)
        log(f"work dir {work}; moto S3 at {s3.endpoint_url} ({'in process' if args.s3_in_process else 'child process'})")
        lag = {kind: lag_section(kind, args, work, s3) for kind in ("file", "s3")}
        restored = restore_section(args, work, s3)
    finally:
        s3.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "archive", "vigo": vigo.__version__, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "sqlite": apsw.sqlite_lib_version(), "load_at_start": load_at_start, "load_at_end": host_load()},
        "settings": {"duration": args.duration, "rate": args.rate, "db_mb": args.db_mb, "wal_tx": args.wal_tx,
                     "sync_interval_s": SYNC_INTERVAL_S, "poll_ms": args.poll_ms, "quick": args.quick,
                     "s3": "in process" if args.s3_in_process else "child process",
                     "report_resources": REPORT_RESOURCES, "envoys": ENVOYS},
        "targets": {"lag_p99_s": TARGET_LAG_P99_S, "restore_file_mb_per_s": TARGET_RESTORE_FILE_MB_S,
                    "restore_s3_mb_per_s": TARGET_RESTORE_S3_MB_S},
        "lag": lag,
        "restore": restored,
    }
    result["figures"] = figures(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
