"""What each console page shows, as plain data: the query strings it accepts (checked, with a
message naming the parameter, what it allows and what arrived) and the shape of each page built
from admin-operation answers. No I/O here: vigo/console/app.py serves these, the same dict as
HTML (a template) and as JSON.

The console imports nothing of the server (tests/unit/test_architecture.py holds it): it knows
the fleet only through the admin operations' answers, like vigocli. So the statuses, their
order of precedence and their counts come from the ``status`` answer, and a filter the server
does not accept is refused by the server's own check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from vigo.errors import BadQueryError as BadQuery

#: Longest request target (path and query string) the console reads, characters.
MAX_TARGET_CHARS = 2048
#: Longest value of one query parameter, characters.
MAX_PARAM_CHARS = 200
#: Largest page number or serial a query may carry (SQLite integers stop at 2**63).
MAX_WHOLE = 2**62
#: Envoy ids are uuid4 hex (32) or a prefix of one; anything longer is refused before a lookup.
MAX_ENVOY_ID_CHARS = 64
#: Runs shown on an envoy's page by default, and at most.
DEFAULT_RUNS = 10
MAX_RUNS = 100


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int or str
    minimum: int = 0
    maximum: int = MAX_WHOLE


ENVOYS_QUERY = (Param("page", int, 1), Param("per_page", int, 1, 500), Param("status", str), Param("hostname", str),
                Param("serial", int, 0), Param("trait", str), Param("sort", str), Param("order", str))
ENVOY_QUERY = (Param("runs", int, 0, MAX_RUNS),)


def parse_query(items: list[tuple[str, str]], allowed: tuple[Param, ...]) -> dict[str, Any]:
    """The query string's parameters by name, converted; empty values are left out (a form's
    blank field). Unknown or repeated parameters and bad values are a BadQuery."""
    known = {p.name: p for p in allowed}
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for name, raw in items:
        param = known.get(name)
        if param is None:
            names = ", ".join(known) or "none"
            raise BadQuery(f"unknown query parameter {name[:40]!r}; this page takes: {names}")
        if name in seen:
            raise BadQuery(f"query parameter {name} is given more than once")
        seen.add(name)
        if len(raw) > MAX_PARAM_CHARS:
            raise BadQuery(f"query parameter {name} is {len(raw)} characters long; at most {MAX_PARAM_CHARS}")
        if raw == "":
            continue
        if param.kind is int:
            if not raw.isascii() or not raw.isdigit():
                raise BadQuery(f"{name} must be a whole number in {param.minimum}..{param.maximum}, got {raw[:40]!r}")
            value = int(raw)
            if not param.minimum <= value <= param.maximum:
                raise BadQuery(f"{name} must be a whole number in {param.minimum}..{param.maximum}, got {value}")
            out[name] = value
        else:
            out[name] = raw
    return out


def check_envoy_id(envoy_id: str) -> str:
    if not envoy_id or len(envoy_id) > MAX_ENVOY_ID_CHARS or not all(c.isalnum() or c in "-_" for c in envoy_id):
        raise BadQuery(f"an envoy id is 1..{MAX_ENVOY_ID_CHARS} letters, digits, '-' or '_', got {envoy_id[:70]!r}")
    return envoy_id


def envoys_link(**params: Any) -> str:
    """The envoys list's URL with these filters (None and empty values left out)."""
    query = {k: v for k, v in params.items() if v not in (None, "")}
    return "/envoys" + ("?" + urlencode(query) if query else "")


# --- pages ------------------------------------------------------------------------------------


def overview(status: dict[str, Any]) -> dict[str, Any]:
    """Envoys by status, in the server's order of precedence, each with the link to its list."""
    counts = status.get("status_counts") or {}
    return {
        "partition": status.get("partition"),
        "term": status.get("term"),
        "primary": status.get("primary"),
        "envoys": status.get("envoys", 0),
        "statuses": [{"status": name, "count": n, "href": envoys_link(status=name)} for name, n in counts.items()],
        "bundle": status.get("bundle"),
        "queued_reports": status.get("queued_reports", 0),
        "runs_stored": status.get("runs_stored", 0),
    }


