"""requirements/*.txt, the pinned and hash-checked installs, are current with pyproject.toml.

scripts/lock writes them (uv, from PyPI) and records pyproject.toml's requirements in their
``# input:`` header lines. This checks, offline, what makes them usable and current: the inputs
are exactly what pyproject.toml declares today, every pin satisfies its floor and carries
hashes (``pip install --require-hashes`` refuses a file where one lacks them), and the envoy's
file has no Ray and agrees with the server's. ``scripts/lock --check`` re-resolves against the
index for the full check.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LOCKS = {
    "envoy": PYPROJECT["dependencies"],
    "server": PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["server"],
}
RUN_LOCK = "run scripts/lock (it rewrites requirements/*.txt from pyproject.toml)"
#: The hosts the docs and cluster.yaml install on: CPython 3.11 on x86_64 Linux.
HOST_311 = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+?)\s*(?:;(?P<marker>[^\\]*))?\\?$")


def _entries(name: str) -> list[tuple[str, Version, Marker | None, list[str]]]:
    """(name, version, marker, hashes) for each pin of requirements/NAME.txt."""
    entries: list[tuple[str, Version, Marker | None, list[str]]] = []
    for line in (REPO / "requirements" / f"{name}.txt").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith((" ", "\t")):
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
            assert hashes, f"requirements/{name}.txt: unexpected line {line!r}"
            entries[-1][3].extend(hashes)
            continue
        m = PIN.match(line)
        assert m, f"requirements/{name}.txt: not a `name==version` pin: {line!r}"
        marker = Marker(m["marker"].strip()) if m["marker"] else None
        entries.append((canonicalize_name(m["name"]), Version(m["version"]), marker, []))
    return entries


def _pins_for_host(name: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for pkg, version, marker, _ in _entries(name):
        if marker is None or marker.evaluate(HOST_311):
            assert pkg not in pins, f"requirements/{name}.txt pins {pkg} twice for Python 3.11"
            pins[pkg] = version
    return pins


def _inputs(name: str) -> list[str]:
    text = (REPO / "requirements" / f"{name}.txt").read_text()
    return [m.strip() for m in re.findall(r"^# input: (.+)$", text, re.M)]


def _normal(reqs: list[str]) -> list[str]:
    return sorted(str(Requirement(r)) for r in reqs)


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_lock_inputs_are_pyprojects_requirements(name: str) -> None:
    assert (REPO / "requirements" / f"{name}.txt").is_file(), f"no requirements/{name}.txt: {RUN_LOCK}"
    assert _normal(_inputs(name)) == _normal(LOCKS[name]), (
        f"requirements/{name}.txt was resolved from other requirements than pyproject.toml "
        f"declares now: {RUN_LOCK}"
    )


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_every_pin_has_hashes(name: str) -> None:
    entries = _entries(name)
    assert entries
    for pkg, version, _, hashes in entries:
        assert hashes, f"requirements/{name}.txt: {pkg}=={version} has no --hash: {RUN_LOCK}"


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_every_requirement_is_pinned_within_its_floor(name: str) -> None:
    pins = _pins_for_host(name)
    for text in LOCKS[name]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(HOST_311):
            continue
        pkg = canonicalize_name(req.name)
        assert pkg in pins, f"requirements/{name}.txt does not pin {req.name}: {RUN_LOCK}"
        assert req.specifier.contains(pins[pkg], prereleases=True), (
            f"requirements/{name}.txt pins {pkg}=={pins[pkg]}, outside {text!r}: {RUN_LOCK}"
        )


def test_envoy_lock_has_no_ray_and_matches_the_server_lock() -> None:
    envoy, server = _pins_for_host("envoy"), _pins_for_host("server")
    assert "ray" not in envoy and "ray" in server
    for pkg in ("apsw", "boto3", "typer", "numpy"):
        assert pkg not in envoy, pkg
    # scripts/lock constrains the envoy's resolution by the server's pins.
    assert {pkg: server.get(pkg) for pkg in envoy} == envoy


def test_locks_carry_the_advisory_floors() -> None:
    # The floors pyproject.toml explains; a lock below them would reinstall known advisories.
    server = _pins_for_host("server")
    assert server["cryptography"] >= Version("50.0.2")
    assert server["jinja2"] >= Version("3.1.6")
    assert server["apsw"] >= Version("3.51.3")
