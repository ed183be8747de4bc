"""Spanner's routing and merging, without Ray: which bolt an envoy request belongs to, and how
the answers of several bolts to one admin operation become one. The gateway's spanner backend
(vigo/actors/spanner.py) asks the bolts and uses these.

A request is routed by its envoy id; a join has none yet, so it goes by its token's hash and
one bolt counts a token's uses. Ownership itself (rendezvous hashing over live bolts, with
suspicion and flap damping) is vigo.roster.ownership.
"""

from __future__ import annotations

from typing import Any

from vigo.roster import Ownership
from vigo.server.admissions import hash_token


def slice_key(item: dict[str, Any]) -> str:
    """The key whose owner serves an envoy request: its envoy id, or for a join its token's hash."""
    if item.get("envoy_id"):
        return str(item["envoy_id"])
    token = (item.get("body") or {}).get("token")
    return "join:" + (hash_token(token) if isinstance(token, str) else "")


def token_record(token: dict[str, Any], now: float) -> dict[str, Any]:
    """What the other live bolts install for a join token created at one bolt: its hash, never
    the token."""
    return {"id": token["id"], "hash": hash_token(token["token"]), "created_at": now,
            "expires_at": token["expires_at"], "uses": token["uses"], "note": token.get("note", "")}


def all_or_error(results: dict[str, dict[str, Any]], configured: list[str]) -> dict[str, Any]:
    """A write every live bolt must apply: the first failure, or the first answer with which
    bolts applied it and which configured ones missed it."""
    failed = {b: r["error"] for b, r in results.items() if "error" in r}
    if failed:
        bolt, err = next(iter(failed.items()))
        return {"error": {"code": err.get("code", "conflict"),
                          "reason": f"bolt {bolt}: {err.get('reason')} ({len(failed)} of {len(results)} bolts failed)"}}
    answer = dict(next(iter(results.values()))["ok"] or {})
    answer["bolts"] = sorted(results)
    answer["bolts_missed"] = sorted(set(configured) - set(results))
    return {"ok": answer}


def merge_envoys(results: dict[str, dict[str, Any]], ownership: Ownership) -> list[dict[str, Any]]:
    """One row per envoy: the freshest record among the bolts that served it, with its owner."""
    rows: dict[str, dict[str, Any]] = {}
    for bolt, result in results.items():
        for row in result.get("ok") or []:
            seen = rows.get(row["id"])
            if seen is None or (row.get("last_seen") or 0) > (seen.get("last_seen") or 0):
                rows[row["id"]] = {**row, "bolt": bolt}
    for row in rows.values():
        row["owner"] = ownership.owner(row["id"])
    return sorted(rows.values(), key=lambda r: r["id"])


def merge_show(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An envoy's record from the bolt that saw it last, with its runs from every bolt (its
    history after a move is spread over the bolts that served it)."""
    found = [(b, r["ok"]) for b, r in results.items() if "ok" in r]
    if not found:
        return next(iter(results.values()))
    bolt, best = max(found, key=lambda br: br[1].get("last_seen") or 0)
    runs = sorted((run | {"bolt": b} for b, rec in found for run in rec.get("runs") or []),
                  key=lambda r: r.get("started_at") or 0, reverse=True)
    return {"ok": {**best, "runs": runs, "served_by": sorted(b for b, _ in found), "bolt": bolt}}
