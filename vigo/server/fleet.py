"""Envoy records, check-ins and run reports: the fleet as the primary sees it.

Status is derived when asked, never stored, so it cannot go stale:

    offline               not heard from for `offline_after_intervals` of its interval
    enforcing-from-cache  heard from, but its queued reports show runs made offline, or its
                          newest reported run was made offline
    failed                its last run had a failed resource
    pending               it has not yet run the current bundle (or never ran)
    converged             its last run applied the current bundle with nothing failed

Earlier rows win: an envoy that is offline is shown offline whatever its last run said. A
revoked envoy is `revoked` before all of them. ``STATUS_ORDER`` is that precedence, and
``status_sql`` is the same rule as one SQL expression, so counts and filtered pages are answered
by the database (an aggregate over the envoys table, never every row loaded into Python); a
unit test holds the two definitions equal.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import apsw
import msgpack

from vigo.config import ServerConfig
from vigo.errors import ProtocolError
from vigo.state.store import Store

OFFLINE = "offline"
FROM_CACHE = "enforcing-from-cache"
FAILED = "failed"
PENDING = "pending"
CONVERGED = "converged"
REVOKED = "revoked"
STATUSES = (OFFLINE, FROM_CACHE, FAILED, PENDING, CONVERGED)
#: Every status an operator sees, in order of precedence (the first that applies wins).
STATUS_ORDER = (REVOKED, *STATUSES)

#: Longest run id accepted; run ids are uuid4 hex (32) or summary-<uuid4 hex>.
MAX_RUN_ID_CHARS = 128
#: Largest run report stored, bytes (a 1,000-resource report is ~150 KB).
MAX_REPORT_BYTES = 2 * 1024 * 1024
#: Reports one `results` message may carry.
MAX_REPORTS_PER_MESSAGE = 500
#: Most runs `envoys show` returns in full (each carries its resources).
MAX_SHOWN_RUNS = 1000
#: Most envoys one page of `envoys.page` returns.
MAX_PAGE_SIZE = 500
#: Columns `envoys.page` sorts by (each ties broken by id, so pages never overlap).
SORT_KEYS = ("hostname", "id", "status", "last_seen", "serial", "queue_depth", "joined_at")
#: Longest hostname or trait filter accepted, characters.
MAX_FILTER_CHARS = 200
_TRAIT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}(\.[A-Za-z_][A-Za-z0-9_-]{0,63}){0,7}$")

_ENVOY_COLUMNS = (
    "id", "hostname", "joined_at", "revoked_at", "traits", "last_seen", "interval_s",
    "bundle_version", "serial", "term", "queue_depth", "oldest_queued_at", "offline_runs", "last_run",
)
#: What one row of a listing page carries (no traits: they are on the envoy's own page).
_LIST_COLUMNS = ("id", "hostname", "joined_at", "revoked_at", "last_seen", "bundle_version", "serial",
                 "queue_depth", "oldest_queued_at", "offline_runs", "last_run")


def splay_for(envoy_id: str, splay_s: float) -> float:
    """A deterministic per-envoy offset in [0, splay_s): the same host always runs at the same
    point of the interval, and a fleet spreads evenly over it."""
    if splay_s <= 0:
        return 0.0
    h = int.from_bytes(hashlib.sha256(envoy_id.encode()).digest()[:8], "big")
    return (h / 2**64) * splay_s


def derive_status(envoy: dict[str, Any], *, now: float, current_serial: int | None, offline_after_intervals: int,
                  default_interval_s: float) -> str:
    interval = envoy.get("interval_s") or default_interval_s
    last_seen = envoy.get("last_seen")
    if last_seen is None or now - last_seen > offline_after_intervals * interval:
        return OFFLINE
    last_run = envoy.get("last_run") or {}
    if (envoy.get("offline_runs") or 0) > 0 or last_run.get("offline"):
        # Offline runs still queued on the envoy, or its newest reported run was made without
        # a server (it stays so until an online run is reported).
        return FROM_CACHE
    if not last_run:
        return PENDING
    if (last_run.get("counts") or {}).get("failed"):
        return FAILED
    if current_serial is not None and (last_run.get("serial") or 0) < current_serial:
        return PENDING
    return CONVERGED


def status_sql() -> str:
    """``FleetCore.status_of`` as one SQL expression over a row of ``envoys``, with the named
    parameters :now, :current (the current serial or NULL), :after (offline_after_intervals)
    and :interval (the default interval). Same order, same tests, same arithmetic."""
    no_run = "(last_run IS NULL OR last_run IN ('', 'null', '{}'))"
    return (
        "CASE"
        f" WHEN revoked_at IS NOT NULL THEN '{REVOKED}'"
        f" WHEN last_seen IS NULL OR :now - last_seen > :after * COALESCE(NULLIF(interval_s, 0), :interval)"
        f" THEN '{OFFLINE}'"
        f" WHEN COALESCE(offline_runs, 0) > 0 OR (NOT {no_run} AND COALESCE(json_extract(last_run, '$.offline'), 0))"
        f" THEN '{FROM_CACHE}'"
        f" WHEN {no_run} THEN '{PENDING}'"
        f" WHEN COALESCE(json_extract(last_run, '$.counts.failed'), 0) != 0 THEN '{FAILED}'"
        f" WHEN :current IS NOT NULL AND COALESCE(json_extract(last_run, '$.serial'), 0) < :current"
        f" THEN '{PENDING}'"
        f" ELSE '{CONVERGED}' END")


def record_checkin(db: apsw.Connection, envoy_id: str, body: dict[str, Any], *, interval_s: float, now: float) -> None:
    db.execute(
        "UPDATE envoys SET traits = ?, last_seen = ?, interval_s = ?, bundle_version = ?, serial = ?, "
        "term = ?, queue_depth = ?, oldest_queued_at = ?, offline_runs = ?, "
        "last_run = COALESCE(?, last_run) WHERE id = ?",
        (
            json.dumps(body.get("traits") or {}, sort_keys=True), now, interval_s,
            body.get("bundle_version"), int(body.get("serial") or 0), int(body.get("term") or 0),
            int(body.get("queue_depth") or 0), body.get("oldest_queued_at"),
            int(body.get("offline_runs") or 0),
            json.dumps(run_summary(body["last_run"])) if isinstance(body.get("last_run"), dict) else None, envoy_id,
        ),
    )


def store_reports(db: apsw.Connection, envoy_id: str, reports: list[Any], *, now: float) -> tuple[list[str], int]:
    """Insert reports idempotently by run id; return the ids now stored (new or already there)
    and how many offline runs they stand for.

    Offline runs are counted whether new or already stored: an envoy resends a batch only after
    it lost the acknowledgement, reconnected and checked in again, and that check-in counted
    the batch's offline runs as still queued (the caller's decrement is floored at 0).

    A report whose envoy_id names another envoy is refused: an envoy speaks only for itself.
    """
    if len(reports) > MAX_REPORTS_PER_MESSAGE:
        raise ProtocolError("bad_body", f"results carries {len(reports)} reports; at most {MAX_REPORTS_PER_MESSAGE} per message")
    acked: list[str] = []
    offline_new = 0
    for report in reports:
        run_id = _check_report(report, envoy_id)
        packed = msgpack.packb(report, use_bin_type=True)
        if len(packed) > MAX_REPORT_BYTES:
            raise ProtocolError("bad_body", f"report {run_id} is {len(packed)} bytes; the limit is {MAX_REPORT_BYTES}")
        counts = report.get("counts") or {}
        db.execute(
            "INSERT INTO runs(run_id, envoy_id, kind, started_at, finished_at, received_at, bundle_version, "
            "serial, term, noop, offline, ok, changed, failed, skipped, report) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(envoy_id, run_id) DO NOTHING",
            (
                run_id, envoy_id, str(report.get("kind") or "run"),
                report.get("started_at") if report.get("kind") != "summary" else report.get("first_started_at"),
                report.get("finished_at") if report.get("kind") != "summary" else report.get("last_started_at"),
                now, report.get("bundle_version"), report.get("serial"), report.get("term"),
                int(bool(report.get("noop"))),
                int(report.get("offline") if report.get("kind") == "summary" else bool(report.get("offline"))),
                int(counts.get("ok", 0)), int(counts.get("changed", 0)),
                int(counts.get("failed", 0)), int(counts.get("skipped", 0)),
                packed,
            ),
        )
        if report.get("offline"):
            offline_new += int(report.get("offline")) if report.get("kind") == "summary" else 1
        acked.append(run_id)
    return acked, offline_new


def _check_report(report: Any, envoy_id: str) -> str:
    if not isinstance(report, dict):
        raise ProtocolError("bad_body", f"a report must be a map, got {type(report).__name__}")
    run_id = report.get("run_id")
    if not isinstance(run_id, str) or not run_id or len(run_id) > MAX_RUN_ID_CHARS:
        raise ProtocolError("bad_body", f"report run_id must be a string of 1..{MAX_RUN_ID_CHARS} chars, got {run_id!r:.80}")
    sender = report.get("envoy_id")
    if sender not in (None, "", envoy_id):
        raise ProtocolError("forbidden", f"report {run_id} names envoy {sender!r}; this connection is envoy {envoy_id!r}")
    counts = report.get("counts")
    if counts is not None and not (isinstance(counts, dict) and all(isinstance(v, int) for v in counts.values())):
        raise ProtocolError("bad_body", f"report {run_id} counts must map status to whole numbers")
    return run_id


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """The fields of a run the server keeps on the envoy's record, each checked for its type:
    what an envoy sends is data to validate, never trusted to have the right shape."""

    def num(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    counts = run.get("counts") if isinstance(run.get("counts"), dict) else {}
    return {
        "run_id": str(run.get("run_id") or "")[:MAX_RUN_ID_CHARS],
        "started_at": num(run.get("started_at")),
        "duration_s": num(run.get("duration_s")),
        "bundle_version": str(run["bundle_version"])[:64] if run.get("bundle_version") else None,
        "serial": int(run["serial"]) if isinstance(run.get("serial"), int) and 0 <= run["serial"] < 2**62 else None,
        "term": int(run["term"]) if isinstance(run.get("term"), int) and 0 <= run["term"] < 2**62 else None,
        "offline": bool(run.get("offline")),
        "counts": {k: int(counts.get(k)) if isinstance(counts.get(k), int) and 0 <= counts.get(k) < 2**62 else 0
                   for k in ("ok", "changed", "failed", "skipped")},
    }


def note_latest_run(db: apsw.Connection, envoy_id: str, reports: list[Any]) -> None:
    """Make the newest real (not noop, not summary) run in this batch the envoy's last run, if it
    is newer than the one on record: its status then reflects what it actually applied."""
    runs = [r for r in reports if isinstance(r, dict) and r.get("kind", "run") == "run" and not r.get("noop")]
    if not runs:
        return
    summary = max((run_summary(r) for r in runs), key=lambda r: r["started_at"] or 0.0)
    newest = summary
    db.execute(
        "UPDATE envoys SET last_run = ?, bundle_version = COALESCE(?, bundle_version), "
        "serial = MAX(COALESCE(serial, 0), COALESCE(?, 0)) "
        "WHERE id = ? AND COALESCE(json_extract(last_run, '$.started_at'), 0) <= ?",
        (json.dumps(summary), newest.get("bundle_version"), newest.get("serial"), envoy_id,
         newest.get("started_at") or 0),
    )


def apply_retention(db: apsw.Connection, envoy_id: str, *, keep: int, max_age_s: float, now: float) -> int:
    """Delete this envoy's runs beyond the newest ``keep`` and those started more than
    ``max_age_s`` ago. Both are index range deletes on (envoy_id, started_at): this runs with
    every results batch, so its cost must not grow with the runs already stored."""
    deleted = 0
    row = db.execute(
        "SELECT started_at FROM runs WHERE envoy_id = ? ORDER BY started_at DESC LIMIT 1 OFFSET ?",
        (envoy_id, keep)).fetchone()
    if row is not None and row[0] is not None:
        db.execute("DELETE FROM runs WHERE envoy_id = ? AND started_at <= ?", (envoy_id, row[0]))
        deleted += db.changes()
    db.execute("DELETE FROM runs WHERE envoy_id = ? AND started_at < ?", (envoy_id, now - max_age_s))
    return deleted + db.changes()


def envoy_rows(store: Store, envoy_id: str | None = None) -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(_ENVOY_COLUMNS)} FROM envoys"
    args: tuple = ()
    if envoy_id is not None:
        # A prefix match by substr, not LIKE: '%' and '_' in an id must not match everything.
        sql += " WHERE id = ? OR substr(id, 1, length(?)) = ?"
        args = (envoy_id, envoy_id, envoy_id)
    sql += " ORDER BY hostname, id"
    return [_decode(dict(zip(_ENVOY_COLUMNS, row, strict=True))) for row in store.query(sql, args)]


def _decode(rec: dict[str, Any]) -> dict[str, Any]:
    if "traits" in rec:
        rec["traits"] = json.loads(rec["traits"]) if rec["traits"] else {}
    rec["last_run"] = json.loads(rec["last_run"]) if rec["last_run"] else None
    return rec


def cert_rows(store: Store, envoy_id: str) -> list[dict[str, Any]]:
    """An envoy's certificates, newest first: the first is the one in force unless revoked."""
    rows = store.query("SELECT serial, issued_at, not_after, revoked_at FROM certs WHERE envoy_id = ? "
                       "ORDER BY issued_at DESC", (envoy_id,))
    return [{"serial": r[0], "issued_at": r[1], "not_after": r[2], "revoked_at": r[3]} for r in rows]


