"""The results queue's records, without LMDB: how the oldest reports fold into one *summary*
record when the queue is over its bound, and what the queue holds, counted.

A summary keeps the count of the reports it folds (and how many were offline runs), their
status totals, their time range and their bundle versions, so a long outage costs detail, never
the fact that runs happened. vigo/agent/cache.py stores the queue and decides when to fold.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: The ``kind`` of a summary record; a report has none.
SUMMARY = "summary"


@dataclass
class QueueStats:
    entries: int
    runs: int  # reports represented, summaries counted by what they fold
    bytes: int
    oldest_started_at: float | None
    newest_started_at: float | None
    summarized_runs: int
    offline_runs: int = 0  # runs made without a server (checkin's offline_runs)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tally(queued: Iterable[tuple[int, Any]]) -> QueueStats:
    """Count the queue from its entries as ``(stored bytes, decoded value)``, oldest first. A
    value that is not a map (or None: it did not decode) counts as an entry and its bytes only;
    pending() and check() quarantine or report it."""
    entries = runs = size = summarized = offline = 0
    oldest = newest = None
    for raw_size, entry in queued:
        entries += 1
        size += raw_size
        if not isinstance(entry, dict):
            continue
        if entry.get("kind") == SUMMARY:
            count = entry.get("count")
            count = count if isinstance(count, int) else 0
            runs += count
            summarized += count
            folded_offline = entry.get("offline")
            offline += folded_offline if isinstance(folded_offline, int) else 0
            first, last = entry.get("first_started_at"), entry.get("last_started_at")
        else:
            runs += 1
            offline += 1 if entry.get("offline") else 0
            first = last = entry.get("started_at")
        if first is not None:
            oldest = first if oldest is None else min(oldest, first)
            newest = last if newest is None else max(newest, last)
    return QueueStats(entries, runs, size, oldest, newest, summarized, offline)


def fold(summary: dict[str, Any] | None, report: dict[str, Any]) -> dict[str, Any]:
    """``summary`` (None: a new one) with one more report folded into it."""
    started = report.get("started_at") or 0.0
    counts = report.get("counts") or {}
    if summary is None:
        summary = {
            "kind": SUMMARY,
            "run_id": f"summary-{uuid.uuid4().hex}",
            "envoy_id": report.get("envoy_id"),
            "count": 0,
            "offline": 0,
            "first_started_at": started,
            "last_started_at": started,
            "counts": {},
            "bundle_versions": [],
        }
    summary["count"] += 1
    summary["offline"] += 1 if report.get("offline") else 0
    summary["first_started_at"] = min(summary["first_started_at"], started)
    summary["last_started_at"] = max(summary["last_started_at"], started)
    for status, n in counts.items():
        summary["counts"][status] = summary["counts"].get(status, 0) + n
    version = report.get("bundle_version")
    if version and version not in summary["bundle_versions"]:
        summary["bundle_versions"].append(version)
    return summary


def merge_summaries(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two summaries as one, under ``a``'s run id."""
    merged = dict(a)
    merged["count"] = a["count"] + b["count"]
    merged["offline"] = a.get("offline", 0) + b.get("offline", 0)
    merged["first_started_at"] = min(a["first_started_at"], b["first_started_at"])
    merged["last_started_at"] = max(a["last_started_at"], b["last_started_at"])
    merged["counts"] = dict(a["counts"])
    for status, n in b["counts"].items():
        merged["counts"][status] = merged["counts"].get(status, 0) + n
    merged["bundle_versions"] = list(dict.fromkeys([*a["bundle_versions"], *b["bundle_versions"]]))
    return merged
