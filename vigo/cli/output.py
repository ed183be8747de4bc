"""Tables for people, JSON for scripts: the one place vigocli formats output."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from vigo.timefmt import stamp


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=_default) + "\n")


def _default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned table; an empty list says so instead of printing only headers."""
    if not rows:
        return "(none)"
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    delta = (now or time.time()) - ts
    if delta < 0:
        return "just now"
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600)):
        if delta < limit:
            return f"{delta / size:.0f} {unit} ago"
    return f"{delta / 86400:.1f} d ago"


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return stamp(ts)


def kv(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {'-' if v is None else v}" for k, v in rows)
