"""Durations as operators write them: `500ms`, `5s`, `1m30s`, `1h`."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_EXPECTED = "a duration such as '500ms', '5s', '1m30s', '1h'"


def parse_duration(text: object) -> float:
    """Seconds in `text`; raises ValueError naming the expected form."""
    if not isinstance(text, str):
        raise ValueError(f"expected {DURATION_EXPECTED}")
    s = text.strip()
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(f"expected {DURATION_EXPECTED}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"expected {DURATION_EXPECTED}")
    return total
