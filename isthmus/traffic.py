"""The last few minutes of traffic, from the gateway's own counters, for the console.

Every `tick` seconds `TrafficHistory.sample` reads the plain totals the gateway keeps per edge
(gateway, source cluster, destination cluster) and per service series (gateway/metrics.py),
and keeps what changed since the previous tick in a ring that spans `span` seconds. From it:

- `edges(window)`: request rate, error rate and p99 per edge over the last `window` seconds;
- `service(key)`: requests and errors per tick for one service, by destination cluster (what
  this cluster's egress sent) and by source cluster (what its ingress served).

Only this appliance's own traffic is read: its egress (source cluster = this cluster) and its
ingress (destination cluster = this cluster). L4 connections count as requests, with their
lifetime as duration. The index moves on every tick while the ring holds any traffic, so a
blocking query wakes when the figures change and sleeps while everything is quiet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from discovery.changes import ChangeSignal
from gateway import metrics

__all__ = ["TrafficHistory", "quantile"]

log = logging.getLogger(__name__)

Figures = tuple[int, int, float, tuple[int, ...]]  # requests, errors, duration sum, buckets
EdgeKey = tuple[str, str, str]
SeriesKey = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class Tick:
    start: float
    end: float
    edges: dict[EdgeKey, Figures]  # what changed in this tick; edges without traffic left out
    series: dict[SeriesKey, tuple[int, int]]  # requests, errors


def quantile(q: float, buckets: tuple[int, ...] | list[int], bounds: tuple[float, ...]) -> float:
    """The q-quantile of a histogram (per-bucket counts, the last one +Inf), interpolated
    linearly inside its bucket as Prometheus' histogram_quantile does; NaN when empty."""
    total = sum(buckets)
    if total == 0:
        return float("nan")
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if seen + n >= rank and n > 0:
            if i >= len(bounds):  # the +Inf bucket: the highest finite bound is all we know
                return float(bounds[-1])
            lower = float(bounds[i - 1]) if i > 0 else 0.0
            return lower + (float(bounds[i]) - lower) * ((rank - seen) / n)
        seen += n
    return float(bounds[-1])


def _minus(now: Figures, before: Figures | None) -> Figures:
    if before is None:
        return now
    return (
        now[0] - before[0],
        now[1] - before[1],
        now[2] - before[2],
        tuple(a - b for a, b in zip(now[3], before[3], strict=True)),
    )


