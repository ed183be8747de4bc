"""exec: run a command, but only while its guards say the host still needs it.

An exec is the escape hatch for what no other resource type models, so it is idempotent only
through its guards: ``creates`` (a managed path the command produces), ``unless`` (a check that
exits 0 once the work is done) and ``onlyif`` (a check that exits 0 while the work is needed).
Here "read" is evaluating the guards and "change" is running the command.

Under ``--noop`` the guards are still evaluated, ``unless``/``onlyif`` included, as Puppet does:
they are meant to be read-only checks, and skipping them would make every guarded exec report
"would run" on every dry run, hiding the one that really would. A guard with side effects is a
bug in the policy, not something noop can protect against.

A ``refreshonly`` exec never runs from ``apply``; it runs from ``refresh`` when a resource that
lists it in ``notify`` changed (guards still apply). A plain exec has nothing to do on refresh:
it already had its chance in ``apply`` this run.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, ClassVar

from vigo.agent.resources.base import (
    CHANGED,
    FAILED,
    OK,
    CommandResult,
    Outcome,
    Resource,
    RunContext,
    run_command,
)
from vigo.errors import ResourceError

#: Characters of a command shown in a report message; the rest is elided.
SHOWN_COMMAND_CHARS = 200


class Exec(Resource):
    type: ClassVar[str] = "exec"

    def apply(self, ctx: RunContext) -> Outcome:
        if self.attrs.get("refreshonly"):
            return Outcome(OK, "refreshonly: not notified")
        return self._converge(ctx)

    def refresh(self, ctx: RunContext) -> Outcome | None:
        if not self.attrs.get("refreshonly"):
            return None
        return self._converge(ctx)

    def read(self, ctx: RunContext) -> str | None:
        """Evaluate the guards: why the command must not run (a message), or None to run it.

        Raises ResourceError when a guard cannot be evaluated (cwd missing, tool missing, guard
        timed out): an undecidable guard must not count as permission to run.
        """
        creates = self.attrs.get("creates")
        if creates and ctx.path(creates).exists():
            return f"skipped: creates {creates} exists"
        unless = self.attrs.get("unless")
        if unless is not None:
            result = self._guard("unless", unless, ctx)
            if result.ok:
                return f"skipped: unless `{_show(unless)}` exited 0"
        onlyif = self.attrs.get("onlyif")
        if onlyif is not None:
            result = self._guard("onlyif", onlyif, ctx)
            if not result.ok:
                return f"skipped: onlyif `{_show(onlyif)}` exited {result.returncode}"
        return None

    def _converge(self, ctx: RunContext) -> Outcome:
        command = self.attrs["command"]
        shown = _show(command)
        try:
            skip = self.read(ctx)
        except ResourceError as exc:
            return Outcome(FAILED, ctx.redact(str(exc)))
        if skip is not None:
            return Outcome(OK, ctx.redact(skip))
        if ctx.noop:
            return Outcome(CHANGED, ctx.redact(f"would run `{shown}`"), changes=["command"])

        try:
            result = self._run(command, ctx)
        except ResourceError as exc:
            return Outcome(FAILED, ctx.redact(str(exc)))
        if not result.ok:
            return Outcome(FAILED, ctx.redact(result.describe()))
        return Outcome(
            CHANGED,
            ctx.redact(f"ran `{shown}` (exit 0, {result.duration_s:.2f} s)"),
            changes=["command"],
        )

    def _guard(self, which: str, command: str | list[str], ctx: RunContext) -> CommandResult:
        result = self._run(command, ctx)
        if result.timed_out:
            # A hung check says nothing about the host; running the command anyway could
            # repeat work the check was there to prevent.
            raise ResourceError(f"guard {which} did not finish: {result.describe()}")
        return result

    def _run(self, command: str | list[str], ctx: RunContext) -> CommandResult:
        """Run the command or a guard with the resource's cwd, env and timeout."""
        cwd = self._cwd(ctx)
        try:
            return run_command(
                command,
                ctx,
                cwd=cwd,
                env=self.attrs.get("env") or None,
                timeout_s=self._timeout_s(),
                shell=isinstance(command, str),
                # Stdin at EOF: a command that prompts fails instead of hanging the run.
                input_text="",
            )
        except ResourceError:
            raise
        except OSError as exc:
            # Not executable, permission denied, ...: host trouble, reported, never raised.
            raise ResourceError(f"cannot run `{_show(command)}`: {exc.strerror or exc}") from exc

    def _cwd(self, ctx: RunContext) -> Path | None:
        managed = self.attrs.get("cwd")
        if managed is None:
            return None
        real = ctx.path(managed)
        if not real.is_dir():
            # Checked here because subprocess reports a missing cwd as a missing program.
            where = "" if str(real) == managed else f" (at {real})"
            raise ResourceError(f"cwd {managed} is not an existing directory{where}")
        return real

    def _timeout_s(self) -> float:
        return float(self.attrs.get("timeout") or 300)


def _show(command: Any) -> str:
    text = command if isinstance(command, str) else shlex.join(command)
    if len(text) > SHOWN_COMMAND_CHARS:
        text = text[: SHOWN_COMMAND_CHARS - 3] + "..."
    return text


RESOURCE = Exec
