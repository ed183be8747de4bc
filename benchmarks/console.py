"""The web console at fleet scale: server time of the overview and the envoys list.

A real partition database in a temp dir holds ``--sizes`` generated envoys (each with a status
mix of converged, failed, pending, from-cache, offline and revoked, traits, a last run) and
``--runs-per-envoy`` stored run reports; the console's real aiohttp server serves it over TLS on
127.0.0.1 (tests/consoleharness.py: the console's ``Source`` calls the partition's admin
operations in this process, as the gateway's path to the primary does, without Ray's hop).

For each page, ``--repeat`` requests on one kept-alive HTTPS connection, logged in:

* server time: the console's ``Server-Timing`` header (request in to response ready: the admin
  operation on the database and the template or JSON rendering);
* time to first byte and full response, as the client sees them (loopback);
* bytes of the answer.

Pages: ``/`` and ``/api/overview`` (status counts: one aggregate query), ``/envoys`` first page,
the last page (deepest OFFSET), a status filter (``failed``) and a hostname filter, as HTML.

Targets from issue 16: overview <= 150 ms and envoys page <= 300 ms server time at 100,000
envoys. Prints a table; writes benchmarks/results/console.json. The exit code says whether the
benchmark ran, not whether a target was met.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.consoleharness import TOKEN, running_console

RESULTS_PATH = Path(__file__).parent / "results" / "console.json"
TARGETS_MS = {"overview": 150.0, "envoys": 300.0}


def generate(partition: Any, n: int, runs_per_envoy: int) -> float:
    """``n`` envoys with a realistic status mix, and their runs; returns seconds taken."""
    t0 = time.perf_counter()
    now = time.time()
    envoys, runs = [], []
    report = b"\x81\xa9resources\x90"  # a small packed report: {"resources": []}
    for i in range(n):
        envoy_id = uuid.UUID(int=i + 1).hex
        kind = i % 20
        last_seen = now - (10_000 if kind == 0 else 10)  # 5 % offline
        offline_runs = 1 if kind == 1 else 0  # 5 % enforcing from cache
        failed = 1 if kind in (2, 3) else 0  # 10 % failed
        serial = 1 if kind == 4 else 2  # 5 % pending (behind the current serial)
        revoked = now if i % 500 == 7 else None
        traits = json.dumps({"os": {"name": "debian" if i % 3 else "rhel", "version": "12"}, "cpus": 2 + i % 8,
                             "hostname": f"node-{i:06d}.example.net", "custom": {"roles": ["web"] if i % 2 else []}})
        last_run = json.dumps({"run_id": uuid.uuid4().hex, "started_at": now - 20, "duration_s": 0.4,
                               "bundle_version": "v2", "serial": serial, "term": 1, "offline": False,
                               "counts": {"ok": 18, "changed": 1, "failed": failed, "skipped": 1}})
        envoys.append((envoy_id, f"node-{i:06d}.example.net", now - 86400, revoked, traits, last_seen, 300.0, "v2",
                       serial, 1, i % 3, offline_runs, last_run))
        for r in range(runs_per_envoy):
            runs.append((uuid.uuid4().hex, envoy_id, "run", now - 300 * r, now - 300 * r + 1, now, "v2", serial, 1,
                         18, 1, failed, 1, report))
    store = partition.store
    with store.write() as db:
        db.executemany("INSERT INTO envoys(id, hostname, joined_at, revoked_at, traits, last_seen, interval_s, "
                       "bundle_version, serial, term, queue_depth, offline_runs, last_run) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", envoys)
        db.executemany("INSERT INTO runs(run_id, envoy_id, kind, started_at, finished_at, received_at, bundle_version, "
                       "serial, term, ok, changed, failed, skipped, report) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", runs)
        for serial in (1, 2):  # two pushes: serial 2 is current
            db.execute("INSERT INTO bundles(serial, version, term, pushed_at, summary, bundle) VALUES (?,?,?,?,?,?)",
                       (serial, f"v{serial}", 1, now - 3600 / serial, json.dumps({"policies": 3, "resources": 20}), b""))
    store.checkpoint()
    partition.stack.current_serial = lambda: 2
    return time.perf_counter() - t0


class Client:
    """One kept-alive HTTPS connection with the session cookie."""

    def __init__(self, console: Any) -> None:
        self.conn = http.client.HTTPSConnection("127.0.0.1", console.server.port, context=console.ssl_context(),
                                                timeout=120)
        self.conn.request("POST", "/login", body=urllib.parse.urlencode({"token": TOKEN}),
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        answer = self.conn.getresponse()
        answer.read()
        self.cookie = answer.getheader("Set-Cookie").split(";")[0]

    def get(self, path: str) -> dict[str, float]:
        t0 = time.perf_counter()
        self.conn.request("GET", path, headers={"Cookie": self.cookie})
        answer = self.conn.getresponse()
        t1 = time.perf_counter()
        body = answer.read()
        t2 = time.perf_counter()
        if answer.status != 200:
            raise RuntimeError(f"{path}: HTTP {answer.status}: {body[:300]!r}")
        server_ms = float(answer.getheader("Server-Timing").split("dur=")[1])
        return {"server_ms": server_ms, "ttfb_ms": (t1 - t0) * 1000, "full_ms": (t2 - t0) * 1000, "bytes": len(body)}


def pages(n: int) -> dict[str, str]:
    last = -(-n // 50)
    return {"overview": "/", "overview.json": "/api/overview", "envoys": "/envoys",
            "envoys.last_page": f"/envoys?page={last}", "envoys.failed": "/envoys?status=failed",
            "envoys.hostname": "/envoys?hostname=node-0999", "envoys.json": "/api/envoys"}


def summarise(samples: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {"bytes": samples[-1]["bytes"]}
    for key in ("server_ms", "ttfb_ms", "full_ms"):
        values = sorted(s[key] for s in samples)
        out[key + "_p50"] = round(statistics.median(values), 1)
        out[key + "_p95"] = round(values[min(len(values) - 1, int(0.95 * len(values)))], 1)
    return out


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vigo-console-bench-") as tmp, running_console(Path(tmp)) as console:
        print(f"[{n}] generating {n} envoys and {n * args.runs_per_envoy} runs ...", file=sys.stderr)
        generated_s = generate(console.partition, n, args.runs_per_envoy)
        client = Client(console)
        out: dict[str, Any] = {"envoys": n, "runs": n * args.runs_per_envoy, "generate_s": round(generated_s, 1),
                               "db_bytes": os.path.getsize(Path(tmp) / "state.db"), "pages": {}}
        for name, path in pages(n).items():
            client.get(path)  # warm: the page cache and the template
            samples = [client.get(path) for _ in range(args.repeat)]
            out["pages"][name] = {"path": path, **summarise(samples)}
            print(f"[{n}] {name:18} server p50 {out['pages'][name]['server_ms_p50']:7.1f} ms", file=sys.stderr)
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="fleet sizes (envoys), comma-separated")
    parser.add_argument("--runs-per-envoy", type=int, default=2, help="stored run reports per envoy")
    parser.add_argument("--repeat", type=int, default=20, help="requests per page")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="where the JSON results go")
    args = parser.parse_args()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    sizes = [run_size(int(n), args) for n in args.sizes.split(",")]
    res = {"benchmark": "console", "at": time.time(), "targets_server_ms": TARGETS_MS, "repeat": args.repeat,
           "sizes": sizes,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_at_start": load_at_start,
                       "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'envoys':>8} {'page':18} {'server p50':>11} {'p95':>8} {'ttfb p50':>9} {'full p50':>9} {'bytes':>8}")
    for size in sizes:
        for name, p in size["pages"].items():
            print(f"{size['envoys']:>8} {name:18} {p['server_ms_p50']:>9.1f}ms {p['server_ms_p95']:>6.1f}ms "
                  f"{p['ttfb_ms_p50']:>7.1f}ms {p['full_ms_p50']:>7.1f}ms {p['bytes']:>8}")
    print(f"targets (server time at 100,000 envoys): overview <= {TARGETS_MS['overview']:.0f} ms, "
          f"envoys page <= {TARGETS_MS['envoys']:.0f} ms; load {'/'.join(map(str, load_at_start))} at start, "
          f"{os.cpu_count()} cpus; written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