def envoys(page: dict[str, Any], query: dict[str, Any]) -> dict[str, Any]:
    """One page of the envoys list, with the links to the pages around it and to each sort."""
    filters = {k: v for k, v in (page.get("filters") or {}).items() if v is not None}
    base = {**filters, "sort": page["sort"], "order": page["order"], "per_page": page["per_page"]}
    number, pages = page["page"], page["pages"]

    def at(n: int) -> str:
        return envoys_link(**base, page=n)

    def sorted_by(key: str) -> str:
        order = "desc" if page["sort"] == key and page["order"] == "asc" else "asc"
        return envoys_link(**filters, sort=key, order=order, per_page=page["per_page"])

    return {
        **{k: page[k] for k in ("page", "per_page", "pages", "total", "sort", "order")},
        "filters": filters,
        "statuses": page.get("statuses") or [],
        "rows": [{**row, "href": f"/envoys/{row['id']}"} for row in page["rows"]],
        "links": {"first": at(1), "prev": at(number - 1) if number > 1 else None,
                  "next": at(number + 1) if number < pages else None, "last": at(pages)},
        "sort_links": {key: sorted_by(key) for key in ("hostname", "status", "last_seen", "serial", "queue_depth")},
        "query": query,
    }


def envoy(record: dict[str, Any]) -> dict[str, Any]:
    """One envoy. Only what an operator needs is carried over, so no field added to the record
    later can reach the page unnoticed; secrets never are in it (the envoy redacts them from
    messages and diffs before a report leaves the host)."""
    keep = ("id", "hostname", "status", "joined_at", "revoked_at", "last_seen", "interval_s", "bundle_version",
            "serial", "term", "queue_depth", "oldest_queued_at", "offline_runs", "last_run", "run_count")
    out = {k: record.get(k) for k in keep}
    out["traits"] = record.get("traits") or {}
    certs = record.get("certs") or []
    out["certs"] = certs
    current = next((c for c in certs if not c.get("revoked_at")), None)
    out["cert_expires_at"] = current["not_after"] if current else None
    out["renewals"] = max(0, len(certs) - 1)
    out["runs"] = [{
        **{k: run.get(k) for k in ("run_id", "kind", "started_at", "finished_at", "received_at", "bundle_version",
                                   "serial", "term", "noop", "offline", "counts")},
        "resources": [{k: r.get(k) for k in ("id", "type", "policy", "status", "message", "duration_s",
                                             "changes", "diff", "notified_by") if k in r}
                      for r in run.get("resources") or [] if isinstance(r, dict)],
    } for run in record.get("runs") or []]
    return out


def topology(status: dict[str, Any], gateways: list[dict[str, Any]]) -> dict[str, Any]:
    """The partition, its primary and standbys, the archive, and every gateway."""
    replication = status.get("replication") or {"mode": "none", "standbys": []}
    stream = status.get("stream") or {}
    placement = status.get("placement") or {}
    return {
        "partition": status.get("partition"),
        "term": status.get("term"),
        "primary": status.get("primary"),
        "data_dir": status.get("data_dir"),
        "replication": {"mode": replication.get("mode"), "head": replication.get("head"),
                        "standbys": [{k: s.get(k) for k in ("name", "position", "lag_bytes", "lag_s", "in_sync",
                                                            "needs_snapshot", "last_error")}
                                     for s in replication.get("standbys") or []]},
        "stream_position": stream.get("position"),
        "archive": stream.get("archive"),
        "archive_error": stream.get("archive_error"),
        "gateways": gateways,
        "pending": placement.get("pending") or [],
        "placement_error": placement.get("error"),
    }


def stack(show: dict[str, Any] | None) -> dict[str, Any]:
    """The current bundle and the last pushes, each with the link to the envoys that report it."""
    if not show:
        return {"current": None, "history": []}
    summary = show.get("summary") or {}
    return {
        "current": {"serial": show.get("serial"), "version": show.get("version"), "term": show.get("term"),
                    "pushed_at": show.get("pushed_at"), "policies": summary.get("policies"),
                    "resources": summary.get("resources"), "secrets": summary.get("secrets") or []},
        "history": [{**h, "href": envoys_link(serial=h["serial"])} for h in show.get("history") or []],
    }
