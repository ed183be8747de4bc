"""service resource: real missing-tool and no-systemd paths, state logic through a stand-in.

The container these tests run in has no systemd as PID 1, so a real ``systemctl start`` can only
fail. The state logic (running/stopped, enabled/disabled, refresh, noop, idempotence) is driven
through ``STANDIN``: a small shell script named ``systemctl``, put first on PATH via
``ctx.env``, that keeps each unit's state in files and answers like systemctl does
(``is-active``: "active" exit 0, else "inactive" exit 3; ``is-enabled``: "enabled" exit 0,
else "disabled" exit 1). It is a STAND-IN for systemctl, not systemd: it proves the resource's
read/compare/change logic and its parsing of systemctl's answers, nothing about systemd itself.
Every call is logged, so noop tests can prove no state-changing verb ran.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from vigo.agent.resources import resource_class
from vigo.agent.resources.base import CHANGED, FAILED, OK, RunContext
from vigo.agent.resources.service import Service
from vigo.policy.schema import validate_resource

STANDIN = r"""#!/bin/sh
# systemctl STAND-IN for tests (no systemd in the container). Unit state lives in files:
#   units/NAME/            the unit exists        units/NAME/active    it is running
#   units/NAME/enabled     enabled at boot        units/NAME/static    no [Install] section
#   units/NAME/broken      start/restart fail       units/NAME/masked    masked
#   not-booted             behave like systemctl on a host not booted with systemd
here=$(dirname "$0")
echo "$*" >> "$here/calls.log"
if [ -e "$here/not-booted" ]; then
    echo "System has not been booted with systemd as init system (PID 1). Can't operate." >&2
    echo "Failed to connect to bus: Host is down" >&2
    exit 1
fi
verb=$1
unit=${2%.service}
u="$here/units/$unit"
if [ ! -d "$u" ]; then
    case $verb in
        is-active) echo inactive; exit 3 ;;
        is-enabled)
            echo "Failed to get unit file state for $unit.service: No such file or directory" >&2
            exit 1 ;;
        *) echo "Failed to $verb $unit.service: Unit $unit.service not found." >&2; exit 5 ;;
    esac
fi
case $verb in
    is-active)
        if [ -e "$u/active" ]; then echo active; exit 0; fi
        echo inactive; exit 3 ;;
    is-enabled)
        if [ -e "$u/static" ]; then echo static; exit 0; fi
        if [ -e "$u/masked" ]; then echo masked; exit 1; fi
        if [ -e "$u/enabled" ]; then echo enabled; exit 0; fi
        echo disabled; exit 1 ;;
    start|restart)
        if [ -e "$u/broken" ]; then
            echo "Job for $unit.service failed because the control process exited with error code." >&2
            exit 1
        fi
        touch "$u/active"
        if [ "$verb" = restart ]; then echo x >> "$u/restarts"; fi ;;
    stop) rm -f "$u/active" ;;
    enable)
        if [ -e "$u/masked" ]; then
            echo "Failed to enable unit: Unit file /etc/systemd/system/$unit.service is masked." >&2
            exit 1
        fi
        touch "$u/enabled"
        echo "Created symlink /etc/systemd/system/multi-user.target.wants/$unit.service." >&2 ;;
    disable) rm -f "$u/enabled" ;;
    *) echo "Unknown command verb $verb." >&2; exit 1 ;;
esac
exit 0
"""

STATE_CHANGING = ("start", "stop", "restart", "enable", "disable")


class Standin:
    """The stand-in's folder: create units in given states, read them back, read the call log."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        script = folder / "systemctl"
        script.write_text(STANDIN)
        script.chmod(0o755)

    def unit(self, name: str, *flags: str) -> None:
        unit = self.folder / "units" / name
        unit.mkdir(parents=True)
        for flag in flags:
            (unit / flag).touch()

    def has(self, name: str, flag: str) -> bool:
        return (self.folder / "units" / name / flag).exists()

    def restarts(self, name: str) -> int:
        log = self.folder / "units" / name / "restarts"
        return len(log.read_text().splitlines()) if log.exists() else 0

    def calls(self) -> list[str]:
        log = self.folder / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def changing_calls(self) -> list[str]:
        return [c for c in self.calls() if c.split()[0] in STATE_CHANGING]


