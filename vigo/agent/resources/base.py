"""What every resource type shares: the run context, the outcome, and the read-then-change shape.

A resource first *reads* the host (``read``) into a small plain value, then *changes* it
(``change``) only if the read state differs from the desired one. Keeping the two apart is what
makes ``--noop`` honest (it runs ``read`` and the diff, never ``change``) and what makes each
resource idempotent: a second run reads the converged state and reports ``ok``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vigo.errors import ProviderMissingError, ResourceError

OK = "ok"
CHANGED = "changed"
FAILED = "failed"
SKIPPED = "skipped"
STATUSES = (OK, CHANGED, FAILED, SKIPPED)

#: Default wall-clock limit for a command a resource runs to read or change the host.
COMMAND_TIMEOUT_S = 300.0
#: Bytes of a command's output kept in a report message (the head and the tail).
OUTPUT_KEEP_BYTES = 2000


@dataclass
class RunContext:
    """Everything a resource may use besides its own attributes.

    ``root`` re-bases every managed path (``/etc/app.conf`` -> ``ROOT/etc/app.conf``) so tests,
    demos and benchmarks can run many envoys on one machine. ``redact`` hides secret values in
    anything that leaves the resource (messages, diffs).
    """

    root: Path | None = None
    noop: bool = False
    traits: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    #: Extra environment for commands (e.g. PATH in tests); merged over os.environ.
    env: dict[str, str] = field(default_factory=dict)
    _sorted_secrets: list[tuple[str, str]] | None = field(default=None, repr=False)

    def path(self, managed: str) -> Path:
        """The real location of a managed absolute path, under ``root`` when one is set."""
        if not managed.startswith("/"):
            raise ResourceError(f"managed path must be absolute, got {managed!r}")
        if self.root is None:
            return Path(managed)
        return self.root / managed.lstrip("/")

    def redact(self, text: str) -> str:
        """Replace every secret value in ``text`` with ``[redacted:NAME]``."""
        for name, value in self._redactions():
            if value in text:
                text = text.replace(value, f"[redacted:{name}]")
        return text

    def _redactions(self) -> list[tuple[str, str]]:
        # Longest first, so a secret that contains another is hidden whole. Sorted once per run.
        if self._sorted_secrets is None:
            self._sorted_secrets = sorted(
                ((n, v) for n, v in self.secrets.items() if v), key=lambda kv: -len(kv[1])
            )
        return self._sorted_secrets

    def command_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        if self.root is not None:
            env["VIGO_ROOT"] = str(self.root)
        if extra:
            env.update(extra)
        return env


@dataclass
class Outcome:
    """What one resource did in one run."""

    status: str
    message: str = ""
    diff: str | None = None
    #: Short names of what changed or would change ("content", "mode", "installed 1.2").
    changes: list[str] = field(default_factory=list)


class Resource:
    """Base of every resource type. Subclasses set ``type`` and implement ``apply``.

    ``attrs`` are already validated by the stack schema (vigo.policy.schema), so a resource
    trusts their types and fills defaults from the schema.
    """

    type: ClassVar[str] = ""

    def __init__(self, name: str, attrs: dict[str, Any]) -> None:
        self.name = name
        self.attrs = attrs

    @property
    def id(self) -> str:
        return f"{self.type}:{self.name}"

    def apply(self, ctx: RunContext) -> Outcome:
        """Converge the host towards the desired state (or, under ``ctx.noop``, only report)."""
        raise NotImplementedError(f"resource type {self.type!r} does not implement apply")

    def refresh(self, ctx: RunContext) -> Outcome | None:
        """React to a ``notify`` from a resource that changed. ``None``: nothing to do."""
        return None

    def __repr__(self) -> str:
        return f"<{self.id}>"


@dataclass
class CommandResult:
    argv: list[str] | str
    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    #: Killed by the timeout (its return code then reads 124, as coreutils' ``timeout``).
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One line for a report: what ran, how it ended, and the tail of its output."""
        shown = self.argv if isinstance(self.argv, str) else " ".join(self.argv)
        out = (self.stderr.strip() or self.stdout.strip())
        if len(out) > OUTPUT_KEEP_BYTES:
            half = OUTPUT_KEEP_BYTES // 2
            out = out[:half] + " ... " + out[-half:]
        tail = f": {out}" if out else ""
        return f"`{shown}` exited {self.returncode}{tail}"


def run_command(
    argv: list[str] | str,
    ctx: RunContext,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = COMMAND_TIMEOUT_S,
    shell: bool = False,
    input_text: str | None = None,
) -> CommandResult:
    """Run a command for a resource; never raises for a non-zero exit, only for a missing tool.

    A timeout kills the command and comes back as return code 124 (as coreutils' ``timeout``).
    """
    started = time.monotonic()
    try:
        # A session of its own, so a timeout kills the whole process group: `sh -c 'sleep 9'`
        # must not leave the sleep running after the resource was reported failed.
        proc = subprocess.Popen(
            argv,
            shell=shell,
            cwd=cwd,
            env=ctx.command_env(env),
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        tool = argv if isinstance(argv, str) else argv[0]
        raise ProviderMissingError(f"cannot run {tool!r}: not found on this host") from exc
    try:
        stdout, stderr = proc.communicate(input_text, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        return CommandResult(
            argv, 124, stdout or "", (stderr or "") + f"\n(killed after {timeout_s:g} s timeout)",
            time.monotonic() - started, timed_out=True,
        )
    except BaseException:
        _kill_group(proc)
        raise
    return CommandResult(argv, proc.returncode, stdout, stderr, time.monotonic() - started)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
