"""A private dev server for integration tests: `vigocli server start --dev` on free ports with
its own data dir (so it never touches another Ray on the machine), and CLI runs against it.

    with dev_server(data_dir) as server:      # server["env"] points vigocli at it
        run("vigocli", "envoys", "list", env=server["env"])

It is stopped with `vigocli server stop --data-dir` at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: Any, check: int | None = 0, env: dict | None = None, stdin: str | None = None,
        timeout: float = 180, drop_env: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run one of the venv's commands; ``check`` is the exit code expected (None: any)."""
    environ = {k: v for k, v in os.environ.items() if k not in drop_env}
    proc = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True,
                          timeout=timeout, env={**environ, **(env or {})}, input=stdin)
    if check is not None:
        assert proc.returncode == check, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@contextmanager
def dev_server(data: Path, *extra: Any, env: dict | None = None, gateway_port: int | None = None) -> Iterator[dict]:
    """Start a dev server on ``data`` (``extra``: more `server start` options); yields its
    `--json` answer plus ``env`` (VIGO_ADDRESS for vigocli) and ``data``. Its web console
    listens on a free port too (its URL is the answer's ``console``)."""
    dash, ray_port, gw_port = free_port(), free_port(), gateway_port or free_port()
    env = {**(env or {}), "VIGO_ADDRESS": f"http://127.0.0.1:{dash}"}
    console = () if "--console-port" in map(str, extra) else ("--console-port", free_port())
    started = run("vigocli", "server", "start", "--dev", "--data-dir", data, "--dashboard-port", dash,
                  "--ray-port", ray_port, "--port", gw_port, *console, *extra, "--json", env=env, check=None)
    try:
        assert started.returncode == 0, started.stderr
        yield {**json.loads(started.stdout), "env": env, "data": data, "port": gw_port}
    finally:
        run("vigocli", "server", "stop", "--data-dir", data, env=env, check=None)
