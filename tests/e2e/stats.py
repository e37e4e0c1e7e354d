"""Figures from the load generator's records (pure functions: no testbed needed).

A `Record` is one line of load.py's CSV. `summarize` gives a window's requests, failures,
client retries, p50/p99 and where the answers came from; `moved_after` says when traffic
stopped reaching a cluster; `slope` fits a line through a series (the soak's RSS and fds).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIELDS_HEADER = "t,kind,target,ok,attempts,lat_ms,first_error,cluster,status"  # load.py's CSV


@dataclass(frozen=True, slots=True)
class Record:
    t: float
    kind: str  # ka | new | dns
    target: str
    ok: bool
    attempts: int
    lat_ms: float
    first_error: str
    cluster: str
    status: int


def read_records(path: Path) -> list[Record]:
    """Every complete line of the CSV so far (the writer appends while we read)."""
    out: list[Record] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]  # a line being written
    for row in csv.DictReader(lines):
        try:
            out.append(Record(float(row["t"]), row["kind"], row["target"], row["ok"] == "1",
                              int(row["attempts"]), float(row["lat_ms"]),
                              row["first_error"] or "", row["cluster"] or "",
                              int(row["status"] or 0)))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    requests: int
    failed: int  # no answer after the client's retry
    retried: int  # the first try failed (the retry may have succeeded)
    p50_ms: float
    p99_ms: float
    max_ms: float
    clusters: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # first errors by reason

    def share(self, cluster: str) -> float:
        total = sum(self.clusters.values())
        return self.clusters.get(cluster, 0) / total if total else 0.0

    def to_json(self) -> dict[str, object]:
        return {"requests": self.requests, "failed": self.failed, "retried": self.retried,
                "p50_ms": round(self.p50_ms, 2), "p99_ms": round(self.p99_ms, 2),
                "max_ms": round(self.max_ms, 2), "clusters": dict(self.clusters),
                "errors": dict(self.errors)}


def select(records: Iterable[Record], t0: float = -math.inf, t1: float = math.inf,
           kinds: Iterable[str] = ("ka", "new"), targets: Iterable[str] | None = None,
           ) -> list[Record]:
    """Records started in [t0, t1) of these kinds (and targets)."""
    kinds = frozenset(kinds)
    wanted = frozenset(targets) if targets is not None else None
    return [r for r in records if t0 <= r.t < t1 and r.kind in kinds
            and (wanted is None or r.target in wanted)]


def summarize(records: Sequence[Record]) -> Summary:
    lat = [r.lat_ms for r in records if r.ok]
    return Summary(
        requests=len(records),
        failed=sum(not r.ok for r in records),
        retried=sum(r.attempts > 1 for r in records),
        p50_ms=percentile(lat, 50),
        p99_ms=percentile(lat, 99),
        max_ms=max(lat, default=0.0),
        clusters=dict(Counter(r.cluster for r in records if r.ok and r.cluster)),
        errors=dict(Counter(r.first_error for r in records if r.first_error)),
    )


def moved_after(records: Sequence[Record], since: float, cluster: str) -> float | None:
    """Seconds from `since` to the start of the last request answered by `cluster` (0 if none
    was): when traffic had moved away from it. None if none was answered at all after."""
    after = [r for r in records if r.t >= since and r.ok]
    if not after:
        return None
    last = max((r.t for r in after if r.cluster == cluster), default=since)
    return last - since


def first_answer_from(records: Sequence[Record], since: float, cluster: str) -> float | None:
    """Seconds from `since` to the first request answered by `cluster` after it."""
    ts = [r.t for r in records if r.t >= since and r.ok and r.cluster == cluster]
    return min(ts) - since if ts else None


def slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of ys over xs and its standard error (0, 0 for < 3 points)."""
    n = len(xs)
    if n < 3 or n != len(ys):
        return 0.0, 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    resid = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    se = math.sqrt(resid / (n - 2) / sxx)
    return b, se
