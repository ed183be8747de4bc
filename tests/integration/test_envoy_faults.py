"""`vigo-envoy` as a real process against a real state dir: exit codes, refusals, kill -9 in the
middle of runs, secrets at rest, status, a corrupt cache on disk and a held run lock.

Bundles are built with the real `vigocli stack build`; the envoy runs from the installed
console script with ``--root`` so every managed path lands in a temp folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.helpers import (
    SECRET,
    cli,
    example_stack_copy,
    files_containing,
    flip_inside,
    many_files_stack,
    pack,
    raw_get,
    raw_put,
    run_cli,
    secret_needles,
    write_policy,
    write_secrets,
    write_traits_dir,
)
from vigo.agent.cache import Cache
from vigo.agent.runner import LOCK_FILE, open_cache, run_lock
from vigo.crypto.aead import KEY_FILE
from vigo.crypto.keys import key_id, load_public_key
from vigo.policy import bundle as bundle_mod

pytestmark = pytest.mark.integration

BIG_FILES = 300
KILL_ITERATIONS = 25


@dataclass
class World:
    """Everything built once per session: keys, traits, secrets and bundle files."""

    base: Path
    key: Path
    pub: Path
    other_key: Path
    traits: Path
    secrets: Path
    b4: Path  # example stack, serial 4
    b5: Path  # example stack, serial 5
    b6: Path  # example stack, serial 6 (same content as b5: a re-issue)
    failing: Path  # a tiny stack whose exec is `false`
    big: Path  # the example stack plus BIG_FILES file resources
    wrong_key: Path  # example stack, serial 7, signed by another key

    @property
    def trusted_id(self) -> str:
        return key_id(load_public_key(self.pub))

    def version(self, bundle: Path) -> str:
        return bundle_mod.decode(bundle.read_bytes(), load_public_key(self.pub)).version


def _build(stack: Path, key: Path, out: Path, serial: int, secrets: Path) -> Path:
    run_cli("vigocli", "stack", "build", stack, "--signing-key", key, "--out", out,
            "--serial", serial, "--secrets", secrets, check=True)
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("envoy-world")
    run_cli("vigocli", "stack", "keygen", "--out", base / "bundle.key", check=True)
    run_cli("vigocli", "stack", "keygen", "--out", base / "other.key", check=True)
    traits = write_traits_dir(base / "traits.d", roles=["web"])
    secrets = write_secrets(base / "secrets.yaml")
    example = example_stack_copy(base / "stack")
    failing = base / "failing-stack"
    write_policy(failing, "broken", [
        {"file": "/etc/fail/before", "content": "written before the failure\n"},
        {"exec": "always-fails", "command": "false"},
        {"file": "/etc/fail/after", "content": "never\n", "requires": ["exec:always-fails"]},
    ])
    big = many_files_stack(base / "big-stack", BIG_FILES)
    key = base / "bundle.key"
    w = World(
        base=base, key=key, pub=base / "bundle.key.pub", other_key=base / "other.key",
        traits=traits, secrets=secrets,
        b4=_build(example, key, base / "b4.bundle", 4, secrets),
        b5=_build(example, key, base / "b5.bundle", 5, secrets),
        b6=_build(example, key, base / "b6.bundle", 6, secrets),
        failing=_build(failing, key, base / "failing.bundle", 1, secrets),
        big=_build(big, key, base / "big.bundle", 1, secrets),
        wrong_key=_build(example, base / "other.key", base / "wrong-key.bundle", 7, secrets),
    )
    return w


@dataclass
class Envoy:
    """One envoy: a state dir and a root, driven through the real `vigo-envoy`."""

    world: World
    state: Path
    root: Path

    def apply(self, *args: Any, bundle: Path | None = None, trust: bool = True) -> subprocess.CompletedProcess[str]:
        extra: list[Any] = []
        if bundle is not None:
            extra += ["--bundle", bundle]
        if trust:
            extra += ["--trust", self.world.pub]
        return run_cli("vigo-envoy", "apply", "--state-dir", self.state, "--traits-dir", self.world.traits,
                       "--root", self.root, *extra, *args)

    def apply_json(self, bundle: Path | None = None, expect: int = 0) -> dict[str, Any]:
        proc = self.apply("--json", bundle=bundle)
        assert proc.returncode == expect, proc.stderr
        no_traceback(proc)
        return json.loads(proc.stdout)

    def status(self) -> dict[str, Any]:
        proc = run_cli("vigo-envoy", "status", "--state-dir", self.state, "--json")
        assert proc.returncode == 0, proc.stderr
        no_traceback(proc)
        return json.loads(proc.stdout)


@pytest.fixture
def envoy(world: World, tmp_path: Path) -> Envoy:
    root = tmp_path / "root"
    root.mkdir()
    return Envoy(world, tmp_path / "state", root)


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout


def refused(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert a one-line refusal (exit 1, no traceback, nothing on stdout); return stderr."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    no_traceback(proc)
    assert proc.stdout == ""
    message = proc.stderr.strip().splitlines()[-1]  # after any warnings logged on the way
    assert message.startswith("vigo-envoy apply: "), proc.stderr
    for fragment in fragments:
        assert fragment in message, proc.stderr
    return message


# --- (a) exit codes and refusals -----------------------------------------------------------------


def test_good_apply_exits_0_and_uses_the_secret(envoy: Envoy) -> None:
    proc = envoy.apply(bundle=envoy.world.b5)
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert "0 failed" in proc.stdout
    assert SECRET in (envoy.root / "etc/vigo-demo/site/app.conf").read_text()
    again = envoy.apply_json()  # no --bundle: the cached one, nothing left to change
    assert again["counts"]["failed"] == again["counts"]["changed"] == 0
    assert again["serial"] == 5


def test_a_failing_resource_exits_2_and_the_run_is_still_queued(envoy: Envoy) -> None:
    proc = envoy.apply("--json", bundle=envoy.world.failing)
    assert proc.returncode == 2, proc.stderr
    no_traceback(proc)
    report = json.loads(proc.stdout)
    by_id = {r["id"]: r for r in report["resources"]}
    assert by_id["exec:always-fails"]["status"] == "failed"
    assert by_id["file:/etc/fail/after"]["status"] == "skipped"
    assert by_id["file:/etc/fail/before"]["status"] == "changed"
    assert report["counts"]["failed"] == 1
    assert (envoy.root / "etc/fail/before").exists() and not (envoy.root / "etc/fail/after").exists()
    status = envoy.status()
    assert status["queue"]["runs"] == 1
    assert status["last_run"]["run_id"] == report["run_id"]
    assert status["last_run"]["counts"]["failed"] == 1
    human = envoy.apply(bundle=envoy.world.failing)
    assert human.returncode == 2
    assert "failed" in human.stdout and "exec:always-fails" in human.stdout


def test_older_serial_is_refused_with_exit_1_and_last_good_stays(envoy: Envoy) -> None:
    assert envoy.apply(bundle=envoy.world.b5).returncode == 0
    refused(envoy.apply(bundle=envoy.world.b4), "refusing bundle", "serial 4", "already accepted serial 5")
    after = envoy.apply_json()  # no --bundle: the last good bundle is still enforced
    assert (after["serial"], after["bundle_version"]) == (5, envoy.world.version(envoy.world.b5))
    status = envoy.status()
    assert status["highest_serial"] == 5
    assert status["bundle"]["serial"] == 5
    assert status["queue"]["runs"] == 2  # a refusal is not a run


def test_tampered_bundle_file_is_refused_naming_the_trusted_key(envoy: Envoy, tmp_path: Path) -> None:
    world = envoy.world
    assert envoy.apply(bundle=world.b5).returncode == 0
    data = world.b6.read_bytes()
    body = msgpack.unpackb(data, raw=False)["body"]
    tampered = tmp_path / "tampered.bundle"
    tampered.write_bytes(flip_inside(data, body))
    err = refused(envoy.apply(bundle=tampered), "signature does not verify", world.trusted_id)
    assert str(tampered) in err
    assert envoy.apply_json()["serial"] == 5  # last good bundle still in force


def test_bundle_signed_by_another_key_is_refused_naming_both_keys(envoy: Envoy) -> None:
    world = envoy.world
    other_id = key_id(load_public_key(world.base / "other.key.pub"))
    refused(envoy.apply(bundle=world.wrong_key), "signature does not verify", world.trusted_id, other_id)
    assert envoy.status()["bundle"] is None


def test_no_bundle_anywhere_is_a_no_run_exit_1(envoy: Envoy) -> None:
    refused(envoy.apply(), "no bundle to enforce", "--bundle")


# --- (b) kill -9 at random moments -----------------------------------------------------------------


def _wait_for_lock(state: Path, pid: int, proc: subprocess.Popen, limit_s: float = 10.0) -> bool:
    """Until the child wrote its pid into the run lock (it holds the lock: the run has begun)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if (state / LOCK_FILE).read_text().strip() == str(pid):
                return True
        except OSError:
            pass
        time.sleep(0.001)
    return False


