"""How long an envoy run spends collecting traits, with and without custom sources.

Traits are collected at the start of every run, so their cost is on every run's critical path.
Two scenarios, each collected ROUNDS times after one warm-up (which pays the lazy imports):

* ``builtin_only``: no traits directory, only the built-in facts;
* ``custom_5_files``: a traits directory of 5 sources, two YAML, two JSON and one executable
  shell script, the mix an operator is likely to have. The script dominates: it costs a
  fork/exec of /bin/sh.

Prints mean/p50/p99 in milliseconds and writes them to ``benchmarks/results/traits_collect.json``.

    .venv/bin/python benchmarks/traits_collect.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Runnable as a plain script from a checkout, without installing vigo into the interpreter.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vigo.agent.traits import collect

RESULTS_PATH = Path(__file__).parent / "results" / "traits_collect.json"


def make_custom_dir(directory: Path) -> None:
    (directory / "10-role.yaml").write_text("role: web\ntier: frontend\nlabels: {team: core}\n")
    (directory / "20-site.yml").write_text("site: ams1\nracks: [r1, r2, r3]\nsince: 2024-05-01\n")
    (directory / "30-app.json").write_text('{"app": {"name": "shop", "replicas": 4}}')
    (directory / "40-owner.json").write_text('{"owner": "ops@example.com", "cost_center": 4711}')
    script = directory / "50-uptime"
    script.write_text("#!/bin/sh\necho '{\"custom_script\": true}'\n")
    script.chmod(0o755)


def measure(rounds: int, traits_dir: Path) -> dict[str, float]:
    collect(traits_dir)  # warm-up: lazy imports (yaml, subprocess, tempfile), page cache
    samples_ms = []
    for _ in range(rounds):
        start = time.perf_counter()
        traits = collect(traits_dir)
        samples_ms.append((time.perf_counter() - start) * 1000)
        if traits["trait_errors"]:
            raise SystemExit(f"unexpected trait errors: {traits['trait_errors']}")
    samples_ms.sort()
    return {
        "rounds": rounds,
        "mean_ms": round(statistics.fmean(samples_ms), 3),
        "p50_ms": round(samples_ms[len(samples_ms) // 2], 3),
        "p99_ms": round(samples_ms[min(len(samples_ms) - 1, int(len(samples_ms) * 0.99))], 3),
        "max_ms": round(samples_ms[-1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "absent"
        custom = Path(tmp) / "traits.d"
        custom.mkdir()
        make_custom_dir(custom)
        scenarios = {
            "builtin_only": measure(args.rounds, empty),
            "custom_5_files": measure(args.rounds, custom),
        }

    for name, figures in scenarios.items():
        print(
            f"{name:16} mean {figures['mean_ms']:7.3f} ms   p50 {figures['p50_ms']:7.3f} ms   "
            f"p99 {figures['p99_ms']:7.3f} ms   max {figures['max_ms']:7.3f} ms"
        )
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(
        json.dumps(
            {
                "benchmark": "traits_collect",
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "scenarios": scenarios,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
