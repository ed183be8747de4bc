"""The envoy installs and runs without Ray: importing it, or asking for help, must not load Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "code",
    [
        "import vigo.agent",
        "import vigo.agent.cli, vigo.agent.runner, vigo.agent.engine, vigo.agent.cache, vigo.agent.traits",
        "import vigo.agent.cli as c, sys\ntry:\n    c.main(['--help'])\nexcept SystemExit:\n    pass",
        "import vigo.cli.stack, vigo.policy.bundle, vigo.policy.stack",
    ],
)
def test_no_ray_in_sys_modules(code):
    probe = code + "\nimport sys\nprint('RAY' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 'CLEAN')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "CLEAN"


def test_agent_code_never_mentions_ray_imports():
    from pathlib import Path

    import vigo.agent

    for path in Path(vigo.agent.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert "import ray" not in text and "from ray" not in text, path