def recent_runs(store: Store, envoy_id: str, limit: int = 10, *, full: bool = False) -> list[dict[str, Any]]:
    rows = store.query(
        "SELECT run_id, kind, started_at, finished_at, received_at, bundle_version, serial, term, noop, offline, "
        "ok, changed, failed, skipped, report FROM runs WHERE envoy_id = ? ORDER BY started_at DESC LIMIT ?",
        (envoy_id, limit),
    )
    out = []
    for r in rows:
        entry = {
            "run_id": r[0], "kind": r[1], "started_at": r[2], "finished_at": r[3], "received_at": r[4],
            "bundle_version": r[5], "serial": r[6], "term": r[7], "noop": bool(r[8]), "offline": r[9],
            "counts": {"ok": r[10], "changed": r[11], "failed": r[12], "skipped": r[13]},
        }
        if full:
            report = msgpack.unpackb(r[14], raw=False)
            entry["resources"] = report.get("resources", [])
            if r[1] == "summary":
                entry["summary"] = {k: report.get(k) for k in ("count", "offline", "first_started_at", "last_started_at")}
        out.append(entry)
    return out


def now() -> float:
    return time.time()


class FleetCore:
    """The fleet of one partition: check-ins and reports written in the batch's transaction,
    and the envoy listings the admin operations read. ``current_serial`` is the stack core's
    (the newest bundle decides whether an envoy is pending)."""

    def __init__(self, store: Store, cfg: ServerConfig, current_serial: Callable[[], int | None]) -> None:
        self.store = store
        self.cfg = cfg
        self.current_serial = current_serial

    # --- envoy requests, inside the batch's transaction -----------------------------------

    def checkin(self, db: apsw.Connection, envoy_id: str, body: dict[str, Any], *, now: float,
                current: int | None, term: int) -> dict[str, Any]:
        interval = self.cfg.checkin.interval_s
        record_checkin(db, envoy_id, body, interval_s=interval, now=now)
        # Only an envoy behind gets the bundle: one ahead (say, after a restore) would refuse
        # an older serial every time, so sending it would only waste the link.
        stale = current is not None and int(body.get("serial") or 0) < current
        return {
            "term": term,
            "interval_s": interval,
            "splay_s": splay_for(envoy_id, self.cfg.checkin.splay_s),
            "bundle_serial": current if stale else None,
            "serial": current or 0,
        }

    def results(self, db: apsw.Connection, envoy_id: str, body: dict[str, Any], *, now: float,
                term: int) -> dict[str, Any]:
        reports = body.get("reports") or []
        acked, offline_stored = store_reports(db, envoy_id, reports, now=now)
        if offline_stored:
            # The check-in counted them as queued offline runs; now they have arrived (or
            # arrived before, and the ack was lost: the check-in since counted them again).
            db.execute("UPDATE envoys SET offline_runs = MAX(0, offline_runs - ?) WHERE id = ?",
                       (offline_stored, envoy_id))
        note_latest_run(db, envoy_id, reports)
        return {"acked": list(dict.fromkeys(acked)), "term": term}

    def retain(self, db: apsw.Connection, envoy_ids: Iterable[str], *, now: float) -> None:
        """Retention for the envoys a batch stored reports for, in the same transaction."""
        retention = self.cfg.retention
        for envoy_id in envoy_ids:
            apply_retention(db, envoy_id, keep=retention.runs_per_envoy,
                            max_age_s=retention.max_age_days * 86400, now=now)

    # --- what operators read ---------------------------------------------------------------

    def status_of(self, envoy: dict[str, Any], now: float, current_serial: int | None) -> str:
        if envoy.get("revoked_at"):
            return "revoked"
        return derive_status(envoy, now=now, current_serial=current_serial,
                             offline_after_intervals=self.cfg.checkin.offline_after_intervals,
                             default_interval_s=self.cfg.checkin.interval_s)

    def summary(self) -> dict[str, Any]:
        """Counts for the partition's status: envoys, envoys per status, reports still queued on
        envoys, runs stored."""
        counts, total, queued = self.status_counts()
        return {
            "envoys": total,
            "status_counts": counts,
            "runs_stored": self.store.one("SELECT COUNT(*) FROM runs")[0],
            "queued_reports": queued,
        }

    def _status_params(self, now: float | None = None) -> dict[str, Any]:
        return {"now": time.time() if now is None else now, "current": self.current_serial(),
                "after": self.cfg.checkin.offline_after_intervals, "interval": self.cfg.checkin.interval_s}

    def status_counts(self, now: float | None = None) -> tuple[dict[str, int], int, int]:
        """(envoys per status in ``STATUS_ORDER``, envoys, reports queued on envoys): one
        aggregate query, whatever the size of the fleet."""
        counts = dict.fromkeys(STATUS_ORDER, 0)
        total = queued = 0
        for status, n, depth in self.store.query(
                f"SELECT {status_sql()} AS status, COUNT(*), SUM(COALESCE(queue_depth, 0)) FROM envoys "
                "GROUP BY status", self._status_params(now)):
            counts[status] = n
            total += n
            queued += depth or 0
        return counts, total, queued

    def page(self, page: int = 1, per_page: int = 50, status: str | None = None, hostname: str | None = None,
             serial: int | None = None, trait: str | None = None, sort: str = "hostname",
             order: str = "asc") -> dict[str, Any]:
        """One page of the envoys, filtered and sorted by the database. ``hostname`` matches a
        part of the name (case-insensitive), ``trait`` is ``path=value`` (``os.name=debian``),
        ``serial`` the bundle serial an envoy last reported. ``total`` counts every match."""
        if not 1 <= per_page <= MAX_PAGE_SIZE:
            raise ProtocolError("bad_body", f"per_page must be a whole number in 1..{MAX_PAGE_SIZE}, got {per_page}")
        if page < 1:
            raise ProtocolError("bad_body", f"page must be a whole number from 1, got {page}")
        if status is not None and status not in STATUS_ORDER:
            raise ProtocolError("bad_body", f"status must be one of {', '.join(STATUS_ORDER)}, got {status!r:.40}")
        if sort not in SORT_KEYS:
            raise ProtocolError("bad_body", f"sort must be one of {', '.join(SORT_KEYS)}, got {sort!r:.40}")
        if order not in ("asc", "desc"):
            raise ProtocolError("bad_body", f"order must be asc or desc, got {order!r:.40}")
        params = self._status_params()
        where = []
        if hostname:
            if len(hostname) > MAX_FILTER_CHARS:
                raise ProtocolError("bad_body", f"hostname filter is {len(hostname)} characters; at most {MAX_FILTER_CHARS}")
            where.append("instr(lower(hostname), lower(:hostname)) > 0")
            params["hostname"] = hostname
        if serial is not None:
            where.append("serial = :serial")
            params["serial"] = serial
        if trait:
            path, eq, value = trait.partition("=")
            if not eq or not _TRAIT_PATH.match(path) or len(trait) > MAX_FILTER_CHARS:
                raise ProtocolError("bad_body", f"trait filter must be PATH=VALUE with a dotted path of names "
                                                f"(os.name=debian), at most {MAX_FILTER_CHARS} characters, got {trait!r:.60}")
            # Compared as text, so 4 matches a trait that is the number 4 or the string "4".
            where.append("CAST(json_extract(traits, :trait_path) AS TEXT) = :trait_value")
            params.update(trait_path="$." + path, trait_value=value)
        inner = (f"SELECT {', '.join(_LIST_COLUMNS)}, {status_sql()} AS status FROM envoys"
                 + (" WHERE " + " AND ".join(where) if where else ""))
        outer = " WHERE status = :status" if status is not None else ""
        params["status"] = status
        total = self.store.one(f"SELECT COUNT(*) FROM ({inner}){outer}", params)[0]
        pages = max(1, -(-total // per_page))
        if page > pages:
            raise ProtocolError("not_found", f"page {page} is past the last page ({pages}) of {total} envoys")
        direction = "DESC" if order == "desc" else "ASC"
        # By status means by precedence (revoked first), not by the alphabet.
        key = ("CASE status " + " ".join(f"WHEN '{st}' THEN {i}" for i, st in enumerate(STATUS_ORDER)) + " END"
               if sort == "status" else sort)
        rows = self.store.query(
            f"SELECT * FROM ({inner}){outer} ORDER BY {key} {direction} NULLS LAST, id {direction} "
            "LIMIT :limit OFFSET :offset", {**params, "limit": per_page, "offset": (page - 1) * per_page})
        return {
            "page": page, "per_page": per_page, "pages": pages, "total": total, "sort": sort, "order": order,
            "filters": {"status": status, "hostname": hostname or None, "serial": serial, "trait": trait or None},
            "statuses": list(STATUS_ORDER),  # what the status filter accepts, in order of precedence
            "rows": [_decode(dict(zip((*_LIST_COLUMNS, "status"), r, strict=True))) for r in rows],
        }

    def listing(self) -> list[dict[str, Any]]:
        now, current = time.time(), self.current_serial()  # once, not once per envoy
        return [{
            "id": e["id"], "hostname": e["hostname"], "status": self.status_of(e, now, current),
            "last_seen": e["last_seen"], "serial": e["serial"], "bundle_version": e["bundle_version"],
            "queue_depth": e["queue_depth"], "oldest_queued_at": e["oldest_queued_at"],
            "offline_runs": e["offline_runs"],
            "last_run": e["last_run"],
        } for e in envoy_rows(self.store)]

    def show(self, envoy_id: str, runs: int) -> dict[str, Any]:
        """One envoy by id or unambiguous id prefix, with its ``runs`` newest runs in full."""
        if not envoy_id:
            raise ProtocolError("bad_body", f"envoy id must be a non-empty string, got {envoy_id!r:.80}")
        if not 0 <= runs <= MAX_SHOWN_RUNS:
            raise ProtocolError("bad_body", f"runs must be a whole number in 0..{MAX_SHOWN_RUNS}, got {runs!r}")
        rows = envoy_rows(self.store, envoy_id)
        if not rows:
            raise ProtocolError("not_found", f"no envoy with id (or id prefix) {envoy_id!r}")
        if len(rows) > 1 and rows[0]["id"] != envoy_id:
            raise ProtocolError("conflict", f"id prefix {envoy_id!r} matches {len(rows)} envoys; give more characters")
        e = rows[0]
        e["status"] = self.status_of(e, time.time(), self.current_serial())
        e["runs"] = recent_runs(self.store, e["id"], limit=runs, full=True)
        e["run_count"] = self.store.one("SELECT COUNT(*) FROM runs WHERE envoy_id = ?", (e["id"],))[0]
        e["certs"] = cert_rows(self.store, e["id"])
        return e
