"""The envoy's LMDB cache against a real LMDB environment in tmp_path (no subprocesses).

Bundles are built and signed in-process from real stacks; corruption is written straight into
LMDB with the lmdb module, as a bad disk or a bad write would leave it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import (
    EXAMPLE_STACK,
    SECRET,
    build_bundle,
    files_containing,
    flip_inside,
    pack,
    raw_get,
    raw_lmdb,
    raw_put,
    secret_needles,
    unpack,
    write_policy,
)
from vigo.agent.cache import SUMMARY, Cache
from vigo.crypto.aead import KEY_FILE, Sealer, load_or_create_key
from vigo.errors import BundleRefusedError, CacheError, SecretError
from vigo.policy.bundle import Bundle

SEQ1 = (1).to_bytes(8, "big")


# --- fixtures and builders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small stacks with different content, plus the example stack (which has a secret)."""
    base = tmp_path_factory.mktemp("stacks")
    one = base / "one"
    write_policy(one, "p", [{"file": "/etc/one", "content": "one\n"}])
    two = base / "two"
    write_policy(two, "p", [{"file": "/etc/one", "content": "two\n"}])
    return {"one": one, "two": two, "example": EXAMPLE_STACK}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def open_cache(state_dir: Path, **kw: Any) -> Cache:
    return Cache(state_dir, sealer=Sealer.for_state_dir(_mk(state_dir)), **kw)


