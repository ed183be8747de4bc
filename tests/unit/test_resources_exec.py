"""exec resource against real shell commands in a temp root (no subprocess mocks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from vigo.agent.resources import resource_class
from vigo.agent.resources.base import CHANGED, FAILED, OK, RunContext
from vigo.agent.resources.exec import Exec
from vigo.policy.schema import validate_resource


def make(command: Any, **attrs: Any) -> Exec:
    """An Exec with schema-validated, default-filled attributes, as the engine would build it."""
    full = validate_resource(
        "exec", "test", {"command": command, **attrs}, file="t.yaml", policy="t"
    )
    return Exec("test", full)


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    return RunContext(root=tmp_path)


def test_registry_finds_exec() -> None:
    assert resource_class("exec") is Exec


def test_string_command_runs_through_the_shell(ctx: RunContext, tmp_path: Path) -> None:
    out = make('echo "$((1 + 2))" > "$VIGO_ROOT/out"').apply(ctx)
    assert out.status == CHANGED
    assert out.message.startswith('ran `echo "$((1 + 2))"')
    assert "(exit 0, " in out.message
    assert (tmp_path / "out").read_text() == "3\n"


def test_list_command_runs_as_argv_without_a_shell(ctx: RunContext, tmp_path: Path) -> None:
    target = tmp_path / "a file; not a command"
    out = make(["touch", str(target)]).apply(ctx)
    assert out.status == CHANGED
    assert target.exists()


def test_creates_makes_a_command_idempotent(ctx: RunContext, tmp_path: Path) -> None:
    resource = make('echo run >> "$VIGO_ROOT/log"; touch "$VIGO_ROOT/done"', creates="/done")
    assert resource.apply(ctx).status == CHANGED
    second = resource.apply(ctx)
    assert second.status == OK
    assert second.message == "skipped: creates /done exists"
    assert (tmp_path / "log").read_text() == "run\n"


def test_unless_exit_0_skips(ctx: RunContext, tmp_path: Path) -> None:
    out = make('touch "$VIGO_ROOT/ran"', unless="true").apply(ctx)
    assert out.status == OK
    assert out.message == "skipped: unless `true` exited 0"
    assert not (tmp_path / "ran").exists()


def test_unless_nonzero_runs(ctx: RunContext, tmp_path: Path) -> None:
    out = make('touch "$VIGO_ROOT/ran"', unless=["false"]).apply(ctx)
    assert out.status == CHANGED
    assert (tmp_path / "ran").exists()


def test_onlyif_nonzero_skips(ctx: RunContext, tmp_path: Path) -> None:
    out = make('touch "$VIGO_ROOT/ran"', onlyif="exit 3").apply(ctx)
    assert out.status == OK
    assert out.message == "skipped: onlyif `exit 3` exited 3"
    assert not (tmp_path / "ran").exists()


def test_onlyif_exit_0_runs(ctx: RunContext, tmp_path: Path) -> None:
    out = make('touch "$VIGO_ROOT/ran"', onlyif='test -d "$VIGO_ROOT"').apply(ctx)
    assert out.status == CHANGED
    assert (tmp_path / "ran").exists()


def test_cwd_is_a_managed_path(ctx: RunContext, tmp_path: Path) -> None:
    (tmp_path / "srv" / "app").mkdir(parents=True)
    out = make("pwd > here", cwd="/srv/app").apply(ctx)
    assert out.status == CHANGED
    assert (tmp_path / "srv" / "app" / "here").read_text().strip() == str(tmp_path / "srv" / "app")


def test_missing_cwd_fails_clearly(ctx: RunContext) -> None:
    out = make("true", cwd="/nowhere").apply(ctx)
    assert out.status == FAILED
    assert "cwd /nowhere is not an existing directory" in out.message


def test_env_is_merged_into_the_command_environment(ctx: RunContext, tmp_path: Path) -> None:
    out = make('echo "$GREETING $HOME" > "$VIGO_ROOT/env"', env={"GREETING": "hello"}).apply(ctx)
    assert out.status == CHANGED
    greeting, home = (tmp_path / "env").read_text().split()
    assert greeting == "hello"
    assert home  # the envoy's own environment is still there


def test_guards_see_the_same_env(ctx: RunContext, tmp_path: Path) -> None:
    out = make('touch "$VIGO_ROOT/ran"', unless='[ "$MODE" = done ]', env={"MODE": "done"}).apply(
        ctx
    )
    assert out.status == OK


def test_timeout_kills_the_command_and_fails(ctx: RunContext) -> None:
    started = time.monotonic()
    out = make("sleep 5", timeout=0.5).apply(ctx)
    assert time.monotonic() - started < 3
    assert out.status == FAILED
    assert "exited 124" in out.message
    assert "timeout" in out.message


def test_guard_that_times_out_fails_instead_of_running(ctx: RunContext, tmp_path: Path) -> None:
    out = make('touch "$VIGO_ROOT/ran"', unless="sleep 5", timeout=0.5).apply(ctx)
    assert out.status == FAILED
    assert out.message.startswith("guard unless did not finish")
    assert not (tmp_path / "ran").exists()


def test_nonzero_exit_fails_with_the_output(ctx: RunContext) -> None:
    out = make("echo broken pipe >&2; exit 7").apply(ctx)
    assert out.status == FAILED
    assert "exited 7" in out.message
    assert "broken pipe" in out.message


def test_missing_program_fails_without_raising(ctx: RunContext) -> None:
    out = make(["vigo-no-such-program", "--flag"]).apply(ctx)
    assert out.status == FAILED
    assert "vigo-no-such-program" in out.message


def test_stdin_is_closed_so_a_prompt_cannot_hang(ctx: RunContext) -> None:
    out = make("read answer", timeout=5).apply(ctx)
    # `read` hits EOF at once and exits non-zero: failed quickly, not killed by the timeout.
    assert out.status == FAILED
    assert "exited 1" in out.message


def test_noop_reports_and_changes_nothing(tmp_path: Path) -> None:
    ctx = RunContext(root=tmp_path, noop=True)
    out = make('touch "$VIGO_ROOT/ran"').apply(ctx)
    assert out.status == CHANGED
    assert out.message == 'would run `touch "$VIGO_ROOT/ran"`'
    assert not (tmp_path / "ran").exists()


def test_noop_still_evaluates_guards(tmp_path: Path) -> None:
    (tmp_path / "done").touch()
    ctx = RunContext(root=tmp_path, noop=True)
    assert make("true", creates="/done").apply(ctx).status == OK
    assert make("true", unless="true").apply(ctx).status == OK
    assert make("true", onlyif="false").apply(ctx).status == OK
    assert make("true", onlyif="true").apply(ctx).message == "would run `true`"


def test_refreshonly_waits_for_a_notify(ctx: RunContext, tmp_path: Path) -> None:
    resource = make('echo x >> "$VIGO_ROOT/log"', refreshonly=True)
    out = resource.apply(ctx)
    assert (out.status, out.message) == (OK, "refreshonly: not notified")
    assert not (tmp_path / "log").exists()

    refreshed = resource.refresh(ctx)
    assert refreshed is not None and refreshed.status == CHANGED
    assert (tmp_path / "log").read_text() == "x\n"


def test_refreshonly_respects_guards_and_noop(tmp_path: Path) -> None:
    resource = make('touch "$VIGO_ROOT/ran"', refreshonly=True, onlyif="false")
    out = resource.refresh(RunContext(root=tmp_path))
    assert out is not None and out.status == OK
    noop = make('touch "$VIGO_ROOT/ran"', refreshonly=True).refresh(
        RunContext(root=tmp_path, noop=True)
    )
    assert noop is not None and noop.message.startswith("would run")
    assert not (tmp_path / "ran").exists()


def test_plain_exec_has_nothing_to_do_on_refresh(ctx: RunContext, tmp_path: Path) -> None:
    assert make('touch "$VIGO_ROOT/ran"').refresh(ctx) is None
    assert not (tmp_path / "ran").exists()


def test_secrets_are_redacted_from_messages(tmp_path: Path) -> None:
    ctx = RunContext(root=tmp_path, secrets={"token": "s3cr3t-value"})
    ok = make("echo s3cr3t-value > /dev/null").apply(ctx)
    assert "s3cr3t-value" not in ok.message and "[redacted:token]" in ok.message
    failed = make("echo leaked s3cr3t-value >&2; exit 1").apply(ctx)
    assert failed.status == FAILED
    assert "s3cr3t-value" not in failed.message
