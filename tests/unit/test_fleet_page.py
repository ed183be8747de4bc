"""The fleet's status as SQL (counts and filtered pages answered by the database) against its
Python definition, and `envoys.page`: paging, sorting, filters and refusals, on a real store."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vigo.config import ServerConfig
from vigo.errors import ProtocolError
from vigo.server import fleet
from vigo.server.partition import Partition

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    cfg = ServerConfig.local(d, port=0)
    cfg.archive.url = ""
    p = Partition(d, cfg)
    yield p
    p.close()


def insert(part: Partition, rows: list[dict]) -> None:
    with part.store.write() as db:
        db.execute("DELETE FROM envoys")
        for r in rows:
            db.execute(
                "INSERT INTO envoys(id, hostname, joined_at, revoked_at, traits, last_seen, interval_s, serial, "
                "queue_depth, offline_runs, last_run) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (r["id"], r["hostname"], NOW - 1e5, r.get("revoked_at"), json.dumps(r.get("traits") or {}),
                 r.get("last_seen"), r.get("interval_s"), r.get("serial"), r.get("queue_depth", 0),
                 r.get("offline_runs", 0), json.dumps(r["last_run"]) if r.get("last_run") is not None else None))


last_runs = st.one_of(st.none(), st.fixed_dictionaries({
    "offline": st.sampled_from([False, False, True]),
    "serial": st.one_of(st.none(), st.integers(0, 5)),
    "counts": st.fixed_dictionaries({"ok": st.integers(0, 3), "changed": st.integers(0, 3),
                                     "failed": st.integers(0, 2), "skipped": st.just(0)}),
}))
envoy_rows = st.lists(st.fixed_dictionaries({
    "revoked_at": st.sampled_from([None, None, None, NOW - 50]),
    # Mostly recent: the rule's later branches are only reached by envoys that are not offline.
    "last_seen": st.one_of(st.none(), st.just(NOW - 10), st.just(NOW - 10), st.floats(NOW - 2000, NOW)),
    "interval_s": st.sampled_from([None, 0.0, 30.0, 300.0, 300.0]),
    "offline_runs": st.sampled_from([0, 0, 0, 1, 2]),
    "serial": st.one_of(st.none(), st.integers(0, 5)),
    "last_run": last_runs,
}), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=envoy_rows, current=st.one_of(st.none(), st.integers(1, 5)))
def test_sql_status_is_the_python_status(part, rows, current):
    """Every combination of the fields the rule reads: the database's answer (counts and the
    status of each row on a page) equals status_of's, envoy by envoy."""
    for i, r in enumerate(rows):
        r.update(id=f"{i:04d}" + uuid.uuid4().hex[:8], hostname=f"h{i:04d}")
    insert(part, rows)
    part.fleet.current_serial = lambda: current
    expected = {r["id"]: part.fleet.status_of({**r, "last_run": r["last_run"]}, NOW, current) for r in rows}
    counts, total, _ = part.fleet.status_counts(now=NOW)
    assert total == len(rows)
    assert {s: n for s, n in counts.items() if n} == {
        s: n for s in fleet.STATUS_ORDER if (n := sum(1 for v in expected.values() if v == s))}
    params = part.fleet._status_params(NOW)
    got = dict(part.store.query(f"SELECT id, {fleet.status_sql()} FROM envoys", params))
    assert got == expected


@pytest.fixture()
def fleet_of_250(part):
    """250 envoys: every 10th failed, every 25th revoked, hostnames web-000..web-249."""
    part.fleet.current_serial = lambda: 2
    rows = []
    for i in range(250):
        failed = 1 if i % 10 == 3 else 0
        rows.append({"id": f"{i:03d}{uuid.uuid4().hex[:29]}", "hostname": f"web-{i:03d}" if i % 2 else f"db-{i:03d}",
                     "revoked_at": NOW if i % 25 == 0 else None, "last_seen": 1e12, "interval_s": 30.0,
                     "serial": 2 if i % 7 else 1, "queue_depth": i % 3,
                     "traits": {"os": {"name": "debian" if i % 4 else "rhel"}, "cpus": i % 8},
                     "last_run": {"offline": False, "serial": 2 if i % 7 else 1,
                                  "counts": {"ok": 1, "changed": 0, "failed": failed, "skipped": 0}}})
    insert(part, rows)
    return rows


