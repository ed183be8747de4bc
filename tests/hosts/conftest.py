"""Fixtures for tests on namespaced hosts: the hosts themselves, the wheel and the venvs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hosts import payload
from tests.hosts.netns import ROOT, Hosts, unavailable_reason

#: Keep the hosts after the test (debugging): VIGO_HOSTS_KEEP=1; `python -m tests.hosts.netns down` later.
KEEP = os.environ.get("VIGO_HOSTS_KEEP") == "1"


def make_hosts(n: int) -> Iterator[Hosts]:
    """``n`` namespaced hosts, removed afterwards whatever happened (atexit too)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no namespaced hosts on this machine: {reason}")
    hosts = Hosts(ROOT)
    if not KEEP:
        hosts.down_at_exit()
    try:
        hosts.up(n)
        yield hosts
    finally:
        if not KEEP:
            hosts.down()
        hosts.unlock()


@pytest.fixture(scope="session")
def wheel() -> Path:
    """The vigo-fleet wheel of this checkout (scripts/build-wheel into ROOT/dist), or the one
    named by VIGO_HOSTS_WHEEL (to test a given build)."""
    if unavailable_reason():
        pytest.skip(f"no namespaced hosts on this machine: {unavailable_reason()}")
    given = os.environ.get("VIGO_HOSTS_WHEEL")
    if given:
        dist = ROOT / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        dist.mkdir(parents=True)
        return Path(shutil.copy(given, dist))
    return payload.build_wheel(ROOT / "dist")
