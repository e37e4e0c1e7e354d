"""Durations as operators write them: `500ms`, `5s`, `1m30s`, `1h`.

Every duration has a ceiling: `"<400 nines>s"` is a float infinity, and an infinity (or a
number of days no clock can add to today) stored in the catalog made every later read fail.
"""

from __future__ import annotations

import math
import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_EXPECTED = "a duration such as '500ms', '5s', '1m30s', '1h'"
# No duration anywhere means more than ten years; callers set tighter ceilings per field.
MAX_DURATION = 3650 * 86400.0
MAX_TEXT = 64  # characters: '1m30s' needs five


def parse_duration(text: object, maximum: float = MAX_DURATION) -> float:
    """Seconds in `text`, at most `maximum`; raises ValueError naming what was expected."""
    if not isinstance(text, str) or len(text) > MAX_TEXT:
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
    if not math.isfinite(total) or total > maximum:
        raise ValueError(f"expected a duration of at most {format_limit(maximum)}")
    return total


def format_limit(seconds: float) -> str:
    """A limit the way it would be written: 3650d, 24h, 5m, 1s, 10ms."""
    ms = round(seconds * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
