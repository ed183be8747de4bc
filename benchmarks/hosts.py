"""Real hosts: `ray up` and host failures on namespaced hosts, timed.

Runs tests/hosts/test_ray_up.py (which needs root: it makes network, PID, mount and UTS
namespaces, see tests/hosts/netns.py) and reports the timings it records, next to the targets
of the real-hosts issue. The cluster is cluster.yaml as shipped (head + 2 workers, standbys on
both, synchronous), brought up with `ray up` over SSH from an operator host; an envoy daemon
runs every 2 s through every failure and the server's run count is audited at the end.

Figures (seconds unless named otherwise):

* time to a serving cluster from `ray up` (and from a second `ray up`);
* a worker's cable pulled: until the envoy daemon is on another gateway; healed: until its
  standby is in sync again;
* the head powered off and booted: `ray start --head` (cluster.yaml's command), power-on to
  `vigocli` answering, to an online check-in, to every gateway and standby back;
* the primary's host powered off: `vigocli server promote` as a process and the promotion
  inside control (``total_s`` of its answer), promote's return to an online check-in;
* reports: the daemon's runs against the server's stored runs (lost = made - stored).

Targets: promote -> serving <= 0.5 s (the promotion inside control), head restart with
persistence <= 30 s to vigocli answering, 0 acknowledged reports lost. The exit code says
whether the scenarios ran, not whether a target was met. Writes benchmarks/results/hosts.json.
About 4-6 minutes (3 more the first time, building the hosts' venvs).

    sudo .venv/bin/python benchmarks/hosts.py
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
RESULTS_PATH = Path(__file__).parent / "results" / "hosts.json"
TIMINGS = Path(os.environ.get("VIGO_HOSTS_ROOT", "/var/tmp/vigo-hosts")) / "ray-up-timings.json"

#: figure name (as the test records it) -> (target, how it compares)
TARGETS = {
    "primary host lost: promotion inside control (total_s)": (0.5, "<="),
    "head restart: power-on to vigocli answering": (30.0, "<="),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pytest-args", default="", help="extra arguments for pytest, e.g. '-k link_cut'")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/hosts.py needs root (namespaced hosts); run it with sudo", file=sys.stderr)
        return 2
    TIMINGS.unlink(missing_ok=True)
    print("running tests/hosts/test_ray_up.py (ray up, link cut, head loss, primary host loss) ...",
          file=sys.stderr)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "tests/hosts/test_ray_up.py", "-q", "-p", "no:cacheprovider", "-x",
           *args.pytest_args.split()]
    proc = subprocess.run(cmd, cwd=REPO)
    wall = time.monotonic() - t0
    if not TIMINGS.exists():
        print(f"the host tests wrote no timings ({TIMINGS}); exit {proc.returncode}", file=sys.stderr)
        return 1
    figures = json.loads(TIMINGS.read_text())
    made = figures.get("daemon runs made (+1 final run --once)")
    stored = figures.get("daemon runs stored by the server")
    lost = None if made is None or stored is None else made - stored

    print(f"\nnamespaced hosts: head + 2 workers, 1 operator, 2 envoys ({wall:.0f} s, tests exit {proc.returncode})")
    print(f"{'figure':<74} {'value':>8}  target")
    for name, value in figures.items():
        target = TARGETS.get(name)
        mark = ""
        if target is not None:
            limit, op = target
            met = value <= limit if op == "<=" else value >= limit
            mark = f"{op} {limit:g}  {'met' if met else 'MISSED'}"
        print(f"{name:<74} {value:>8}  {mark}")
    if lost is not None:
        print(f"{'acknowledged reports lost (daemon runs made - stored)':<74} {lost:>8}  == 0  "
              f"{'met' if lost == 0 else 'MISSED'}")

    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.node(),
        "cpus": os.cpu_count(), "tests_exit": proc.returncode, "wall_s": round(wall, 1),
        "figures": figures, "reports_lost": lost,
        "targets": {k: {"limit": v[0], "op": v[1]} for k, v in TARGETS.items()},
    }, indent=2) + "\n")
    print(f"\nwritten {RESULTS_PATH}", file=sys.stderr)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
