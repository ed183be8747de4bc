"""package resource against real package managers (no subprocess mocks).

- apt: only the read path on this Debian host, and noop. Nothing is ever installed or removed.
- pip: end to end in a throwaway venv, from two hand-built wheels in a local folder. pip's own
  environment variables (PIP_NO_INDEX, PIP_FIND_LINKS) pass through ``ctx.env``, which is also
  how an operator points the provider at a private index.
- missing tools: an empty PATH, so the provider's tool is not found on this host.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from vigo.agent.resources import resource_class
from vigo.agent.resources.base import CHANGED, FAILED, OK, RunContext
from vigo.agent.resources.package import Package
from vigo.policy.schema import validate_resource

DEBIAN = {"os": {"family": "debian", "name": "debian", "version": "12"}}
WHEEL_NAME = "vigo_test_pkg"


def make(name: str, **attrs: Any) -> Package:
    full = validate_resource("package", name, attrs, file="t.yaml", policy="t")
    return Package(name, full)


def test_registry_finds_package() -> None:
    assert resource_class("package") is Package


# --- apt: read path only -------------------------------------------------------------------

needs_dpkg = pytest.mark.skipif(
    shutil.which("dpkg-query") is None, reason="needs a Debian host (dpkg-query)"
)


def _dpkg_version(name: str) -> str:
    return subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, check=True
    ).stdout


@needs_dpkg
def test_apt_installed_package_is_ok(tmp_path: Path) -> None:
    out = make("coreutils").apply(RunContext(root=tmp_path, traits=DEBIAN))
    assert out.status == OK
    assert out.message == f"coreutils {_dpkg_version('coreutils')} is installed"


@needs_dpkg
def test_apt_installed_at_the_wanted_version_is_ok(tmp_path: Path) -> None:
    version = _dpkg_version("coreutils")
    out = make("coreutils", version=version).apply(RunContext(root=tmp_path, traits=DEBIAN))
    assert out.status == OK


@needs_dpkg
def test_apt_noop_would_install_a_missing_package(tmp_path: Path) -> None:
    ctx = RunContext(root=tmp_path, noop=True, traits=DEBIAN)
    out = make("vigo-no-such-package").apply(ctx)
    assert (out.status, out.message) == (CHANGED, "would install vigo-no-such-package")


@needs_dpkg
def test_apt_noop_would_change_the_version(tmp_path: Path) -> None:
    ctx = RunContext(root=tmp_path, noop=True, traits=DEBIAN)
    out = make("coreutils", version="0.0-vigo").apply(ctx)
    assert out.status == CHANGED
    assert out.message == f"would change coreutils {_dpkg_version('coreutils')} -> 0.0-vigo"


@needs_dpkg
def test_apt_absent_and_not_installed_is_ok(tmp_path: Path) -> None:
    out = make("vigo-no-such-package", state="absent").apply(RunContext(traits=DEBIAN))
    assert (out.status, out.message) == (OK, "vigo-no-such-package is absent")


# --- missing tools and provider selection ---------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "tools"),
    [("apt", "apt-get/dpkg-query"), ("dnf", "dnf/rpm"), ("apk", "apk"), ("pip", "python3")],
)
def test_missing_tool_fails_clearly(tmp_path: Path, provider: str, tools: str) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    ctx = RunContext(root=tmp_path, env={"PATH": str(empty)})
    out = make("nginx", provider=provider).apply(ctx)
    assert out.status == FAILED
    assert out.message.startswith(f"package provider {provider!r} needs {tools}")
    assert out.message.endswith("which is not on this host")


def test_provider_follows_os_family(tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    ctx = RunContext(env={"PATH": str(empty)}, traits=DEBIAN)
    out = make("nginx").apply(ctx)
    assert (
        out.message == "package provider 'apt' needs apt-get/dpkg-query, which is not on this host"
    )
    ctx.traits = {"os": {"family": "redhat"}}
    assert "'dnf'" in make("nginx").apply(ctx).message
    ctx.traits = {"os": {"family": "alpine"}}
    assert "'apk'" in make("nginx").apply(ctx).message


@pytest.mark.parametrize(
    ("traits", "shown"), [({"os": {"family": "plan9"}}, "plan9"), ({}, "<unknown>")]
)
def test_unknown_os_family_fails(traits: dict[str, Any], shown: str) -> None:
    out = make("nginx").apply(RunContext(traits=traits))
    assert out.status == FAILED
    assert out.message == f"no package provider for os.family={shown}; set provider:"


def test_option_like_name_is_refused() -> None:
    out = make("--purge", provider="apt").apply(RunContext(traits=DEBIAN))
    assert out.status == FAILED
    assert "not a package name" in out.message


def test_python_without_pip_is_a_missing_provider(tmp_path: Path) -> None:
    # A venv made --without-pip is exactly "python3 is here, its pip is not".
    venv = tmp_path / "nopip"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    out = make("anything", provider="pip", python=python).apply(RunContext(root=tmp_path))
    assert out.status == FAILED
    assert out.message.startswith(f"package provider 'pip' needs {python} (with pip)")
    assert "has no pip module" in out.message


# --- pip: end to end in a venv --------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel, written by hand: a zip of the package and its dist-info."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'VERSION = "{version}"\n'.encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: vigo-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{dist_info}/RECORD,,\n"
    files[f"{dist_info}/RECORD"] = record.encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@pytest.fixture(scope="module")
def pip_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real venv (with pip) and a folder holding vigo_test_pkg 1.0 and 2.0 wheels."""
    base = tmp_path_factory.mktemp("pip")
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True)
    wheels = base / "wheels"
    wheels.mkdir()
    for version in ("1.0", "2.0"):
        build_wheel(wheels, WHEEL_NAME, version)
    return {"python": str(base / "venv" / "bin" / "python"), "wheels": str(wheels)}


