"""Envoys follow the topology: a gateway host cut under a fleet of envoy daemons, timed.

Runs tests/hosts/test_follow_topology.py (root: namespaced hosts, tests/hosts/netns.py) with a
fleet of envoy daemons (default 23, plus the test's daemon ``a``: 24) on one envoy host, each
with its own state dir, joined with ONE worker's gateway and learning the others from its
check-ins. A real `ray up` of cluster.yaml (head + 2 workers, a gateway on each). Figures:

* the worker's cable pulled: per daemon, seconds from the cut to being connected to another
  gateway, and to its first report acknowledged by another gateway (p50, p99, max);
* the envoys' own host cut off (every gateway gone), then healed: until every daemon is
  connected again with its queue flushed;
* the worker kept cut past Ray's death timeout, then healed: when its node (re)appeared (Ray's
  node start time) and from then to its gateway serving, with nobody deploying;
* reports made by the daemons against reports the server stored (lost = made - stored).

Targets (issue 19): p99 of cut -> first acknowledged report through another gateway <= 10 s;
gateway serving <= 10 s after its node is alive; 0 reports lost. The exit code says whether the
scenario ran, not whether a target was met. Writes benchmarks/results/topology.json. About 6-7
minutes.

    sudo .venv/bin/python benchmarks/topology.py [--fleet 23]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_PATH = Path(__file__).parent / "results" / "topology.json"
TIMINGS = Path(os.environ.get("VIGO_HOSTS_ROOT", "/var/tmp/vigo-hosts")) / "topology-timings.json"
ACKED = "gateway host cut -> first report acked by another gateway, s (p50, p99, max)"
BACK = "W's node (re)appeared -> its gateway serving, s"
MADE = "reports made / stored (lost = made - stored)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fleet", type=int, default=23, help="envoy daemons joined with one gateway (plus one more)")
    parser.add_argument("--pytest-args", default="", help="extra arguments for pytest")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/topology.py needs root (namespaced hosts); run it with sudo", file=sys.stderr)
        return 2
    TIMINGS.unlink(missing_ok=True)
    print(f"running tests/hosts/test_follow_topology.py with {args.fleet + 1} envoy daemons ...", file=sys.stderr)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "tests/hosts/test_follow_topology.py", "-q", "-p", "no:cacheprovider",
           "-x", *args.pytest_args.split()]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "VIGO_TOPOLOGY_FLEET": str(args.fleet)})
    wall = time.monotonic() - t0
    if not TIMINGS.exists():
        print(f"the host test wrote no timings ({TIMINGS}); exit {proc.returncode}", file=sys.stderr)
        return 1
    figures = json.loads(TIMINGS.read_text())
    checks = []
    if ACKED in figures:
        checks.append(("p99 cut -> first report acked elsewhere", figures[ACKED][1], "<= 10"))
    if BACK in figures:
        checks.append(("node alive -> its gateway serving", figures[BACK], "<= 10"))
    lost = figures[MADE][0] - figures[MADE][1] if MADE in figures else None

    print(f"\nnamespaced hosts: head + 2 workers, {args.fleet + 1} envoy daemons ({wall:.0f} s, tests exit "
          f"{proc.returncode})")
    for name, value in figures.items():
        print(f"  {name:<82} {value}")
    for name, value, target in checks:
        met = value <= float(target.split()[1])
        print(f"  target: {name:<74} {value:>7} {target}  {'met' if met else 'MISSED'}")
    if lost is not None:
        print(f"  target: {'reports lost (made - stored)':<74} {lost:>7} == 0  {'met' if lost == 0 else 'MISSED'}")

    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.node(),
        "cpus": os.cpu_count(), "envoy_daemons": args.fleet + 1, "tests_exit": proc.returncode,
        "wall_s": round(wall, 1), "figures": figures, "reports_lost": lost,
        "targets": {"p99 cut -> first report acked elsewhere, s": 10.0, "node alive -> gateway serving, s": 10.0,
                    "reports lost": 0},
    }, indent=2) + "\n")
    print(f"\nwritten {RESULTS_PATH}", file=sys.stderr)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
