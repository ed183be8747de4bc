"""The two command lines as an operator types them: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_STACK, write_stack

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def cli(*args, check=None, env=None):
    proc = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


@pytest.fixture
def signed(tmp_path):
    cli("vigocli", "stack", "keygen", "--out", tmp_path / "k", check=0)
    (tmp_path / "secrets.yaml").write_text("api_token: cli-test-token\n")
    (tmp_path / "traits.d").mkdir()
    (tmp_path / "traits.d/roles.yaml").write_text("roles: [web]\n")
    return tmp_path


def test_help_pages_and_version():
    for args in (["vigo-envoy", "--help"], ["vigo-envoy", "apply", "--help"], ["vigocli", "--help"],
                 ["vigocli", "stack", "build", "--help"]):
        out = cli(*args, check=0).stdout
        assert "usage" in out.lower()
    assert cli("vigo-envoy", "apply", "--help").stdout.count("--noop") >= 1
    assert "vigo-envoy 0." in cli("vigo-envoy", "--version", check=0).stdout


def test_usage_error_exit_code_is_not_a_resource_failure():
    proc = cli("vigo-envoy", "apply", "--bogus")
    assert proc.returncode == 64 and "unrecognized arguments" in proc.stderr


def test_build_and_apply_example(signed):
    t = signed
    out = cli("vigocli", "stack", "build", EXAMPLE_STACK, "--signing-key", t / "k", "--out", t / "b",
              "--secrets", t / "secrets.yaml", "--json", check=0)
    info = json.loads(out.stdout)
    assert info["resources"] == 9 and info["secrets"] == ["api_token"] and info["serial"] > 0
    run = cli("vigo-envoy", "apply", "--bundle", t / "b", "--trust", t / "k.pub", "--root", t / "root",
              "--state-dir", t / "state", "--traits-dir", t / "traits.d", "--json", check=0)
    report = json.loads(run.stdout)
    assert report["bundle_version"] == info["version"] and report["counts"]["failed"] == 0
    assert {r["id"] for r in report["resources"]} >= {"file:/etc/vigo-demo/motd", "exec:reload-site"}
    assert "cli-test-token" in (t / "root/etc/vigo-demo/site/app.conf").read_text()
    # noop after convergence: nothing would change
    noop = json.loads(cli("vigo-envoy", "apply", "--noop", "--root", t / "root", "--state-dir", t / "state",
                          "--traits-dir", t / "traits.d", "--json", check=0).stdout)
    assert noop["counts"]["changed"] == 0 and noop["noop"] is True


def test_rebuild_serial_grows(signed):
    t = signed
    args = ("vigocli", "stack", "build", EXAMPLE_STACK, "--signing-key", t / "k", "--out", t / "b",
            "--secrets", t / "secrets.yaml", "--json")
    first = json.loads(cli(*args, check=0).stdout)["serial"]
    second = json.loads(cli(*args, check=0).stdout)["serial"]
    assert second > first


def test_build_errors_are_one_line_no_traceback(signed, tmp_path):
    t = signed
    bad = write_stack(tmp_path / "bad", {"p.yaml": {"resources": [{"file": "/x", "source": "../../etc/passwd"}]}})
    proc = cli("vigocli", "stack", "build", bad, "--signing-key", t / "k", "--out", t / "x")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "p.yaml: policy 'p': resource 'file:/x': source path leaves its folder" in proc.stderr
    proc = cli("vigocli", "stack", "build", EXAMPLE_STACK, "--signing-key", t / "k", "--out", t / "x")
    assert proc.returncode == 1 and "secret 'api_token' is referenced but not provided" in proc.stderr
    proc = cli("vigocli", "stack", "build", EXAMPLE_STACK, "--signing-key", t / "nope", "--out", t / "x")
    assert proc.returncode == 1 and "cannot read signing key" in proc.stderr
    assert not (t / "x").exists()


def test_check_command(signed):
    out = cli("vigocli", "stack", "check", EXAMPLE_STACK, "--json", check=0)
    assert json.loads(out.stdout)["policies"] == 3


def test_traits_json(signed):
    data = json.loads(cli("vigo-envoy", "traits", "--json", "--traits-dir", signed / "traits.d", check=0).stdout)
    assert data["custom"]["roles"] == ["web"] and data["cpus"] >= 1 and "family" in data["os"]


def test_apply_without_trust_or_bundle_says_what_to_do(tmp_path):
    proc = cli("vigo-envoy", "apply", "--state-dir", tmp_path / "s")
    assert proc.returncode == 1 and "--trust" in proc.stderr and "Traceback" not in proc.stderr