class TrafficHistory:
    def __init__(
        self,
        cluster: str,
        *,
        tick: float = 5.0,
        span: float = 300.0,
        read_edges: Callable[[], dict[EdgeKey, Figures]] = metrics.edges,
        read_series: Callable[[], dict[SeriesKey, Figures]] = metrics.series,
        clock: Callable[[], float] = time.time,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.cluster = cluster
        self.tick = tick
        self.span = span
        self._read_edges, self._read_series = read_edges, read_series
        self._clock = clock
        self._refresh = refresh  # awaited before each tick's sample (gathers the workers')
        self._ticks: deque[Tick] = deque(maxlen=max(1, round(span / tick)))
        self._last_edges: dict[EdgeKey, Figures] = {}
        self._last_series: dict[SeriesKey, Figures] = {}
        self._last_at = clock()
        self.index = 0
        self._changed = ChangeSignal()
        self._task: asyncio.Task[None] | None = None
        self._primed = False

    def _ours(self, gateway: str, source: str, destination: str) -> bool:
        if gateway == metrics.GatewayKind.EGRESS:
            return source == self.cluster
        return destination == self.cluster

    def prime(self) -> None:
        """Take the counters as they are now as the baseline (what came before is not shown)."""
        self._last_edges = {k: v for k, v in self._read_edges().items() if self._ours(*k)}
        self._last_series = {
            k: v for k, v in self._read_series().items() if self._ours(k[0], k[1], k[3])
        }
        self._last_at = self._clock()
        self._primed = True

    def sample(self) -> None:
        """Close one tick: what the counters moved since the previous one."""
        if not self._primed:
            self.prime()
            return
        now = self._clock()
        edges_now = {k: v for k, v in self._read_edges().items() if self._ours(*k)}
        series_now = {
            k: v for k, v in self._read_series().items() if self._ours(k[0], k[1], k[3])
        }
        edges: dict[EdgeKey, Figures] = {}
        for key, figures in edges_now.items():
            delta = _minus(figures, self._last_edges.get(key))
            if delta[0]:
                edges[key] = delta
        series: dict[SeriesKey, tuple[int, int]] = {}
        for key, figures in series_now.items():
            before = self._last_series.get(key)
            n = figures[0] - (before[0] if before else 0)
            if n:
                series[key] = (n, figures[1] - (before[1] if before else 0))
        self._last_edges, self._last_series = edges_now, series_now
        self._ticks.append(Tick(self._last_at, now, edges, series))
        self._last_at = now
        if any(t.edges for t in self._ticks):
            self._bump()

    def _bump(self) -> None:
        self.index += 1
        self._changed.notify()

    # -- reads -----------------------------------------------------------------------------------
    def edges(self, window: float = 60.0) -> dict[str, Any]:
        """Per edge over the last `window` seconds: requests, errors, rate, error rate, p99."""
        ticks = [t for t in self._ticks if t.end > self._clock() - window - self.tick / 2]
        seconds = sum(t.end - t.start for t in ticks)
        summed: dict[EdgeKey, list[Any]] = {}
        for t in ticks:
            for key, (n, errors, _, buckets) in t.edges.items():
                acc = summed.setdefault(key, [0, 0, [0] * len(buckets)])
                acc[0] += n
                acc[1] += errors
                acc[2] = [a + b for a, b in zip(acc[2], buckets, strict=True)]
        out = []
        for (gateway, source, destination), (n, errors, buckets) in sorted(summed.items()):
            p99 = quantile(0.99, buckets, metrics.BUCKETS)
            out.append({
                "gateway": gateway,
                "source": source,
                "destination": destination,
                "requests": n,
                "errors": errors,
                "rate": round(n / seconds, 3) if seconds > 0 else 0.0,
                "error_rate": round(errors / n, 4) if n else 0.0,
                "p99_ms": None if p99 != p99 else round(p99 * 1000, 1),
            })  # fmt: skip
        return {
            "cluster": self.cluster,
            "window": round(seconds, 3),
            "tick": self.tick,
            "edges": out,
        }

    def service(self, service: str) -> dict[str, Any]:
        """Requests and errors per tick for `service` ("name.namespace"), oldest first."""
        times, egress, ingress = [], {}, {}
        ticks = list(self._ticks)
        for i, t in enumerate(ticks):
            times.append(round(t.end, 3))
            for (gateway, source, svc, destination), (n, errors) in t.series.items():
                if svc != service:
                    continue
                by, peer = (egress, destination) if gateway == "egress" else (ingress, source)
                row = by.setdefault(peer, {"requests": [0] * len(ticks),
                                           "errors": [0] * len(ticks)})  # fmt: skip
                row["requests"][i] += n
                row["errors"][i] += errors
        return {
            "tick": self.tick,
            "span": self.span,
            "times": times,
            "egress": egress,
            "ingress": ingress,
        }

    async def wait(self, index: int, timeout: float) -> int:
        """Block until a tick moves the index past `index` (or `timeout`); the index."""
        if self.index == index and timeout > 0:
            await self._changed.wait_past(lambda: self.index, index, timeout)
        return self.index

    # -- running -----------------------------------------------------------------------------
    def start(self, also: Callable[[], None] | None = None) -> None:
        """Sample every tick in a task (`also` runs after each sample)."""
        self.prime()
        self._task = asyncio.create_task(self._run(also), name="traffic-history")

    async def _run(self, also: Callable[[], None] | None) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                if self._refresh is not None:
                    await self._refresh()
                self.sample()
                if also is not None:
                    also()
            except Exception:  # a bug here must not stop the sampling for good
                log.exception("traffic history sample failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