def _mk(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def report(i: int, *, pad: int = 0, counts: dict[str, int] | None = None, started: float | None = None) -> dict[str, Any]:
    return {
        "kind": "run",
        "run_id": f"run-{i:05d}",
        "envoy_id": "envoy-test",
        "started_at": 1_700_000_000.0 + i if started is None else started,
        "bundle_version": "v1",
        "serial": 1,
        "offline": i % 2 == 0,
        "counts": counts or {"ok": 1, "changed": i % 3, "failed": i % 2, "skipped": 0},
        "resources": [{"id": "file:/x", "message": "m" * pad}],
    }


# --- bundles: accept / refuse ---------------------------------------------------------------------


def test_accept_stores_bundle_and_same_bundle_again_is_not_new(state: Path, key, stacks) -> None:
    b1 = build_bundle(stacks["example"], key, serial=10)
    with open_cache(state) as cache:
        assert cache.accept_bundle(b1) is True
        assert cache.accept_bundle(b1) is False
        assert cache.meta("highest_serial") == 10
        assert cache.meta("highest_term") == 0
        info = cache.bundle_info("current")
        assert info is not None and (info["version"], info["serial"]) == (b1.version, 10)
        assert cache.bundle_info("previous") is None
        loaded = cache.load_bundle(key.public_key())
        assert loaded is not None
        assert (loaded.version, loaded.serial, loaded.secrets) == (b1.version, 10, {"api_token": SECRET})
        assert loaded.policies == b1.policies
        assert cache.quarantined() == []


def test_higher_serial_rotates_current_to_previous(state: Path, key, stacks) -> None:
    b1 = build_bundle(stacks["one"], key, serial=1)
    b2 = build_bundle(stacks["two"], key, serial=2)
    b3 = build_bundle(stacks["one"], key, serial=3)
    with open_cache(state) as cache:
        assert cache.accept_bundle(b1)
        assert cache.accept_bundle(b2)
        assert cache.bundle_info("current")["serial"] == 2
        assert cache.bundle_info("previous")["serial"] == 1
        assert cache.accept_bundle(b3)
        assert cache.bundle_info("current")["serial"] == 3
        assert cache.bundle_info("previous")["version"] == b2.version
        assert cache.load_bundle(key.public_key(), "previous").serial == 2
        assert cache.meta("highest_serial") == 3


def test_lower_serial_is_refused_and_last_good_stays(state: Path, key, stacks) -> None:
    newer = build_bundle(stacks["two"], key, serial=5)
    older = build_bundle(stacks["one"], key, serial=4)
    with open_cache(state) as cache:
        cache.accept_bundle(newer)
        with pytest.raises(BundleRefusedError) as err:
            cache.accept_bundle(older)
        assert "serial 4" in str(err.value) and "already accepted serial 5" in str(err.value)
        in_force = cache.bundle_in_force(key.public_key())
        assert (in_force.version, in_force.serial) == (newer.version, 5)
        assert cache.bundle_info("previous") is None  # a refusal rotates nothing
        assert cache.meta("highest_serial") == 5


def test_lower_serial_is_refused_even_after_reopen(state: Path, key, stacks) -> None:
    with open_cache(state) as cache:
        cache.accept_bundle(build_bundle(stacks["one"], key, serial=7))
    with open_cache(state) as cache, pytest.raises(BundleRefusedError, match="serial 6"):
        cache.accept_bundle(build_bundle(stacks["two"], key, serial=6))


@pytest.mark.parametrize("garbage", [b"\xc1", pack("seven"), pack(None)], ids=["undecodable", "text", "nil"])
def test_rollback_floor_survives_a_corrupt_highest_serial(state: Path, key, stacks, garbage: bytes) -> None:
    with open_cache(state) as cache:
        cache.accept_bundle(build_bundle(stacks["one"], key, serial=7, term=2))
    raw_put(state, "meta", b"highest_serial", garbage)
    raw_put(state, "meta", b"highest_term", garbage)
    with open_cache(state) as cache:
        with pytest.raises(BundleRefusedError, match="serial 7"):
            cache.accept_bundle(build_bundle(stacks["two"], key, serial=6, term=2))
        with pytest.raises(BundleRefusedError, match="term 2"):
            cache.accept_bundle(build_bundle(stacks["two"], key, serial=9, term=1))
        assert cache.accept_bundle(build_bundle(stacks["two"], key, serial=8, term=2))
        assert (cache.meta("highest_serial"), cache.meta("highest_term")) == (8, 2)


def test_lower_term_is_refused_even_with_higher_serial(state: Path, key, stacks) -> None:
    with open_cache(state) as cache:
        cache.accept_bundle(build_bundle(stacks["one"], key, serial=10, term=3))
        stale = build_bundle(stacks["two"], key, serial=99, term=2)
        with pytest.raises(BundleRefusedError) as err:
            cache.accept_bundle(stale)
        assert "term 2" in str(err.value) and "term 3" in str(err.value)
        assert cache.bundle_info("current")["serial"] == 10
        assert cache.meta("highest_term") == 3
        assert cache.meta("highest_serial") == 10


def test_same_serial_different_content_is_refused(state: Path, key, stacks) -> None:
    first = build_bundle(stacks["one"], key, serial=8)
    other = build_bundle(stacks["two"], key, serial=8)
    assert first.version != other.version
    with open_cache(state) as cache:
        cache.accept_bundle(first)
        with pytest.raises(BundleRefusedError, match="different content"):
            cache.accept_bundle(other)
        assert cache.bundle_info("current")["version"] == first.version


# --- bundles: corrupt entries are quarantined, never fatal ----------------------------------------


def _two_bundles(state: Path, key, stacks) -> tuple[Bundle, Bundle]:
    b1 = build_bundle(stacks["example"], key, serial=1)
    b2 = build_bundle(stacks["example"], key, serial=2, secrets={"api_token": SECRET + "-v2"})
    with open_cache(state) as cache:
        cache.accept_bundle(b1)
        cache.accept_bundle(b2)
    return b1, b2


def _tamper_current(state: Path, part: str) -> None:
    entry = unpack(raw_get(state, "bundles", b"current"))
    entry[part] = flip_inside(entry[part], entry[part][4:-4])
    raw_put(state, "bundles", b"current", pack(entry))


@pytest.mark.parametrize(
    ("part", "reason"),
    [("body", "signature does not verify"), ("secrets_sealed", "wrong key or altered data"),
     ("signature", "signature does not verify")],
)
def test_tampered_cached_bundle_is_quarantined_and_previous_enforced(
    state: Path, key, stacks, part: str, reason: str
) -> None:
    b1, _b2 = _two_bundles(state, key, stacks)
    _tamper_current(state, part)
    with open_cache(state) as cache:
        assert cache.load_bundle(key.public_key(), "current") is None
        quarantined = cache.quarantined()
        assert [(q["db"], q["key"]) for q in quarantined] == [("bundles", "current")]
        assert reason in quarantined[0]["reason"]
        in_force = cache.bundle_in_force(key.public_key())
        assert in_force is not None
        assert (in_force.version, in_force.serial, in_force.secrets) == (b1.version, 1, {"api_token": SECRET})
        assert cache.bundle_info("current") is None  # moved aside, not left to fail every run
        assert cache.check() == []


def test_garbage_bundle_entry_is_quarantined_with_a_reason(state: Path, key, stacks) -> None:
    b1, _b2 = _two_bundles(state, key, stacks)
    raw_put(state, "bundles", b"current", b"\xc1 this is not msgpack \xff\xfe")
    with open_cache(state) as cache:
        assert cache.bundle_info("current") is None
        [q] = cache.quarantined()
        assert (q["db"], q["key"]) == ("bundles", "current")
        assert "does not decode as msgpack" in q["reason"]
        assert q["reason"].rstrip().endswith(":") is False  # says *why*, not an empty message
        assert cache.bundle_in_force(key.public_key()).version == b1.version
        assert cache.check() == []
    # the raw bytes are kept for inspection
    with raw_lmdb(state, write=False) as (txn, dbs):
        records = [unpack(v) for _k, v in txn.cursor(db=dbs["quarantine"])]
    assert records[0]["raw"] == b"\xc1 this is not msgpack \xff\xfe"


def test_bundle_entry_that_is_not_a_map_is_quarantined(state: Path, key, stacks) -> None:
    b1, _ = _two_bundles(state, key, stacks)
    raw_put(state, "bundles", b"current", pack([1, 2, 3]))
    with open_cache(state) as cache:
        assert cache.bundle_in_force(key.public_key()).version == b1.version
        assert [q["key"] for q in cache.quarantined()] == ["current"]


def test_both_slots_corrupt_means_no_bundle_not_a_crash(state: Path, key, stacks) -> None:
    _two_bundles(state, key, stacks)
    raw_put(state, "bundles", b"current", b"\xc1")
    raw_put(state, "bundles", b"previous", b"\xc1\xc1")
    with open_cache(state) as cache:
        assert cache.bundle_in_force(key.public_key()) is None
        assert sorted(q["key"] for q in cache.quarantined()) == ["current", "previous"]


def test_accepting_over_a_corrupt_current_keeps_the_new_bundle(state: Path, key, stacks) -> None:
    """Regression: the deferred quarantine of the unreadable "current" must not delete the
    bundle the same accept just wrote there."""
    _two_bundles(state, key, stacks)
    raw_put(state, "bundles", b"current", b"\xc1 garbage")
    b3 = build_bundle(stacks["example"], key, serial=3)
    with open_cache(state) as cache:
        assert cache.accept_bundle(b3) is True
        assert [q["key"] for q in cache.quarantined()] == ["current"]
        in_force = cache.bundle_in_force(key.public_key())
        assert in_force is not None and in_force.serial == 3
        assert cache.check() == []


def test_cached_secrets_sealed_under_another_key_are_quarantined(state: Path, key, stacks) -> None:
    _two_bundles(state, key, stacks)
    (state / KEY_FILE).write_bytes(os.urandom(32))  # the seal key was replaced
    with open_cache(state) as cache:
        assert cache.bundle_in_force(key.public_key()) is None
        reasons = [q["reason"] for q in cache.quarantined()]
        assert len(reasons) == 2 and all("wrong key or altered data" in r for r in reasons)


def test_readonly_cache_reports_but_does_not_move_bad_entries(state: Path, key, stacks) -> None:
    b1, _ = _two_bundles(state, key, stacks)
    _tamper_current(state, "body")
    with Cache(state, readonly=True, sealer=Sealer.for_state_dir(state)) as cache:
        assert cache.load_bundle(key.public_key(), "current") is None
        assert cache.bundle_in_force(key.public_key()).version == b1.version
        assert cache.quarantined() == []
    assert raw_get(state, "bundles", b"current") is not None


def test_no_secret_in_plaintext_in_lmdb(state: Path, key, stacks) -> None:
    _two_bundles(state, key, stacks)
    with open_cache(state) as cache:
        cache.enqueue(report(1))
        assert cache.load_bundle(key.public_key()).secrets == {"api_token": SECRET + "-v2"}
    assert files_containing(state, secret_needles(SECRET)) == []


def test_bundle_with_secrets_needs_a_sealer(state: Path, key, stacks) -> None:
    with Cache(state) as cache, pytest.raises(CacheError, match="no sealing key"):
        cache.accept_bundle(build_bundle(stacks["example"], key, serial=1))


# --- results queue -------------------------------------------------------------------------------


def test_enqueue_pending_ack(state: Path) -> None:
    with open_cache(state) as cache:
        seqs = [cache.enqueue(report(i)) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        assert [r["run_id"] for r in cache.pending()] == [f"run-{i:05d}" for i in range(5)]
        assert cache.pending()[2] == report(2)
        assert cache.ack(["run-00001", "run-00003"]) == 2
        assert cache.ack(["run-00001", "run-00003"]) == 0  # a repeated ack is harmless
        assert cache.ack(["no-such-run"]) == 0
        assert [r["run_id"] for r in cache.pending()] == ["run-00000", "run-00002", "run-00004"]
        stats = cache.queue_stats()
        assert (stats.entries, stats.runs, stats.summarized_runs) == (3, 3, 0)
        assert stats.oldest_started_at == report(0)["started_at"]
        assert stats.newest_started_at == report(4)["started_at"]
        assert cache.check() == []
        assert cache.enqueue(report(5)) == 6  # sequence keeps growing after acks
        assert cache.ack([f"run-{i:05d}" for i in range(6)]) == 4
        assert cache.pending() == []
        assert cache.queue_stats().bytes == 0
        assert cache.meta("queue_bytes") == 0
        assert cache.check() == []


def test_queue_survives_reopen_in_order(state: Path) -> None:
    with open_cache(state) as cache:
        for i in range(3):
            cache.enqueue(report(i), last_run={"run_id": f"run-{i:05d}"})
    with open_cache(state) as cache:
        assert [r["run_id"] for r in cache.pending()] == ["run-00000", "run-00001", "run-00002"]
        assert cache.meta("last_run") == {"run_id": "run-00002"}
        assert cache.enqueue(report(3)) == 4


def test_pending_limit_and_max_bytes(state: Path) -> None:
    with open_cache(state) as cache:
        for i in range(10):
            cache.enqueue(report(i, pad=1000))
        assert [r["run_id"] for r in cache.pending(limit=3)] == ["run-00000", "run-00001", "run-00002"]
        size = len(pack(report(0, pad=1000)))
        assert len(cache.pending(max_bytes=size * 4 + 10)) == 4
        # one report bigger than max_bytes still goes out alone, or the queue would never drain
        assert [r["run_id"] for r in cache.pending(max_bytes=10)] == ["run-00000"]


def test_undecodable_queue_entries_are_quarantined_and_the_rest_returned(state: Path) -> None:
    with open_cache(state) as cache:
        for i in range(4):
            cache.enqueue(report(i))
    raw_put(state, "queue", (2).to_bytes(8, "big"), b"\xc1\xc1 broken report")  # over run-00001
    raw_put(state, "queue", (3).to_bytes(8, "big"), pack("not a report"))  # over run-00002
    with open_cache(state) as cache:
        assert cache.queue_stats().entries == 4  # counted, not decoded, no crash
        assert [r["run_id"] for r in cache.pending()] == ["run-00000", "run-00003"]
        quarantined = cache.quarantined()
        assert sorted((q["db"], q["key"]) for q in quarantined) == [("queue", "#2"), ("queue", "#3")]
        assert any("does not decode" in q["reason"] for q in quarantined)
        assert any("not a map" in q["reason"] for q in quarantined)
        # the queue's index and byte count follow the entries that were moved aside
        assert cache.check() == []
        stats = cache.queue_stats()
        assert (stats.entries, stats.runs) == (2, 2)
        assert cache.ack(["run-00001"]) == 0
        cache.enqueue(report(4))
        assert [r["run_id"] for r in cache.pending()] == ["run-00000", "run-00003", "run-00004"]
        assert cache.check() == []


def test_garbage_queue_bytes_is_recounted(state: Path) -> None:
    with open_cache(state) as cache:
        cache.enqueue(report(0))
    raw_put(state, "meta", b"queue_bytes", b"\xc1")
    with open_cache(state) as cache:
        cache.enqueue(report(1))
        assert cache.check() == []
        assert cache.meta("queue_bytes") == cache.queue_stats().bytes


def test_check_finds_inconsistencies(state: Path) -> None:
    with open_cache(state) as cache:
        cache.enqueue(report(0))
    raw_put(state, "runs", b"ghost", (99).to_bytes(8, "big"))
    raw_put(state, "traits", b"last", b"\xc1")
    with open_cache(state) as cache:
        problems = cache.check()
    assert any("runs/ghost points at a missing queue entry" in p for p in problems)
    assert any("traits/" in p and "does not decode" in p for p in problems)


# --- compaction ------------------------------------------------------------------------------------


def test_compaction_folds_oldest_into_a_summary(state: Path) -> None:
    bound = 4000
    reports = [report(i, pad=150) for i in range(60)]
    with open_cache(state, queue_max_bytes=bound) as cache:
        for r in reports:
            cache.enqueue(r)
        items = cache.pending(limit=1000)
        stats = cache.queue_stats()
        assert cache.check() == []
    summary, whole = items[0], items[1:]
    assert summary["kind"] == SUMMARY
    assert summary["run_id"].startswith("summary-")
    assert not any(i.get("kind") == SUMMARY for i in whole)
    folded = reports[: summary["count"]]
    assert [r["run_id"] for r in whole] == [r["run_id"] for r in reports[summary["count"]:]]
    assert whole[-1] == reports[-1]  # the newest report stays whole
    assert summary["first_started_at"] == folded[0]["started_at"]
    assert summary["last_started_at"] == folded[-1]["started_at"]
    totals: dict[str, int] = {}
    for r in folded:
        for k, n in r["counts"].items():
            totals[k] = totals.get(k, 0) + n
    assert summary["counts"] == totals
    assert summary["offline"] == sum(1 for r in folded if r["offline"])
    assert summary["bundle_versions"] == ["v1"]
    assert stats.runs == 60
    assert stats.summarized_runs == summary["count"] > 0
    assert stats.entries == len(items)
    assert stats.bytes <= bound
    assert stats.oldest_started_at == reports[0]["started_at"]
    assert stats.newest_started_at == reports[-1]["started_at"]


def test_a_report_larger_than_the_bound_stays_whole(state: Path) -> None:
    with open_cache(state, queue_max_bytes=1000) as cache:
        for i in range(3):
            cache.enqueue(report(i))
        cache.enqueue(report(3, pad=5000))
        items = cache.pending()
        assert items[0]["kind"] == SUMMARY and items[0]["count"] == 3
        assert items[1] == report(3, pad=5000)
        assert cache.queue_stats().runs == 4
        assert cache.check() == []


def test_summary_can_be_acknowledged_by_its_run_id(state: Path) -> None:
    with open_cache(state, queue_max_bytes=1500) as cache:
        for i in range(30):
            cache.enqueue(report(i, pad=100))
        summary = cache.pending()[0]
        assert summary["kind"] == SUMMARY
        before = cache.queue_stats().runs
        assert cache.ack([summary["run_id"]]) == 1
        after = cache.queue_stats()
        assert after.runs == before - summary["count"]
        assert after.summarized_runs == 0
        assert cache.check() == []
        # folded run ids are gone from the index: acking them later is a harmless no-op
        assert cache.ack(["run-00000"]) == 0


def test_compaction_quarantines_garbage_it_meets(state: Path) -> None:
    with open_cache(state, queue_max_bytes=100_000) as cache:
        for i in range(6):
            cache.enqueue(report(i, pad=100))
    raw_put(state, "queue", (2).to_bytes(8, "big"), b"\xc1 bad")
    with open_cache(state, queue_max_bytes=800) as cache:
        cache.enqueue(report(6, pad=100))
        assert [q["db"] for q in cache.quarantined()] == ["queue"]
        assert cache.check() == []
        stats = cache.queue_stats()
        assert stats.runs == 6  # 7 enqueued, one moved aside as unreadable (kept in quarantine)
        assert cache.pending()[-1]["run_id"] == "run-00006"


# --- property: the queue never loses track of a run ------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("enqueue"), st.integers(0, 600), st.integers(0, 3)),
    st.tuples(st.just("ack"), st.integers(0, 10_000), st.booleans()),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bound=st.integers(400, 5000), ops=st.lists(_op, min_size=1, max_size=40))
def test_queue_model(bound: int, ops: list[tuple]) -> None:
    whole: list[dict[str, Any]] = []  # reports the model knows are still whole, oldest first
    summary: dict[str, Any] | None = None  # what the model expects the head summary to fold
    summary_id: str | None = None
    enqueued = acked_runs = 0
    ids: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, open_cache(Path(tmp) / "s", queue_max_bytes=bound) as cache:
        for op in ops:
            if op[0] == "enqueue":
                _, pad, failed = op
                r = report(enqueued, pad=pad, counts={"ok": 1, "failed": failed})
                enqueued += 1
                ids.append(r["run_id"])
                cache.enqueue(r)
                whole.append(r)
            else:
                _, pick, use_summary = op
                target = summary_id if (use_summary and summary_id) else (ids[pick % len(ids)] if ids else "none")
                if any(w["run_id"] == target for w in whole):
                    expected, runs_gone = 1, 1
                    whole = [w for w in whole if w["run_id"] != target]
                elif summary is not None and target == summary_id:
                    expected, runs_gone = 1, summary["count"]
                    summary, summary_id = None, None
                else:
                    expected, runs_gone = 0, 0
                assert cache.ack([target]) == expected
                acked_runs += runs_gone

            items = cache.pending(limit=10_000, max_bytes=1 << 30)
            real_summary = items[0] if items and items[0].get("kind") == SUMMARY else None
            real_whole = [i for i in items if i.get("kind") != SUMMARY]
            assert not any(i.get("kind") == SUMMARY for i in items[1:]), "one summary, at the head"
            # compaction only ever folds the oldest whole reports, never the newest
            folded = len(whole) - len(real_whole)
            assert folded >= 0 and [i["run_id"] for i in real_whole] == [w["run_id"] for w in whole[folded:]]
            if op[0] == "ack":
                assert folded == 0, "an ack must not compact"
            elif whole:
                assert real_whole[-1] == whole[-1]
            for w in whole[:folded]:
                summary = _model_fold(summary, w)
            whole = whole[folded:]
            if summary is None:
                assert real_summary is None
            else:
                assert real_summary is not None
                summary_id = real_summary["run_id"]
                for field in ("count", "counts", "first_started_at", "last_started_at"):
                    assert real_summary[field] == summary[field], field

            stats = cache.queue_stats()
            represented = len(whole) + (summary["count"] if summary else 0)
            assert stats.runs == represented == enqueued - acked_runs
            assert stats.summarized_runs == (summary["count"] if summary else 0)
            assert stats.entries == len(items)
            if op[0] == "enqueue" and len(whole) > 1:
                assert stats.bytes <= bound, "over the bound with older reports still whole"
            assert cache.check() == []


def _model_fold(summary: dict[str, Any] | None, r: dict[str, Any]) -> dict[str, Any]:
    if summary is None:
        summary = {"count": 0, "counts": {}, "first_started_at": r["started_at"], "last_started_at": r["started_at"]}
    summary["count"] += 1
    summary["first_started_at"] = min(summary["first_started_at"], r["started_at"])
    summary["last_started_at"] = max(summary["last_started_at"], r["started_at"])
    for k, n in r["counts"].items():
        summary["counts"][k] = summary["counts"].get(k, 0) + n
    return summary


# --- meta, opening ------------------------------------------------------------------------------------


def test_envoy_id_is_created_once_and_kept(state: Path) -> None:
    with open_cache(state) as cache:
        first = cache.envoy_id
        assert len(first) == 32
    with open_cache(state) as cache:
        assert cache.envoy_id == first
        cache.store_traits({"hostname": "h", "cpus": 2})
        assert cache.last_traits() == {"hostname": "h", "cpus": 2}


def test_garbage_envoy_id_is_replaced_and_quarantined(state: Path) -> None:
    with open_cache(state):
        pass
    raw_put(state, "meta", b"envoy_id", b"\xc1")
    with open_cache(state) as cache:
        assert len(cache.envoy_id) == 32
        assert [(q["db"], q["key"]) for q in cache.quarantined()] == [("meta", "envoy_id")]
    with open_cache(state) as cache:
        assert len(cache.envoy_id) == 32  # the replacement survived the quarantine


def test_readonly_cache_on_a_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "never-ran"
    with pytest.raises(CacheError) as err:
        Cache(missing, readonly=True)
    text = str(err.value)
    assert "no envoy cache" in text and str(missing) in text and "has this envoy run yet" in text
    assert not missing.exists()  # looking must not create it


def test_readonly_cache_reads_what_a_writer_committed(state: Path) -> None:
    with open_cache(state) as cache:
        cache.enqueue(report(0))
    with Cache(state, readonly=True) as ro:
        assert ro.queue_stats().runs == 1
        assert ro.pending()[0]["run_id"] == "run-00000"


def test_unwritable_state_dir_is_a_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="cannot create state directory"):
        Cache(blocker / "state")