@pytest.fixture
def standin(tmp_path: Path) -> Standin:
    folder = tmp_path / "standin"
    folder.mkdir()
    return Standin(folder)


@pytest.fixture
def ctx(tmp_path: Path, standin: Standin) -> RunContext:
    path = f"{standin.folder}{os.pathsep}{os.environ.get('PATH', '')}"
    return RunContext(root=tmp_path / "root", env={"PATH": path})


def make(name: str = "web", **attrs: Any) -> Service:
    full = validate_resource("service", name, attrs, file="t.yaml", policy="t")
    return Service(name, full)


def test_registry_finds_service() -> None:
    assert resource_class("service") is Service


# --- real paths: no systemctl, no systemd ---------------------------------------------------


def test_missing_systemctl_fails_clearly(tmp_path: Path) -> None:
    ctx = RunContext(root=tmp_path, env={"PATH": str(tmp_path)})
    for resource in (make(state="running"), make(enabled=True)):
        out = resource.apply(ctx)
        assert out.status == FAILED
        assert (
            out.message == "service provider 'systemd' needs systemctl, which is not on this host"
        )
    refreshed = make(state="running").refresh(ctx)
    assert refreshed is not None and refreshed.status == FAILED


@pytest.mark.skipif(
    shutil.which("systemctl") is None or Path("/run/systemd/system").exists(),
    reason="needs a real systemctl on a host not booted with systemd (like this container)",
)
def test_real_systemctl_without_systemd_fails_with_its_words(tmp_path: Path) -> None:
    out = make("cron", state="running").apply(RunContext(root=tmp_path))
    assert out.status == FAILED
    assert out.message.startswith("systemd is not running on this host: `systemctl is-active cron`")
    assert "has not been booted with systemd" in out.message


def test_not_booted_standin_fails_with_systemctls_words(ctx: RunContext, standin: Standin) -> None:
    standin.unit("web")
    (standin.folder / "not-booted").touch()
    out = make(state="running").apply(ctx)
    assert out.status == FAILED
    assert "System has not been booted with systemd as init system (PID 1)" in out.message
    restart = make(state="running").refresh(ctx)
    assert restart is not None and restart.status == FAILED
    assert "has not been booted" in restart.message


# --- state logic, through the stand-in -------------------------------------------------------


def test_start_then_ok(ctx: RunContext, standin: Standin) -> None:
    standin.unit("web")
    out = make(state="running").apply(ctx)
    assert (out.status, out.message, out.changes) == (CHANGED, "started", ["start"])
    assert standin.has("web", "active")
    again = make(state="running").apply(ctx)
    assert (again.status, again.message) == (OK, "running")
    assert standin.changing_calls() == ["start web"]


def test_stop_then_ok(ctx: RunContext, standin: Standin) -> None:
    standin.unit("web", "active")
    out = make(state="stopped").apply(ctx)
    assert (out.status, out.message) == (CHANGED, "stopped")
    assert not standin.has("web", "active")
    assert make(state="stopped").apply(ctx).status == OK


def test_enable_and_disable(ctx: RunContext, standin: Standin) -> None:
    standin.unit("web")
    out = make(enabled=True).apply(ctx)
    assert (out.status, out.message) == (CHANGED, "enabled")
    assert standin.has("web", "enabled")
    assert make(enabled=True).apply(ctx).message == "enabled"

    out = make(enabled=False).apply(ctx)
    assert (out.status, out.message) == (CHANGED, "disabled")
    assert not standin.has("web", "enabled")
    assert (make(enabled=False).apply(ctx).status) == OK


