"""vigo.timefmt: the one way vigo writes and reads times (the formats messages and tests pin)."""

from __future__ import annotations

import pytest

from vigo.timefmt import iso, parse_iso, stamp

T = 1_750_003_600.987  # 2025-06-15T16:06:40.987Z


def test_iso_formats():
    assert iso(T) == "2025-06-15T16:06:40Z"  # seconds truncated
    assert iso(T, ms=True) == "2025-06-15T16:06:40.987Z"
    assert iso(T, utc="+00:00") == "2025-06-15T16:06:40+00:00"  # as datetime.isoformat writes it
    assert iso(None) == iso(None, ms=True) == "-"
    assert iso(0) == "1970-01-01T00:00:00Z"
    assert stamp(T) == "2025-06-15 16:06:40 UTC"


@pytest.mark.parametrize("text", ["2025-06-15T16:06:40Z", "2025-06-15T16:06:40+00:00", "2025-06-15T18:06:40+02:00",
                                  "2025-06-15T16:06:40"])
def test_parse_iso_reads_what_iso_writes_and_offsets(text):
    assert parse_iso(text) == 1_750_003_600.0
    assert parse_iso(iso(T, ms=True)) == pytest.approx(T, abs=0.001)


def test_parse_iso_refuses_what_is_not_iso():
    with pytest.raises(ValueError):
        parse_iso("yesterday")
