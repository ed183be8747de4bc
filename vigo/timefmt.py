"""Unix times as text, always UTC: one formatter for messages, logs and answers on both sides,
and its parser. A bottom-layer module (standard library only).

- ``iso(ts)``: ``2026-11-27T10:15:00Z`` (``ms=True``: ``2026-11-27T10:15:00.123Z``; ``utc=
  "+00:00"``: the suffix ``datetime.isoformat`` writes); None is ``-``. Seconds are truncated.
- ``stamp(ts)``: ``2026-11-27 10:15:00 UTC``, what people read in `vigocli` and `vigo-envoy
  status` tables.
- ``parse_iso(text)``: ISO 8601 back to a Unix time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

#: What ``iso`` writes for a time that is not there.
NONE = "-"


def iso(ts: float | None, *, ms: bool = False, utc: str = "Z") -> str:
    """``ts`` (Unix seconds) as ISO 8601 in UTC: ``2026-11-27T10:15:00Z``; ``ms`` adds the
    milliseconds; ``utc`` is the zone suffix; None gives ``-``."""
    if ts is None:
        return NONE
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    if ms:
        text += f".{int(ts * 1000) % 1000:03d}"
    return text + utc


def stamp(ts: float) -> str:
    """``ts`` (Unix seconds) for people: ``2026-11-27 10:15:00 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def parse_iso(text: str) -> float:
    """ISO 8601 (``2026-11-27T10:15:00Z``, with an offset, or naive = UTC) to Unix seconds.
    ValueError (datetime's) when ``text`` is not ISO 8601."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
