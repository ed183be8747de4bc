"""The envoy's identity files (vigo.agent.identity): when to renew, and replacing a key and its
certificate as a pair without ever leaving one that does not match, whatever instant a crash
hits and whatever a reader racing the writer sees."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from vigo.agent import identity
from vigo.agent.enrolment import make_envoy_key_and_csr
from vigo.errors import AdmissionError
from vigo.server.admissions import CLOCK_SKEW_S, ENVOY_CERT_LIFETIME_S, FleetCA

DAY = 86400.0


@pytest.fixture(scope="module")
def ca() -> FleetCA:
    return FleetCA.generate()


def issue(ca: FleetCA, envoy_id: str = "env-1", **kwargs) -> tuple[bytes, bytes]:
    key_pem, csr = make_envoy_key_and_csr("h")
    return key_pem, ca.sign_envoy_csr(csr, envoy_id, **kwargs).cert_pem


def joined_dir(tmp_path: Path, ca: FleetCA) -> tuple[Path, identity.Identity]:
    state = tmp_path / "state"
    key_pem, cert_pem = issue(ca)
    return state, identity.install(state, key_pem, cert_pem, ca_pem=ca.cert_pem)


# --- when to renew ------------------------------------------------------------------------------


def test_renewal_is_due_once_less_than_a_third_of_the_lifetime_is_left():
    assert pytest.approx(1 / 3) == identity.RENEW_WHEN_REMAINING_FRACTION
    due = identity.renewal_due
    assert not due(0, 300, 0) and not due(0, 300, 199)  # 101 s of 300 left
    assert not due(0, 300, 200)  # exactly a third left: not yet
    assert due(0, 300, 201) and due(0, 300, 299) and due(0, 300, 301)  # less than a third, then expired
    assert due(100, 100, 0) and due(100, 50, 0)  # dates that make no sense: renew
    # The default 30-day certificate: not on day 19, yes on day 21.
    assert not due(0, 30 * DAY, 19 * DAY) and due(0, 30 * DAY, 21 * DAY)


def test_identity_dates_and_the_ca_backdating(ca, tmp_path):
    now = time.time()
    _state, ident = joined_dir(tmp_path, ca)
    assert ident.lifetime_s == pytest.approx(ENVOY_CERT_LIFETIME_S + CLOCK_SKEW_S, abs=2)
    assert ident.renew_after() == pytest.approx(ident.not_after - ident.lifetime_s / 3)
    assert not ident.renewal_due(now) and ident.renewal_due(ident.renew_after() + 1)
    assert not ident.expired(now) and ident.expired(ident.not_after)
    # A 90 s certificate is backdated 5 min: 390 s of lifetime, 90 s left: due at once.
    key_pem, cert_pem = issue(ca, now=now, lifetime_s=90)
    short = identity.pair(key_pem, cert_pem, ca.cert_pem)
    assert short.lifetime_s == pytest.approx(390, abs=1) and short.renewal_due(now)


# --- loading ------------------------------------------------------------------------------------


def test_install_and_load(ca, tmp_path):
    state, installed = joined_dir(tmp_path, ca)
    assert {p.name for p in state.iterdir()} == {identity.CA_FILE, identity.KEY_FILE, identity.CERT_FILE,
                                                 identity.LOCK_FILE}
    assert oct(os.stat(state / identity.KEY_FILE).st_mode & 0o777) == "0o600"
    assert oct(os.stat(state / identity.CERT_FILE).st_mode & 0o777) == "0o644"
    loaded = identity.load(state)
    assert loaded == installed and loaded.subject == "env-1" and loaded.ca_pem == ca.cert_pem


def test_load_says_not_joined_or_damaged(ca, tmp_path):
    with pytest.raises(AdmissionError, match=r"not joined: .* has no ca\.pem, envoy\.pem, envoy\.key"):
        identity.load(tmp_path / "empty")
    state, _ = joined_dir(tmp_path, ca)
    other_key, _ = issue(ca)
    (state / identity.KEY_FILE).write_bytes(other_key)
    with pytest.raises(AdmissionError, match=r"does not belong to its certificate.*state dir is damaged"):
        identity.load(state)


def test_install_refuses_a_certificate_for_another_key(ca, tmp_path):
    state, before = joined_dir(tmp_path, ca)
    key_pem, _ = issue(ca)
    _, other_cert = issue(ca)
    with pytest.raises(AdmissionError, match="does not carry this envoy's new key"):
        identity.install(state, key_pem, other_cert)
    assert identity.load(state) == before
    assert not (state / identity.NEXT_KEY_FILE).exists() and not (state / identity.NEXT_CERT_FILE).exists()


def test_check_issued(ca, tmp_path):
    key_pem, cert_pem = issue(ca, "env-1")
    ident = identity.pair(key_pem, cert_pem, ca.cert_pem)
    identity.check_issued(ident, ca.cert_pem, "env-1")
    with pytest.raises(AdmissionError, match="names envoy 'env-1', not 'env-2'"):
        identity.check_issued(ident, ca.cert_pem, "env-2")
    with pytest.raises(AdmissionError, match="not signed by the fleet CA"):
        identity.check_issued(ident, FleetCA.generate().cert_pem, "env-1")
    old_key, old_cert = issue(ca, "env-1", now=time.time() - 3 * DAY, lifetime_s=3600)
    with pytest.raises(AdmissionError, match="already expired"):
        identity.check_issued(identity.pair(old_key, old_cert, ca.cert_pem), ca.cert_pem, "env-1")
    with pytest.raises(AdmissionError, match="does not carry this envoy's key"):
        identity.pair(old_key, cert_pem, ca.cert_pem)


# --- crash safety -------------------------------------------------------------------------------


class Crash(Exception):
    pass


def install_crashing_at(state: Path, key_pem: bytes, cert_pem: bytes, step: int, monkeypatch) -> None:
    """``identity.install`` with the ``step``-th rename (1-based) failing as a crash would stop it:
    1 next key into place, 2 next certificate into place, 3 key over key, 4 certificate over
    certificate. Temp files left by the crash stay, as they would."""
    real = os.replace
    calls = 0

    def replace(src, dst):
        nonlocal calls
        calls += 1
        if calls == step:
            raise Crash(f"crash at rename {step}: {Path(src).name} -> {Path(dst).name}")
        real(src, dst)

    monkeypatch.setattr(identity.os, "replace", replace)
    # _write_atomic removes its temp file on the way out; a real crash would not: keep it.
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)
    try:
        with pytest.raises(Crash):
            identity.install(state, key_pem, cert_pem)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_a_crash_at_any_rename_leaves_a_matching_pair_old_or_new(ca, tmp_path, monkeypatch, step):
    state, old = joined_dir(tmp_path, ca)
    key_pem, cert_pem = issue(ca)
    install_crashing_at(state, key_pem, cert_pem, step, monkeypatch)
    assert step > 2 or list(state.glob(".envoy.next.*.tmp"))  # the crash left its temp file

    seen = identity.load(state)  # a reader after the crash: a pair that matches
    expected_new = step >= 3  # both next files were complete before the crash
    assert seen.serial == (identity.pair(key_pem, cert_pem, ca.cert_pem).serial if expected_new else old.serial)
    assert seen.key_pem == (key_pem if expected_new else old.key_pem)

    identity.settle(state)  # what the next writer does first
    settled = identity.load(state)
    assert (settled.serial, settled.key_pem) == (seen.serial, seen.key_pem)
    assert (state / identity.KEY_FILE).read_bytes() == seen.key_pem
    assert (state / identity.CERT_FILE).read_bytes() == seen.cert_pem
    assert not (state / identity.NEXT_KEY_FILE).exists() and not (state / identity.NEXT_CERT_FILE).exists()
    assert not list(state.glob(".*.tmp"))  # no half-written key left lying around

    # And the install after it works as usual.
    key2, cert2 = issue(ca)
    assert identity.install(state, key2, cert2).key_pem == key2 == identity.load(state).key_pem


def test_settle_drops_a_next_certificate_that_matches_no_key(ca, tmp_path):
    state, old = joined_dir(tmp_path, ca)
    _, stray = issue(ca)
    (state / identity.NEXT_CERT_FILE).write_bytes(stray)
    assert identity.load(state) == old
    identity.settle(state)
    assert not (state / identity.NEXT_CERT_FILE).exists() and identity.load(state) == old


def test_readers_racing_a_writer_always_get_a_matching_pair(ca, tmp_path):
    state, _ = joined_dir(tmp_path, ca)
    pairs = [issue(ca) for _ in range(30)]
    known = {identity.pair(k, c, ca.cert_pem).serial for k, c in pairs} | {identity.load(state).serial}
    stop = threading.Event()
    failures: list[BaseException] = []
    loads = 0

    def reader() -> None:
        nonlocal loads
        while not stop.is_set():
            try:
                assert identity.load(state).serial in known  # load checks the pair matches
                loads += 1
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for key_pem, cert_pem in pairs:
            identity.install(state, key_pem, cert_pem)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not failures, failures[0]
    assert loads > 0 and identity.load(state).key_pem == pairs[-1][0]
