"""The primary's core on a real SQLite database: batches, admin validation, retention, trees."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import EXAMPLE_STACK
from tests.serverharness import stack_files
from vigo.agent.enrolment import make_envoy_key_and_csr
from vigo.config import ServerConfig
from vigo.errors import ProtocolError, StackError
from vigo.server import fleet
from vigo.server.partition import Partition


@pytest.fixture
def part(tmp_path):
    cfg = ServerConfig.local(tmp_path / "p")
    cfg.retention.runs_per_envoy = 5
    p = Partition(tmp_path / "p", cfg)
    yield p
    p.close()


def joined(part: Partition) -> str:
    token = part.admin("token.create", {"uses": 1})["token"]
    _, csr = make_envoy_key_and_csr("h")
    answer = part.handle_batch([{"type": "join", "body": {"token": token, "csr_pem": csr, "hostname": "h"}}])[0]
    return answer["ok"]["envoy_id"]


def report(envoy_id: str, started_at: float, **extra) -> dict:
    return {"run_id": uuid.uuid4().hex, "envoy_id": envoy_id, "started_at": started_at,
            "counts": {"ok": 1, "changed": 0, "failed": 0, "skipped": 0}, "resources": [], **extra}


def results(part, envoy_id, reports):
    return part.handle_batch([{"type": "results", "envoy_id": envoy_id, "body": {"envoy_id": envoy_id, "reports": reports}}])[0]


def test_retention_keeps_the_newest_and_drops_the_old(part):
    eid = joined(part)
    now = time.time()
    stale = report(eid, now - 40 * 86400)
    fresh = [report(eid, now - i) for i in range(8)]
    assert "ok" in results(part, eid, [stale, *fresh])
    kept = {r["run_id"] for r in fleet.recent_runs(part.store, eid, limit=100)}
    assert kept == {r["run_id"] for r in fresh[:5]}  # the 5 newest, the 40-day-old one gone


def test_one_bad_item_fails_alone(part):
    eid = joined(part)
    good = report(eid, time.time())
    answers = part.handle_batch([
        {"type": "results", "envoy_id": eid, "body": {"envoy_id": eid, "reports": [report(eid, [1])]}},
        {"type": "checkin", "envoy_id": eid, "body": {"envoy_id": eid, "traits": {}, "serial": 2**63, "term": 0,
                                                      "bundle_version": None, "queue_depth": 0,
                                                      "oldest_queued_at": None, "last_run": None}},
        {"type": "results", "envoy_id": eid, "body": {"envoy_id": eid, "reports": [good]}},
    ])
    assert answers[0]["error"]["code"] == "bad_body"
    assert answers[1]["error"]["code"] == "bad_body"
    assert answers[2]["ok"]["acked"] == [good["run_id"]]


def test_report_for_another_envoy_is_forbidden_and_ids_are_per_envoy(part):
    a, b = joined(part), joined(part)
    same, now = "run-1", time.time()
    assert results(part, a, [report(a, now, run_id=same)])["ok"]["acked"] == [same]
    assert results(part, b, [report(b, now, run_id=same)])["ok"]["acked"] == [same]  # b's own run
    assert part.admin("envoys.show", {"envoy_id": b})["run_count"] == 1
    assert results(part, a, [report(b, now)])["error"]["code"] == "forbidden"


def test_malformed_last_run_cannot_break_listings(part):
    eid = joined(part)
    part.handle_batch([{"type": "checkin", "envoy_id": eid, "body": {
        "envoy_id": eid, "traits": {}, "serial": 0, "term": 0, "bundle_version": None, "queue_depth": 0,
        "oldest_queued_at": None, "last_run": {"counts": [1], "serial": "x"}}}])
    assert part.admin("envoys.list", {})[0]["status"] in fleet.STATUSES
    assert part.admin("status", {})["envoys"] == 1


@pytest.mark.parametrize(
    ("op", "args", "code"),
    [
        ("token.create", {"uses": 1.5}, "bad_body"),
        ("token.create", {"ttl_s": 0}, "bad_body"),
        ("token.create", {"colour": "red"}, "bad_body"),
        ("secrets.set", {"name": "k", "value": 5}, "bad_body"),
        ("secrets.set", {"name": "k", "value": b"\xff\xfe"}, "bad_body"),
        ("envoys.show", {"envoy_id": "x", "runs": "many"}, "bad_body"),
        ("envoys_show", {"envoy_id": "x"}, "not_found"),
        ("__init__", {}, "not_found"),
        ("stack.push", {"files": {"a.yaml": b"x"}, "name": "../../escape"}, "bad_body"),
        ("stack.push", {"files": {"a.yaml": "text not bytes"}}, "bad_body"),
    ],
)
def test_admin_arguments_are_checked(part, op, args, code):
    with pytest.raises(ProtocolError) as info:
        part.admin(op, args)
    assert info.value.code == code


def test_id_prefix_is_not_a_pattern(part):
    joined(part)
    for pattern in ("%", "_", ""):
        with pytest.raises(ProtocolError):
            part.admin("envoys.revoke", {"envoy_id": pattern})
    assert part.admin("envoys.list", {})[0]["status"] != "revoked"


def test_stack_push_survives_a_folder_becoming_a_file(part, tmp_path):
    part.admin("secrets.set", {"name": "api_token", "value": "t"})
    files = stack_files(EXAMPLE_STACK)
    first = part.admin("stack.push", {"files": {**files, "files/motd/banner": b"x"}})
    second = part.admin("stack.push", {"files": {**files, "files/motd": b"now a file"}})
    assert second["serial"] == first["serial"] and second["unchanged"]  # unreferenced files: same bundle
    assert (part.store.data_dir / "stack" / "files" / "motd").read_bytes() == b"now a file"
    again = Partition(part.store.data_dir, part.cfg)  # a restart rematerialises without error
    again.close()


def test_identical_push_keeps_its_serial_and_oversized_bundle_is_refused(part):
    part.admin("secrets.set", {"name": "api_token", "value": "t"})
    files = stack_files(EXAMPLE_STACK)
    first = part.admin("stack.push", {"files": files})
    assert part.admin("stack.push", {"files": files})["unchanged"] is True
    assert part.current_serial() == first["serial"]
    part.cfg.gateway.max_frame_bytes = 70 * 1024
    with pytest.raises(StackError, match="would not fit in one check-in answer"):
        part.admin("stack.push", {"files": {**files, "files/big.bin": b"x" * 20000, "big.yaml":
                                            b"resources:\n  - file: /big\n    source: big.bin\n"}})


def test_status_is_derived():
    now = 1000.0
    base = {"last_seen": now - 10, "interval_s": 30, "offline_runs": 0,
            "last_run": {"counts": {"failed": 0}, "serial": 2}}
    derive = lambda e, cur=2: fleet.derive_status(e, now=now, current_serial=cur, offline_after_intervals=3,  # noqa: E731
                                                  default_interval_s=30)
    assert derive(base) == "converged"
    assert derive(base, cur=3) == "pending"
    assert derive({**base, "last_seen": now - 100}) == "offline"
    assert derive({**base, "offline_runs": 2}) == "enforcing-from-cache"
    assert derive({**base, "last_run": {"counts": {"failed": 1}, "serial": 2}}) == "failed"
    assert derive({**base, "last_run": None}) == "pending"
    assert 0 <= fleet.splay_for("abc", 60) < 60 and fleet.splay_for("abc", 60) == fleet.splay_for("abc", 60)


def test_spanner_status_without_spanner_says_how_to_turn_it_on(tmp_path):
    from vigo.errors import ConfigError

    partition = Partition(tmp_path / "p")
    with pytest.raises(ConfigError, match="spanner is not on for partition p0: list the bolts' hosts"):
        partition.admin("spanner.status", {})


def test_token_install_refuses_malformed_records_and_installs_a_good_one(tmp_path):
    from vigo.server.admissions import hash_token

    partition = Partition(tmp_path / "p")
    good = {"id": "t1", "hash": hash_token("vigo_secret"), "created_at": time.time(),
            "expires_at": time.time() + 60, "uses": 2}
    for bad in ({**good, "hash": "xyz"}, {**good, "uses": 0}, {**good, "uses": True}, {**good, "id": ""}):
        with pytest.raises(ProtocolError, match=r"token\.install expects"):
            partition.admin("token.install", bad)
    assert partition.admin("token.install", good) == {"id": "t1"}
    assert [t["id"] for t in partition.admin("token.list", {})] == ["t1"]