@pytest.fixture
def pip_ctx(pip_env: dict[str, Any], tmp_path: Path) -> RunContext:
    """Context for the pip tests; the test package starts uninstalled every time."""
    subprocess.run(
        [pip_env["python"], "-m", "pip", "uninstall", "-y", "-q", WHEEL_NAME],
        capture_output=True,
        check=False,
    )
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": pip_env["wheels"]}
    return RunContext(root=tmp_path, env=env)


def pip_make(pip_env: dict[str, Any], **attrs: Any) -> Package:
    return make(WHEEL_NAME, provider="pip", python=pip_env["python"], **attrs)


def installed_version(pip_env: dict[str, Any]) -> str | None:
    """What the venv really imports, asked independently of the provider."""
    proc = subprocess.run(
        [pip_env["python"], "-c", f"import {WHEEL_NAME}; print({WHEEL_NAME}.VERSION)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_pip_installs_latest_then_is_ok(pip_env: dict[str, Any], pip_ctx: RunContext) -> None:
    resource = pip_make(pip_env)
    out = resource.apply(pip_ctx)
    assert (out.status, out.message) == (CHANGED, f"installed {WHEEL_NAME} 2.0")
    assert installed_version(pip_env) == "2.0"
    again = resource.apply(pip_ctx)
    assert (again.status, again.message) == (OK, f"{WHEEL_NAME} 2.0 is installed")


def test_pip_pins_a_version_down_and_up(pip_env: dict[str, Any], pip_ctx: RunContext) -> None:
    out = pip_make(pip_env, version="1.0").apply(pip_ctx)
    assert (out.status, out.message) == (CHANGED, f"installed {WHEEL_NAME} 1.0")
    assert out.changes == ["installed 1.0"]
    assert pip_make(pip_env, version="1.0").apply(pip_ctx).status == OK
    # Unpinned "present" is satisfied by any installed version.
    assert pip_make(pip_env).apply(pip_ctx).status == OK

    up = pip_make(pip_env, version="2.0").apply(pip_ctx)
    assert (up.status, up.message) == (CHANGED, f"changed {WHEEL_NAME} 1.0 -> 2.0")
    assert installed_version(pip_env) == "2.0"
    down = pip_make(pip_env, version="1.0").apply(pip_ctx)
    assert (down.status, down.message) == (CHANGED, f"changed {WHEEL_NAME} 2.0 -> 1.0")
    assert installed_version(pip_env) == "1.0"


def test_pip_absent_removes_then_is_ok(pip_env: dict[str, Any], pip_ctx: RunContext) -> None:
    pip_make(pip_env, version="1.0").apply(pip_ctx)
    out = pip_make(pip_env, state="absent").apply(pip_ctx)
    assert (out.status, out.message) == (CHANGED, f"removed {WHEEL_NAME} 1.0")
    assert installed_version(pip_env) is None
    again = pip_make(pip_env, state="absent").apply(pip_ctx)
    assert (again.status, again.message) == (OK, f"{WHEEL_NAME} is absent")


def test_pip_noop_changes_nothing(pip_env: dict[str, Any], pip_ctx: RunContext) -> None:
    noop = RunContext(root=pip_ctx.root, env=pip_ctx.env, noop=True)
    out = pip_make(pip_env, version="1.0").apply(noop)
    assert (out.status, out.message) == (CHANGED, f"would install {WHEEL_NAME} 1.0")
    assert installed_version(pip_env) is None

    pip_make(pip_env, version="1.0").apply(pip_ctx)
    assert pip_make(pip_env, version="2.0").apply(noop).message == (
        f"would change {WHEEL_NAME} 1.0 -> 2.0"
    )
    assert pip_make(pip_env, state="absent").apply(noop).message == f"would remove {WHEEL_NAME} 1.0"
    assert installed_version(pip_env) == "1.0"


def test_pip_unavailable_version_fails_with_pips_words(
    pip_env: dict[str, Any], pip_ctx: RunContext
) -> None:
    out = pip_make(pip_env, version="3.0").apply(pip_ctx)
    assert out.status == FAILED
    assert out.message.startswith(f"could not install {WHEEL_NAME} 3.0: `")
    assert "No matching distribution" in out.message
    assert installed_version(pip_env) is None
