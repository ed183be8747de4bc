"""How long interactive `vigocli` commands take, as an operator sees them: whole processes.

Every command runs in a fresh process (interpreter start, imports, the Ray dashboard query,
TLS to the gateway, the admin operation, output), timed from outside with
``time.perf_counter`` around the child, peak RSS from ``os.wait4``. One unmeasured warm-up run
per command (its time is kept as ``first``), then ``--repeat`` measured runs: median and max.

Commands: ``vigocli --help``, ``server status``, ``envoys list``, ``token create``,
``stack show``. Plus, in fresh interpreters:

* the import cost of the vigocli module set (``from vigo.cli.main import _app; _app()``, which
  imports every command group as ``vigocli`` does before dispatching), with the heaviest
  top-level imports from ``python -X importtime``;
* a phase split of one admin command (imports / dashboard query / TLS + admin operation).

Peak RSS comes from ``os.wait4``; on Linux a forked child starts from its parent's RSS, so
this process stays small (the joins that grow the roster run in a helper child).

The server is a private dev server (``vigocli server start --dev``) on non-default ports with its
own data dir, stopped at the end with ``vigocli server stop --data-dir`` (never ``ray stop``).
Fleet sizes (``--envoys``) are reached by real joins through the envoy's client code, so
``envoys list`` and ``server status`` are measured on small and large rosters.

Target from the issue (informative; the exit code does not depend on it): < 1.5 s per command,
imports included.

Writes ``benchmarks/results/cli_latency.json``.

    .venv/bin/python benchmarks/cli_latency.py [--repeat 5] [--envoys 100,10000]
        [--ray-port 6412 --dashboard-port 8292 --port 7712]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout, without installing vigo into the interpreter.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vigo

RESULTS_PATH = Path(__file__).parent / "results" / "cli_latency.json"
TARGET_S = 1.5
HOST = "127.0.0.1"  # all traffic stays on loopback
BIN = Path(sys.executable).parent
COMMAND_TIMEOUT_S = 60.0
#: Most joins one token allows (the server refuses more).
MAX_TOKEN_USES = 10_000

#: Label -> vigocli arguments ({address} is the dev server's dashboard URL).
COMMANDS: dict[str, list[str]] = {
    "vigocli --help": ["--help"],
    "vigocli server status": ["server", "status", "--address", "{address}"],
    "vigocli envoys list": ["envoys", "list", "--address", "{address}"],
    "vigocli token create": ["token", "create", "--note", "cli_latency", "--address", "{address}"],
    "vigocli stack show": ["stack", "show", "--address", "{address}"],
}
#: Commands whose cost grows with the roster; re-measured at every fleet size.
ROSTER_COMMANDS = ("vigocli server status", "vigocli envoys list")

PHASES_CODE = """
import json, sys, time
t0 = time.perf_counter()
from vigo.cli.main import _app
_app()
from vigo.cli import client
t1 = time.perf_counter()
token = client.cluster_token()
client.find_gateways(sys.argv[1], token)
t2 = time.perf_counter()
client.admin(sys.argv[1], sys.argv[2])
t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "dashboard_query_s": t2 - t1,
                  "admin_call_s": t3 - t2}))
