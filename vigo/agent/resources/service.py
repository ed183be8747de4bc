"""service: a systemd unit running or stopped, enabled at boot or not.

Read is ``systemctl is-active`` / ``systemctl is-enabled`` (only the ones the policy asks
about); change is ``start``/``stop`` then ``enable``/``disable``, only for what differs. Under
``--noop`` the reads run and the report says "would start, enable". ``refresh`` (a notify from,
say, the unit's config file) restarts a service whose desired state is running, unless this
run's apply has just started it (the fresh process already reads the new configuration).

Hosts without a working systemd fail the resource with systemctl's own words rather than
pretending: a container often has the systemctl binary but no systemd as PID 1, and then
``is-active`` says "System has not been booted with systemd as init system (PID 1)".
"""

from __future__ import annotations

from typing import ClassVar

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
from vigo.errors import ProviderMissingError, ResourceError

#: Output by which systemctl says there is no systemd (or no bus) to talk to.
NO_SYSTEMD_MARKERS = ("has not been booted with systemd", "Failed to connect to bus")
#: is-enabled states that enable/disable cannot change (no [Install] section, generated from
#: a SysV script or fstab, or runtime-only). "enabled: true" accepts them (they exit 0);
#: "enabled: false" on them fails clearly instead of "disabling" forever.
FIXED_ENABLEMENT = frozenset({"static", "indirect", "generated", "transient"})
PAST = {"start": "started", "stop": "stopped", "enable": "enabled", "disable": "disabled"}


class Service(Resource):
    type: ClassVar[str] = "service"

    #: Set when this run's apply started (or, under noop, would start) the unit: a refresh
    #: right after would restart a process that already read the new configuration.
    _started = False

    def read(self, ctx: RunContext) -> dict[str, object]:
        """What systemd says, only where the policy asks; None where it is silent.

        ``{"running": bool | None, "enabled": bool | None, "unit_file_state": str | None}``,
        the last being systemctl's own word ("enabled", "disabled", "static", "masked", ...).
        """
        state: dict[str, object] = {"running": None, "enabled": None, "unit_file_state": None}
        if self.attrs.get("state") is not None:
            result = self._systemctl("is-active", ctx)
            # Exit 0 means active (or reloading); 3 with "inactive"/"failed"/... means not.
            if not result.ok and not result.stdout.strip():
                raise ResourceError(result.describe())
            state["running"] = result.ok
        if self.attrs.get("enabled") is not None:
            result = self._systemctl("is-enabled", ctx)
            word = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
            if word == "not-found" or (not word and "No such file" in result.stderr):
                raise ResourceError(f"systemd has no unit {self.name!r}: {result.describe()}")
            if not word:
                raise ResourceError(result.describe())
            # systemctl's exit status is the authority on "enabled" (static etc. exit 0).
            state["enabled"] = result.ok
            state["unit_file_state"] = word
        return state

    def apply(self, ctx: RunContext) -> Outcome:
        if self.name.startswith("-") or not self.name.strip():
            return Outcome(FAILED, ctx.redact(f"{self.name!r} is not a unit name"))
        try:
            current = self.read(ctx)
            actions = self._plan(current)
        except ProviderMissingError:
            return Outcome(FAILED, _MISSING)
        except ResourceError as exc:
            return Outcome(FAILED, ctx.redact(str(exc)))
        if not actions:
            return Outcome(OK, ctx.redact(self._describe(current)))
        self._started = "start" in actions
        if ctx.noop:
            return Outcome(CHANGED, ctx.redact("would " + ", ".join(actions)), changes=actions)

        done: list[str] = []
        for verb in actions:
            try:
                result = self._systemctl(verb, ctx)
            except ProviderMissingError:
                return Outcome(FAILED, _MISSING)
            except ResourceError as exc:
                return Outcome(FAILED, ctx.redact(_after(done, str(exc))))
            if not result.ok:
                return Outcome(FAILED, ctx.redact(_after(done, result.describe())))
            done.append(verb)
        return Outcome(CHANGED, ctx.redact(", ".join(PAST[v] for v in done)), changes=done)

    def refresh(self, ctx: RunContext) -> Outcome | None:
        # Only a service meant to run is restarted; restarting a stopped one would start it.
        if self.attrs.get("state") != "running" or self._started:
            return None
        if ctx.noop:
            return Outcome(CHANGED, "would restart", changes=["restart"])
        try:
            result = self._systemctl("restart", ctx)
        except ProviderMissingError:
            return Outcome(FAILED, _MISSING)
        except ResourceError as exc:
            return Outcome(FAILED, ctx.redact(str(exc)))
        if not result.ok:
            return Outcome(FAILED, ctx.redact(result.describe()))
        return Outcome(CHANGED, "restarted", changes=["restart"])

    def _plan(self, current: dict[str, object]) -> list[str]:
        """The systemctl verbs that take the unit from ``current`` to the desired state."""
        actions: list[str] = []
        state = self.attrs.get("state")
        if state == "running" and not current["running"]:
            actions.append("start")
        elif state == "stopped" and current["running"]:
            actions.append("stop")
        enabled = self.attrs.get("enabled")
        if enabled is not None and current["enabled"] is not None:
            if enabled and not current["enabled"]:
                actions.append("enable")
            elif not enabled and current["enabled"]:
                word = current["unit_file_state"]
                if word in FIXED_ENABLEMENT:
                    raise ResourceError(
                        f"cannot disable {self.name}: its unit file state is {word!r}, "
                        "which systemctl enable/disable does not change"
                    )
                actions.append("disable")
        return actions

    def _describe(self, current: dict[str, object]) -> str:
        parts = []
        if current["running"] is not None:
            parts.append("running" if current["running"] else "stopped")
        if current["unit_file_state"] is not None:
            parts.append(str(current["unit_file_state"]))
        return ", ".join(parts)

    def _systemctl(self, verb: str, ctx: RunContext) -> CommandResult:
        try:
            # Stdin at EOF: nothing may wait for a password prompt.
            result = run_command(["systemctl", verb, self.name], ctx, input_text="")
        except ResourceError:
            raise
        except OSError as exc:
            # systemctl present but not runnable (permissions, broken binary): host trouble.
            raise ResourceError(f"cannot run `systemctl {verb} {self.name}`: {exc}") from exc
        output = result.stdout + result.stderr
        if any(marker in output for marker in NO_SYSTEMD_MARKERS):
            said = next(
                line.strip()
                for line in output.splitlines()
                if any(marker in line for marker in NO_SYSTEMD_MARKERS)
            )
            raise ResourceError(
                f"systemd is not running on this host: `systemctl {verb} {self.name}` said: {said}"
            )
        return result


_MISSING = "service provider 'systemd' needs systemctl, which is not on this host"


def _after(done: list[str], message: str) -> str:
    # Say what already happened, so a half-converged service is not a mystery.
    return f"{message} (after: {', '.join(PAST[v] for v in done)})" if done else message


RESOURCE = Service