# --- sealing ------------------------------------------------------------------------------------------


def test_seal_key_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    old_umask = os.umask(0)  # even a permissive umask must not widen the key file
    try:
        key = load_or_create_key(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32
    assert load_or_create_key(path) == key
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temp file left behind


def test_sealing_round_trip_and_purpose_binding(tmp_path: Path) -> None:
    sealer = Sealer.for_state_dir(tmp_path)
    blob = sealer.seal(SECRET.encode(), b"bundle-secrets:v1")
    assert SECRET.encode() not in blob
    assert sealer.open(blob, b"bundle-secrets:v1") == SECRET.encode()
    assert sealer.seal(b"x", b"p") != sealer.seal(b"x", b"p")  # fresh nonce each time
    with pytest.raises(SecretError, match="wrong key or altered data"):
        sealer.open(blob, b"bundle-secrets:v2")
    with pytest.raises(SecretError, match="wrong key or altered data"):
        sealer.open(blob[:-1] + bytes([blob[-1] ^ 1]), b"bundle-secrets:v1")
    with pytest.raises(SecretError, match="wrong key or altered data"):
        Sealer(os.urandom(32)).open(blob, b"bundle-secrets:v1")
    with pytest.raises(SecretError, match="too short"):
        sealer.open(b"short", b"bundle-secrets:v1")


def test_truncated_seal_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"\x00" * 7)
    with pytest.raises(SecretError, match="7 bytes, expected 32"):
        Sealer.for_state_dir(tmp_path)