@pytest.mark.faults
def test_kill_9_mid_run_never_loses_or_corrupts_a_report(envoy: Envoy, tmp_path: Path) -> None:
    world = envoy.world
    rng = random.Random(int(os.environ.get("VIGO_TEST_SEED", "0")) or None)
    cmd = [cli("vigo-envoy"), "apply", "--json", "--state-dir", str(envoy.state),
           "--traits-dir", str(world.traits), "--root", str(envoy.root)]
    # a first, uninterrupted run accepts the bundle and times a run: from process start, and
    # from taking the lock, to exit
    out = tmp_path / "first.json"
    with out.open("wb") as sink:
        t0 = time.monotonic()
        proc = subprocess.Popen([*cmd, "--bundle", str(world.big), "--trust", str(world.pub)],
                                stdout=sink, stderr=subprocess.PIPE)
        assert _wait_for_lock(envoy.state, proc.pid, proc)
        t_lock = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        full_s, locked_s = time.monotonic() - t0, time.monotonic() - t_lock
    assert proc.returncode == 0, stderr.decode()
    first = json.loads(out.read_text())
    assert first["counts"]["changed"] >= BIG_FILES
    printed = [first["run_id"]]
    outcomes = {"killed": 0, "finished": 0, "killed_after_lock": 0}
    for i in range(KILL_ITERATIONS):
        shutil.rmtree(envoy.root)  # every run re-creates all files: a long, writing run
        envoy.root.mkdir()
        out = tmp_path / f"out-{i}.json"
        with out.open("wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.PIPE)
            # random moments, stratified so they sweep a run: slot k of n lies in [k/n, (k+1)/n)
            slot = (i // 2 + rng.random()) / ((KILL_ITERATIONS + 1) // 2)
            if i % 2:  # inside the run proper: converging, committing, printing, exiting
                locked = _wait_for_lock(envoy.state, proc.pid, proc)
                time.sleep(slot * locked_s)
            else:  # anywhere from process start (imports, lock, LMDB open) to past the end
                locked = False
                time.sleep(slot * full_s * 1.4)
            if locked and proc.poll() is not None:
                locked_s *= 0.8  # runs got faster than the first one (load varies): aim earlier
            proc.send_signal(signal.SIGKILL)
            _, stderr = proc.communicate(timeout=30)
        if proc.returncode == -signal.SIGKILL:
            outcomes["killed"] += 1
            outcomes["killed_after_lock"] += locked
        else:
            assert proc.returncode == 0, stderr.decode()
            outcomes["finished"] += 1
        assert b"Traceback" not in stderr, stderr.decode()
        text = out.read_text()
        if text.endswith("\n"):  # printed whole, so it was committed to the queue before that
            printed.append(json.loads(text)["run_id"])

    print(f"kill -9 loop: {outcomes}, {len(printed) - 1} of {KILL_ITERATIONS} printed a report; "
          f"full run {full_s:.3f} s, {locked_s:.3f} s of it under the lock")
    assert outcomes["killed"] >= 5, outcomes  # the test did kill runs, not just watch them end
    assert outcomes["killed_after_lock"] >= 3, outcomes

    # stale run lock and stale LMDB reader slots of killed processes must not block a run
    final = envoy.apply_json()
    printed.append(final["run_id"])

    with open_cache(envoy.state) as cache:
        assert cache.check() == []
        queued = cache.pending(limit=10_000, max_bytes=1 << 40)
        assert cache.quarantined() == []  # every queue entry decoded
        stats = cache.queue_stats()
    queued_ids = [q["run_id"] for q in queued]
    assert all(q.get("kind") == "run" and len(q["resources"]) >= BIG_FILES for q in queued)
    missing = [r for r in printed if r not in queued_ids]
    assert missing == [], f"printed but not queued: {missing}"
    assert len(set(queued_ids)) == len(queued_ids)
    # queue order is run order
    started = [q["started_at"] for q in queued]
    assert started == sorted(started)
    assert stats.runs == len(queued) == stats.entries
    assert len(printed) <= len(queued) <= 2 + KILL_ITERATIONS
    assert envoy.status()["queue"]["runs"] == len(queued)


# --- (c) secrets at rest ------------------------------------------------------------------------------


def test_no_secret_in_the_state_dir_or_reports(envoy: Envoy, tmp_path: Path) -> None:
    world = envoy.world
    reports = []
    noop = envoy.apply("--json", "--noop", bundle=world.b5)  # diffs of every file, secret line too
    assert noop.returncode == 0, noop.stderr
    reports.append(noop.stdout)
    assert "[redacted:api_token]" in noop.stdout  # the secret was there and was hidden
    reports.append(envoy.apply("--json").stdout)
    app_conf = envoy.root / "etc/vigo-demo/site/app.conf"
    assert SECRET in app_conf.read_text()  # the secret really was used
    app_conf.write_text("api_token = stale\n")  # drift: the fix shows a diff with the secret line
    drift = envoy.apply("--json", "--diff", bundle=world.b6)
    assert drift.returncode == 0, drift.stderr
    reports.append(drift.stdout)
    reports.append(envoy.apply("--diff").stdout)
    reports.append(run_cli("vigo-envoy", "status", "--state-dir", envoy.state, "--json").stdout)
    reports.append(run_cli("vigo-envoy", "status", "--state-dir", envoy.state).stdout)
    assert SECRET in app_conf.read_text()

    needles = secret_needles(SECRET)
    for text in reports:
        for needle in needles:
            assert needle not in text.encode()
    state_files = [p for p in envoy.state.rglob("*") if p.is_file()]
    assert {p.name for p in state_files} >= {"data.mdb", "lock.mdb", KEY_FILE, LOCK_FILE}
    assert files_containing(envoy.state, needles) == []
    # and the queue holds the reports that were printed, themselves free of the secret
    with Cache(envoy.state, readonly=True) as cache:
        queued = cache.pending(limit=100)
    assert len(queued) == 4
    assert SECRET not in json.dumps(queued)
    assert stat.S_IMODE((envoy.state / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((envoy.state / "cache" / "data.mdb").stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(envoy.state.stat().st_mode) & 0o077 == 0


# --- (d) status -----------------------------------------------------------------------------------------


def test_status_shows_bundle_queue_and_last_run(envoy: Envoy) -> None:
    world = envoy.world
    runs = [envoy.apply_json(bundle=world.b5), envoy.apply_json(), envoy.apply_json()]
    info = envoy.status()
    assert info["bundle"]["version"] == world.version(world.b5)
    assert info["bundle"]["serial"] == 5
    assert info["highest_serial"] == 5
    assert info["queue"]["runs"] == info["queue"]["entries"] == 3
    assert info["queue"]["oldest_started_at"] == runs[0]["started_at"]
    assert info["queue"]["newest_started_at"] == runs[-1]["started_at"]
    assert info["last_run"]["run_id"] == runs[-1]["run_id"]
    assert info["last_run"]["counts"] == runs[-1]["counts"]
    assert info["quarantined"] == []
    assert len(info["envoy_id"]) == 32 and all(r["envoy_id"] == info["envoy_id"] for r in runs)

    human = run_cli("vigo-envoy", "status", "--state-dir", envoy.state)
    assert human.returncode == 0
    no_traceback(human)
    out = human.stdout
    for label in ("envoy id", "bundle", "queue depth", "oldest queued report", "last run", "quarantined entries"):
        assert re.search(rf"^{label}\s", out, re.M), (label, out)
    assert f"{info['bundle']['version']} serial 5" in out
    assert re.search(r"^queue depth\s+3 runs in 3 entries", out, re.M)
    last = runs[-1]["counts"]
    assert f"{last['ok']} ok, {last['changed']} changed, {last['failed']} failed" in out


def test_status_of_an_envoy_that_never_ran_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli("vigo-envoy", "status", "--state-dir", tmp_path / "nothing")
    assert proc.returncode == 1
    no_traceback(proc)
    assert "no envoy cache" in proc.stderr
    assert not (tmp_path / "nothing").exists()


# --- (e) corrupt cache on disk ----------------------------------------------------------------------------


def test_corrupt_current_bundle_falls_back_to_previous(envoy: Envoy) -> None:
    world = envoy.world
    assert envoy.apply(bundle=world.b5).returncode == 0
    assert envoy.apply(bundle=world.b6).returncode == 0
    raw_put(envoy.state, "bundles", b"current", b"\xc1\x00 not a bundle \xff")  # envoy stopped
    proc = envoy.apply("--json")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert json.loads(proc.stdout)["serial"] == 5  # the previous bundle
    assert "quarantined" in proc.stderr  # and it said so
    info = envoy.status()
    assert [(q["db"], q["key"]) for q in info["quarantined"]] == [("bundles", "current")]
    assert "does not decode" in info["quarantined"][0]["reason"]
    assert info["highest_serial"] == 6  # the corruption does not lower the rollback floor
    human = run_cli("vigo-envoy", "status", "--state-dir", envoy.state).stdout
    assert re.search(r"^quarantined entries\s+1$", human, re.M)
    assert "quarantined bundles/current" in human
    # serial 4 is still refused; serial 6 can be applied again
    refused(envoy.apply(bundle=world.b4), "already accepted serial 6")
    assert envoy.apply_json(bundle=world.b6)["serial"] == 6
    assert envoy.apply_json()["serial"] == 6


def test_corrupt_only_bundle_is_a_clear_error_then_recoverable(envoy: Envoy) -> None:
    world = envoy.world
    assert envoy.apply(bundle=world.b5).returncode == 0
    entry = msgpack.unpackb(_raw_current(envoy.state), raw=False)
    entry["body"] = flip_inside(entry["body"], entry["body"][10:-10])
    raw_put(envoy.state, "bundles", b"current", pack(entry))
    refused(envoy.apply(), "no bundle to enforce")
    info = envoy.status()
    assert [q["key"] for q in info["quarantined"]] == ["current"]
    assert "signature does not verify" in info["quarantined"][0]["reason"]
    assert envoy.apply_json(bundle=world.b5)["serial"] == 5


def test_garbage_in_the_queue_does_not_break_status_or_apply(envoy: Envoy) -> None:
    world = envoy.world
    good = envoy.apply_json(bundle=world.b5)
    raw_put(envoy.state, "queue", (1).to_bytes(8, "big"), b"\xc1 torn report")
    raw_put(envoy.state, "queue", (2).to_bytes(8, "big"), pack(12345))
    info = envoy.status()
    assert info["queue"]["entries"] == 2
    newer = envoy.apply_json()
    with open_cache(envoy.state) as cache:
        assert [r["run_id"] for r in cache.pending()] == [newer["run_id"]]
        assert len(cache.quarantined()) == 2
        assert cache.check() == []
    assert good["run_id"] != newer["run_id"]
    info = envoy.status()
    assert info["queue"]["runs"] == info["queue"]["entries"] == 1
    human = run_cli("vigo-envoy", "status", "--state-dir", envoy.state).stdout
    assert "quarantined queue/#1: does not decode" in human
    assert "quarantined queue/#2: queue entry is not a map" in human


def _raw_current(state: Path) -> bytes:
    raw = raw_get(state, "bundles", b"current")
    assert raw is not None
    return raw


# --- (f) one run at a time -----------------------------------------------------------------------------


def test_second_apply_while_the_lock_is_held_exits_1_naming_the_lock(envoy: Envoy) -> None:
    assert envoy.apply(bundle=envoy.world.b5).returncode == 0
    with run_lock(envoy.state):
        proc = envoy.apply()
        refused(proc, "another vigo-envoy run", str(envoy.state / LOCK_FILE), f"pid {os.getpid()}")
        assert envoy.status()["queue"]["runs"] == 1  # status reads without the lock
    assert envoy.apply().returncode == 0  # released: runs again
    assert envoy.status()["queue"]["runs"] == 2