def test_state_and_enablement_together(ctx: RunContext, standin: Standin) -> None:
    standin.unit("web")
    out = make(state="running", enabled=True).apply(ctx)
    assert (out.status, out.message, out.changes) == (
        CHANGED,
        "started, enabled",
        ["start", "enable"],
    )
    again = make(state="running", enabled=True).apply(ctx)
    assert (again.status, again.message) == (OK, "running, enabled")


def test_only_what_the_policy_says_is_read(ctx: RunContext, standin: Standin) -> None:
    standin.unit("web")
    make(enabled=True).apply(ctx)
    assert [c.split()[0] for c in standin.calls()] == ["is-enabled", "enable"]


def test_noop_reads_but_changes_nothing(tmp_path: Path, standin: Standin) -> None:
    standin.unit("web", "enabled")
    ctx = RunContext(
        root=tmp_path,
        noop=True,
        env={"PATH": f"{standin.folder}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    out = make(state="running", enabled=False).apply(ctx)
    assert (out.status, out.message) == (CHANGED, "would start, disable")
    assert out.changes == ["start", "disable"]
    restart = make(state="running").refresh(ctx)
    assert restart is not None and (restart.status, restart.message) == (CHANGED, "would restart")
    assert standin.changing_calls() == []
    assert standin.has("web", "enabled") and not standin.has("web", "active")


def test_refresh_restarts_a_running_service(ctx: RunContext, standin: Standin) -> None:
    standin.unit("web", "active")
    out = make(state="running").refresh(ctx)
    assert out is not None and (out.status, out.message) == (CHANGED, "restarted")
    assert standin.restarts("web") == 1


def test_refresh_after_a_start_in_the_same_run_does_not_restart(
    ctx: RunContext, standin: Standin
) -> None:
    # The engine applies, then refreshes, the same instance.
    standin.unit("web")
    resource = make(state="running")
    assert resource.apply(ctx).message == "started"
    assert resource.refresh(ctx) is None
    assert standin.changing_calls() == ["start web"]


def test_refresh_leaves_other_services_alone(ctx: RunContext, standin: Standin) -> None:
    standin.unit("web")
    assert make(state="stopped").refresh(ctx) is None
    assert make(enabled=True).refresh(ctx) is None
    assert standin.calls() == []


def test_failed_start_reports_systemctls_words(ctx: RunContext, standin: Standin) -> None:
    standin.unit("web", "broken")
    out = make(state="running", enabled=True).apply(ctx)
    assert out.status == FAILED
    assert out.message.startswith("`systemctl start web` exited 1: Job for web.service failed")
    assert not standin.has("web", "enabled")  # stopped at the first failure
    restart = make(state="running").refresh(ctx)
    assert restart is not None and restart.status == FAILED


def test_failure_after_a_change_says_what_already_happened(
    ctx: RunContext, standin: Standin
) -> None:
    # A running, masked unit: stopping works, enabling is refused.
    standin.unit("web", "active", "masked")
    out = make(state="stopped", enabled=True).apply(ctx)
    assert out.status == FAILED
    assert "is masked" in out.message
    assert out.message.endswith("(after: stopped)")
    assert not standin.has("web", "active")


def test_unknown_unit_fails(ctx: RunContext, standin: Standin) -> None:
    out = make("nosuch", enabled=True).apply(ctx)
    assert out.status == FAILED
    assert out.message.startswith("systemd has no unit 'nosuch'")
    start = make("nosuch", state="running").apply(ctx)
    assert start.status == FAILED
    assert "Unit nosuch.service not found" in start.message


def test_static_unit_cannot_be_disabled(ctx: RunContext, standin: Standin) -> None:
    standin.unit("helper", "static")
    assert make("helper", enabled=True).apply(ctx).status == OK
    out = make("helper", enabled=False).apply(ctx)
    assert out.status == FAILED
    assert "unit file state is 'static'" in out.message
    assert standin.changing_calls() == []


def test_option_like_name_is_refused(ctx: RunContext, standin: Standin) -> None:
    out = make("--now", state="running").apply(ctx)
    assert out.status == FAILED
    assert standin.calls() == []