def test_counts_come_in_precedence_order_and_add_up(part, fleet_of_250):
    counts, total, queued = part.fleet.status_counts()
    assert list(counts) == list(fleet.STATUS_ORDER) == ["revoked", "offline", "enforcing-from-cache", "failed",
                                                        "pending", "converged"]
    assert total == 250 and sum(counts.values()) == 250
    assert counts["revoked"] == 10 and queued == sum(i % 3 for i in range(250))
    assert part.fleet.summary()["status_counts"] == counts


def test_pages_cover_every_match_once_in_order(part, fleet_of_250):
    seen = []
    first = part.fleet.page(per_page=40)
    assert (first["total"], first["pages"]) == (250, 7)
    for n in range(1, first["pages"] + 1):
        seen += [r["hostname"] for r in part.fleet.page(page=n, per_page=40)["rows"]]
    assert seen == sorted(r["hostname"] for r in fleet_of_250)
    desc = part.fleet.page(per_page=5, sort="hostname", order="desc")["rows"]
    assert [r["hostname"] for r in desc] == sorted((r["hostname"] for r in fleet_of_250), reverse=True)[:5]
    by_status = part.fleet.page(per_page=500, sort="status")["rows"]
    ranks = [fleet.STATUS_ORDER.index(r["status"]) for r in by_status]
    assert ranks == sorted(ranks) and by_status[0]["status"] == "revoked"


def test_filters_match_the_rule_and_combine(part, fleet_of_250):
    failed = part.fleet.page(status="failed", per_page=500)
    counts, _, _ = part.fleet.status_counts()
    assert failed["total"] == counts["failed"] == len(failed["rows"]) > 0
    assert all(r["status"] == "failed" for r in failed["rows"])
    web = part.fleet.page(hostname="WEB-1", per_page=500)
    assert web["total"] == len([r for r in fleet_of_250 if r["hostname"].startswith("web-1")])
    assert part.fleet.page(hostname="%", per_page=500)["total"] == 0  # no LIKE wildcards
    rhel = part.fleet.page(trait="os.name=rhel", per_page=500)
    assert rhel["total"] == len([r for r in fleet_of_250 if r["traits"]["os"]["name"] == "rhel"])
    assert part.fleet.page(trait="cpus=3", per_page=500)["total"] == len([i for i in range(250) if i % 8 == 3])
    old = part.fleet.page(serial=1, status="pending", per_page=500)
    assert old["total"] > 0 and all(r["serial"] == 1 and r["status"] == "pending" for r in old["rows"])
    assert old["filters"] == {"status": "pending", "hostname": None, "serial": 1, "trait": None}
    assert "traits" not in old["rows"][0]  # a page row is light: traits are on the envoy's own page


@pytest.mark.parametrize(("args", "code", "message"), [
    ({"page": 0}, "bad_body", "page must be a whole number from 1, got 0"),
    ({"per_page": 501}, "bad_body", "per_page must be a whole number in 1..500, got 501"),
    ({"page": 99}, "not_found", "page 99 is past the last page (1) of 250 envoys"),
    ({"status": "down"}, "bad_body", "status must be one of revoked, offline"),
    ({"sort": "traits"}, "bad_body", "sort must be one of hostname, id, status"),
    ({"order": "up"}, "bad_body", "order must be asc or desc"),
    ({"trait": "os.name"}, "bad_body", "trait filter must be PATH=VALUE"),
    ({"trait": "os') OR 1=1 --=x"}, "bad_body", "trait filter must be PATH=VALUE"),
    ({"hostname": "x" * 201}, "bad_body", "hostname filter is 201 characters; at most 200"),
])
def test_bad_page_requests_say_what_is_allowed(part, fleet_of_250, args, code, message):
    args = {"per_page": 500, **args}
    with pytest.raises(ProtocolError) as err:
        part.admin("envoys.page", args)
    assert err.value.code == code and message in err.value.reason


def test_an_empty_fleet_has_one_empty_page(part):
    insert(part, [])
    page = part.admin("envoys.page", {})
    assert (page["total"], page["pages"], page["rows"]) == (0, 1, [])