"""


def log(message: str) -> None:
    print(f"[cli_latency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchmarkError(Exception):
    """The benchmark cannot go on: a command failed, the server did not start."""


# --------------------------------------------------------------------------------------------
# Measuring one process


@dataclass
class Proc:
    wall_s: float
    maxrss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run_measured(argv: list[str], *, timeout_s: float = COMMAND_TIMEOUT_S) -> Proc:
    """Run ``argv`` to completion: wall time, exit code, output and this child's peak RSS
    (``os.wait4`` reaps exactly this child). Killed after ``timeout_s`` (exit code then < 0)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        killer = threading.Timer(timeout_s, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Proc(wall, usage.ru_maxrss / 1024, proc.returncode,
                    out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def summary(samples: list[float]) -> dict[str, Any]:
    return {"raw": [round(s, 4) for s in samples], "median": round(statistics.median(samples), 4),
            "min": round(min(samples), 4), "max": round(max(samples), 4)}


def time_command(label: str, argv: list[str], repeat: int) -> dict[str, Any]:
    runs = []
    for i in range(repeat + 1):  # the first run is the warm-up
        proc = run_measured(argv)
        if proc.returncode != 0:
            raise BenchmarkError(f"{label} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        runs.append(proc)
        if i == 0:
            log(f"  {label}: first {proc.wall_s:.3f} s")
    measured = runs[1:]
    wall = summary([p.wall_s for p in measured])
    return {"argv": argv, "first_s": round(runs[0].wall_s, 4), "wall_s": wall,
            "maxrss_mb": round(max(p.maxrss_mb for p in measured), 1), "stdout_bytes": len(measured[-1].stdout),
            "target_s": TARGET_S, "met": wall["max"] < TARGET_S}


# --------------------------------------------------------------------------------------------
# Imports


def import_profile(repeat: int) -> dict[str, Any]:
    """Import cost of the vigocli module set in fresh interpreters, and its heaviest parts."""
    statement = "from vigo.cli.main import _app; _app()"
    code = f"import time\nt = time.perf_counter()\n{statement}\nprint(time.perf_counter() - t)"
    samples = []
    for _ in range(repeat):
        proc = run_measured([sys.executable, "-c", code])
        if proc.returncode != 0:
            raise BenchmarkError(f"import failed: {proc.stderr[-2000:]}")
        samples.append(float(proc.stdout.strip()))
    startup = [run_measured([sys.executable, "-c", "pass"]).wall_s for _ in range(repeat)]
    proc = run_measured([sys.executable, "-X", "importtime", "-c", statement])
    rows = []
    for line in proc.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            rows.append((len(match[3]), match[4], int(match[1]), int(match[2])))
    top_level = sorted((r for r in rows if r[0] == 1), key=lambda r: -r[3])
    heaviest_self = sorted(rows, key=lambda r: -r[2])
    return {
        "statement": statement,
        "import_s": summary(samples),
        "python_startup_s": summary(startup),
        "modules_imported": len(rows),
        "importtime_total_ms": round(sum(r[3] for r in rows if r[0] == 1) / 1000, 1),
        "top_level_cumulative_ms": [{"module": r[1], "ms": round(r[3] / 1000, 1)} for r in top_level[:15]],
        "top_self_ms": [{"module": r[1], "ms": round(r[2] / 1000, 1)} for r in heaviest_self[:15]],
        "ray_imported": any(r[1] == "ray" or r[1].startswith("ray.") for r in rows),
    }


def phases(address: str, op: str, repeat: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    for _ in range(repeat):
        proc = run_measured([sys.executable, "-c", PHASES_CODE, address, op])
        if proc.returncode != 0:
            raise BenchmarkError(f"phase split of {op} failed: {proc.stderr[-2000:]}")
        for name, value in json.loads(proc.stdout).items():
            samples.setdefault(name, []).append(value)
    return {name: summary(values) for name, values in samples.items()}


# --------------------------------------------------------------------------------------------
# The dev server and its roster


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def vigocli(args: list[str], *, timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    return subprocess.run([str(BIN / "vigocli"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def start_server(data_dir: Path, port: int, dashboard_port: int, ray_port: int) -> dict[str, Any]:
    busy = [p for p in (port, dashboard_port, ray_port) if not port_free(p)]
    if busy:
        raise BenchmarkError(f"port(s) {busy} already in use on {HOST}; pick others (--port/--dashboard-port/--ray-port)")
    log(f"starting a dev server: data dir {data_dir}, gateway :{port}, dashboard :{dashboard_port}, Ray GCS :{ray_port}")
    proc = vigocli(["server", "start", "--dev", "--data-dir", str(data_dir), "--port", str(port),
                    "--dashboard-port", str(dashboard_port), "--ray-port", str(ray_port), "--json"], timeout_s=300)
    if proc.returncode != 0:
        raise BenchmarkError(f"`vigocli server start --dev` failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout)


def stop_server(data_dir: Path) -> str | None:
    """Stop our dev head; returns its Ray temp dir. Without the head's marker nothing is stopped:
    `server stop` would fall back to ray.init("auto") and could reach another cluster."""
    marker = data_dir / "dev-head.json"
    if not marker.exists():
        return None
    temp_dir = json.loads(marker.read_text()).get("temp_dir")
    log(f"stopping the dev server (vigocli server stop --data-dir {data_dir})")
    try:
        proc = vigocli(["server", "stop", "--data-dir", str(data_dir)], timeout_s=120)
        if proc.returncode != 0:
            log(f"WARNING: `vigocli server stop` exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    except subprocess.TimeoutExpired:
        log("WARNING: `vigocli server stop` timed out")
    return temp_dir


async def join_envoys(gateway: str, token: str, count: int, first_index: int, concurrency: int = 32) -> int:
    """``count`` real joins (one anonymous TLS connection each; one key for every CSR)."""
    from vigo.agent.enrolment import make_envoy_key_and_csr
    from vigo.agent.traits import collect
    from vigo.agent.transport import EnvoyClient, anonymous_context

    _, csr_pem = make_envoy_key_and_csr("cli-latency-envoy")
    traits = collect(None)
    ctx = anonymous_context()
    indexes = iter(range(first_index, first_index + count))
    joined = 0

    async def worker() -> None:
        nonlocal joined
        for index in indexes:
            hostname = f"cli-bench-{index:05d}.example.net"
            async with asyncio.timeout(60):
                async with await EnvoyClient.open(gateway, ctx) as client:
                    await client.join(token, csr_pem, hostname, {**traits, "hostname": hostname})
            joined += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return joined


def grow_roster(info: dict[str, Any], address: str, current: int, wanted: int) -> int:
    if wanted <= current:
        return current
    log(f"joining {wanted - current} envoys (roster {current} -> {wanted}) ...")
    t0 = time.monotonic()
    joined = 0
    while current + joined < wanted:  # one token per MAX_TOKEN_USES joins (the server's cap)
        uses = min(MAX_TOKEN_USES, wanted - current - joined)
        proc = vigocli(["token", "create", "--uses", str(uses), "--ttl", "3600", "--json", "--address", address],
                       timeout_s=60)
        if proc.returncode != 0:
            raise BenchmarkError(f"`vigocli token create` failed: {proc.stderr[-800:]}")
        # In a child: this process stays small, so the peak RSS that os.wait4 reports for the
        # measured commands is theirs (a forked child starts with its parent's RSS on Linux).
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--join-helper", info["gateway"],
                               json.loads(proc.stdout)["token"], str(uses), str(current + joined)],
                              capture_output=True, text=True, timeout=max(120.0, uses / 20), check=False)
        if done.returncode != 0:
            raise BenchmarkError(f"joining envoys failed: {done.stderr[-2000:]}")
        joined += int(done.stdout.strip())
    log(f"  joined {joined} in {time.monotonic() - t0:.1f} s")
    return current + joined


# --------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    info = start_server(data_dir, args.port, args.dashboard_port, args.ray_port)
    address = f"http://{HOST}:{args.dashboard_port}"
    log(f"dev server up in {info['seconds']} s: dashboard {address}, gateway {info['gateway']}")
    vigocli_bin = str(BIN / "vigocli")

    def argv(label: str) -> list[str]:
        return [vigocli_bin, *(a.format(address=address) for a in COMMANDS[label])]

    log(f"import cost of the vigocli module set ({args.repeat} fresh interpreters) ...")
    imports = import_profile(args.repeat)

    roster = 0
    by_size: list[dict[str, Any]] = []
    for size in args.envoys:
        roster = grow_roster(info, address, roster, size)
        labels = list(COMMANDS) if not by_size else list(ROSTER_COMMANDS)
        log(f"timing {len(labels)} commands with {roster} envoys ({args.repeat} runs + 1 warm-up each) ...")
        commands = {label: time_command(label, argv(label), args.repeat) for label in labels}
        split = phases(address, "envoys.list", args.repeat)
        by_size.append({"envoys": roster, "commands": commands, "phases_envoys_list": split})
    return {"address": address, "imports": imports, "fleet_sizes": by_size}


def print_report(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"\nvigocli latency: whole processes, {res['settings']['repeat']} runs after 1 warm-up, "
          f"server on the same {m['cpus']}-cpu machine (load {'/'.join(map(str, m['loadavg_at_start']))} at start)")
    header = f"{'command':28} {'envoys':>6} {'median s':>9} {'max s':>7} {'min s':>7} {'first s':>8} {'RSS MB':>7}  target < {TARGET_S} s"
    print(header)
    print("-" * len(header))
    for size in res["fleet_sizes"]:
        for label, c in size["commands"].items():
            w = c["wall_s"]
            print(f"{label:28} {size['envoys']:>6} {w['median']:>9.3f} {w['max']:>7.3f} {w['min']:>7.3f} "
                  f"{c['first_s']:>8.3f} {c['maxrss_mb']:>7.1f}  {'met' if c['met'] else 'NOT met'}")
    imp = res["imports"]
    print(f"\nimports ({imp['statement']}): median {imp['import_s']['median']:.3f} s, max {imp['import_s']['max']:.3f} s, "
          f"{imp['modules_imported']} modules, Ray imported: {imp['ray_imported']}; "
          f"python startup alone {imp['python_startup_s']['median']:.3f} s")
    print("heaviest top-level imports (python -X importtime, cumulative):")
    for row in imp["top_level_cumulative_ms"][:6]:
        print(f"  {row['ms']:7.1f} ms  {row['module']}")
    print("heaviest single modules (self time):")
    for row in imp["top_self_ms"][:8]:
        print(f"  {row['ms']:7.1f} ms  {row['module']}")
    for size in res["fleet_sizes"]:
        p = size["phases_envoys_list"]
        print(f"envoys.list phases with {size['envoys']} envoys (medians): imports {p['imports_s']['median']:.3f} s, "
              f"dashboard query {p['dashboard_query_s']['median']:.3f} s, admin call (dashboard again + TLS + "
              f"operation) {p['admin_call_s']['median']:.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Time interactive vigocli commands as whole processes against a private dev server "
                    "(non-default ports, own data dir, stopped at the end; traffic stays on 127.0.0.1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="measured runs per command (after one warm-up)")
    parser.add_argument("--envoys", default="100,10000",
                        help="roster sizes, comma-separated, ascending: every command at the first, the "
                             "roster-dependent ones (server status, envoys list) again at each next")
    parser.add_argument("--port", type=int, default=7712, help="gateway port of the private dev server")
    parser.add_argument("--dashboard-port", type=int, default=8292, help="Ray dashboard port of the private dev server")
    parser.add_argument("--ray-port", type=int, default=6412, help="Ray GCS port of the private dev server")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and print where")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="where the JSON results go")
    parser.add_argument("--join-helper", nargs=4, metavar=("GATEWAY", "TOKEN", "COUNT", "FIRST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.join_helper:
        gateway, token, count, first = args.join_helper
        print(asyncio.run(join_envoys(gateway, token, int(count), int(first))))
        return 0
    try:
        args.envoys = [int(n) for n in args.envoys.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--envoys must be whole numbers separated by commas, got {args.envoys!r}")
    if not args.envoys or args.envoys != sorted(args.envoys) or args.envoys[0] < 0 or args.repeat < 1:
        parser.error("--envoys must be ascending and >= 0, --repeat >= 1")

    work = Path(tempfile.mkdtemp(prefix="vigo-cli-latency-", dir="/tmp"))
    data_dir = work / "data"
    started = time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    temp_dir = None
    try:
        res = run(args, data_dir)
    except (BenchmarkError, subprocess.TimeoutExpired) as exc:
        print(f"cli_latency: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        temp_dir = stop_server(data_dir)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            if temp_dir and Path(temp_dir).name.startswith("vigo-ray-"):
                with contextlib.suppress(OSError):
                    shutil.rmtree(temp_dir)  # this head's own Ray temp dir only

    res = {
        "benchmark": "cli_latency",
        "started_at": started,
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "the dev server (Ray head, dashboard, actors) runs on the same machine"},
        "vigo_version": vigo.__version__,
        "settings": {"repeat": args.repeat, "envoys": args.envoys},
        "target_s": TARGET_S,
        **res,
    }
    print_report(res)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
