"""Data-plane metrics (issue 4 §6), defined once on the default registry.

Every flow metric carries `gateway` (ingress or egress: one test process may host both ends of
a connection), `source_cluster`, `destination_service`, `destination_cluster`; counts of
finished things add `outcome`. "Sent" and "received" are seen from the gateway toward the
destination: sent = client to destination, received = destination to client.

Label lookups cost a dict walk and a lock each; `Flow` caches the labelled children of one
(gateway, source, service, destination) so the hot path touches only prebuilt children.

Per-request counts (`Flow.request`, thousands a second on the L7 path) are not written to the
prometheus children one by one: they add up in plain integers (a bisect finds the histogram
bucket) and go into the children when the registry is collected (a scrape, or a test reading
a value), through a collector registered before the gateway's metrics. An observation costs
~0.3 us instead of ~4 us (a lock and a linear bucket walk per child).

Every finished request (L7, per batch at the next flush) or connection (L4, at once) is also
added, in plain integers, to two `Totals`: its flow's series (per service and destination
cluster, for the console's charts) and its edge's (per gateway, source cluster and
destination cluster, with no service label). The edge totals are served as
`isthmus_edge_requests_total` and `isthmus_edge_request_duration_seconds` by a collector at
scrape time; their label sets are bounded by `MAX_EDGES`, and the series by `MAX_SERIES`
(past either cap, new label sets are counted under "other"), whatever the peers or the
catalog hold.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

if TYPE_CHECKING:
    from gateway.balancer import Choice

__all__ = [
    "ACTIVE_CONNECTIONS",
    "BUCKETS",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "CONNECTIONS",
    "EJECTIONS",
    "ERROR_OUTCOMES",
    "MAX_EDGES",
    "MAX_SERIES",
    "REJECTIONS",
    "REQUESTS",
    "REQUEST_DURATION",
    "TUNNEL_SILENT",
    "Flow",
    "GatewayKind",
    "Outcome",
    "Totals",
    "add_figures",
    "edges",
    "ejection_listener",
    "flow",
    "merge_families",
    "record_ejection",
    "record_rejection",
    "series",
]

_FLOW = ("gateway", "source_cluster", "destination_service", "destination_cluster")


class GatewayKind(enum.StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


class Outcome(enum.StrEnum):
    """How a connection or request ended; the values are metric labels."""

    OK = "ok"
    CONNECT_ERROR = "connect_error"  # the destination refused or reset
    CONNECT_TIMEOUT = "connect_timeout"
    HANDSHAKE_ERROR = "handshake_error"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    RESET = "reset"  # broke after bytes moved
    NO_HEALTHY_DESTINATION = "no_healthy_destination"
    REFUSED = "refused"  # policy: unknown or unexported service, peer not allowed
    HTTP_5XX = "5xx"
    HTTP_4XX = "4xx"
    DRAINED = "drained"  # closed by a graceful shutdown


# What counts as an error in the edge figures: the request or connection failed on the way or at
# the destination. A 4xx is the client's answer, a drain is our own shutdown, an idle timeout
# is a quiet client: none of them is the path failing.
ERROR_OUTCOMES = frozenset(
    {
        Outcome.CONNECT_ERROR,
        Outcome.CONNECT_TIMEOUT,
        Outcome.HANDSHAKE_ERROR,
        Outcome.HANDSHAKE_TIMEOUT,
        Outcome.RESET,
        Outcome.NO_HEALTHY_DESTINATION,
        Outcome.REFUSED,
        Outcome.HTTP_5XX,
    }
)

_DIRTY: list[Flow] = []  # flows with per-request counts not yet in their prometheus children


def flush() -> None:
    """Move the per-request counts gathered since the last flush into the metrics."""
    while _DIRTY:
        _DIRTY.pop().flush()


class _Flusher(Collector):
    """Registered ahead of the metrics below: every collection flushes them first."""

    def collect(self) -> list:  # type: ignore[type-arg]
        flush()
        return []

    def describe(self) -> list:  # type: ignore[type-arg]
        return []


REGISTRY.register(_Flusher())

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BUCKETS = _BUCKETS

MAX_EDGES = 1024  # (gateway, source, destination) label sets: clusters squared, twice
MAX_SERIES = 4096  # (gateway, source, service, destination): the flow cache's size
OTHER = "other"


@dataclass(slots=True)
class Totals:
    """Requests (L7) or connections (L4) finished since start, in plain integers."""

    requests: int = 0
    errors: int = 0
    duration_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(_BUCKETS) + 1))

    def add(self, error: bool, bucket: int, duration: float) -> None:
        self.requests += 1
        self.errors += error
        self.duration_sum += duration
        self.buckets[bucket] += 1

    def frozen(self) -> tuple[int, int, float, tuple[int, ...]]:
        return self.requests, self.errors, self.duration_sum, tuple(self.buckets)


_EDGES: dict[tuple[str, str, str], Totals] = {}
_SERIES: dict[tuple[str, str, str, str], Totals] = {}


def _edge_totals(gateway: str, source: str, destination: str) -> Totals:
    key = (gateway, source, destination)
    totals = _EDGES.get(key)
    if totals is None:
        if len(_EDGES) >= MAX_EDGES:
            key = (gateway, OTHER, OTHER)
            totals = _EDGES.get(key)
        if totals is None:
            totals = _EDGES[key] = Totals()
    return totals


def _series_totals(labels: tuple[str, str, str, str]) -> Totals:
    totals = _SERIES.get(labels)
    if totals is None:
        key = labels
        if len(_SERIES) >= MAX_SERIES:
            key = (labels[0], labels[1], OTHER, labels[3])
            totals = _SERIES.get(key)
        if totals is None:
            totals = _SERIES[key] = Totals()
    return totals


Figures = tuple[int, int, float, tuple[int, ...]]  # requests, errors, duration sum, buckets
K = TypeVar("K", tuple[str, str, str], tuple[str, str, str, str])


def edges() -> dict[tuple[str, str, str], Figures]:
    """(gateway, source, destination) -> (requests, errors, duration sum, bucket counts)."""
    flush()  # L7 requests are added up per batch (see `Flow.request`)
    return {k: t.frozen() for k, t in list(_EDGES.items())}


def series() -> dict[tuple[str, str, str, str], Figures]:
    """(gateway, source, service, destination) -> as `edges()`, per service."""
    flush()
    return {k: t.frozen() for k, t in list(_SERIES.items())}


def add_figures(*groups: dict[K, Figures]) -> dict[K, Figures]:
    """`edges()` or `series()` of several processes (the data-plane workers), as one's."""
    out: dict[K, Figures] = {}
    for group in groups:
        for key, (n, errors, total, buckets) in group.items():
            had = out.get(key)
            if had is None:
                out[key] = (n, errors, total, tuple(buckets))
            else:
                out[key] = (had[0] + n, had[1] + errors, had[2] + total,
                            tuple(a + b for a, b in zip(had[3], buckets, strict=True)))  # fmt: skip
    return out


class _EdgeCollector(Collector):
    """The edge totals as Prometheus families, read at scrape time (nothing on the hot path)."""

    def collect(self) -> list:  # type: ignore[type-arg]
        requests = CounterMetricFamily(
            "isthmus_edge_requests",
            "Requests (L7) and connections (L4) between clusters, by gateway and result",
            labels=["gateway", "source_cluster", "destination_cluster", "result"],
        )
        durations = HistogramMetricFamily(
            "isthmus_edge_request_duration_seconds",
            "Duration of requests (L7) and connections (L4) between clusters",
            labels=["gateway", "source_cluster", "destination_cluster"],
        )
        for labels, (count, errors, total, buckets) in sorted(edges().items()):
            requests.add_metric([*labels, "ok"], count - errors)
            requests.add_metric([*labels, "error"], errors)
            cumulative, acc = [], 0
            for bound, n in zip((*map(str, _BUCKETS), "+Inf"), buckets, strict=True):
                acc += n
                cumulative.append((bound, acc))
            durations.add_metric(list(labels), cumulative, total)
        return [requests, durations]

    def describe(self) -> list:  # type: ignore[type-arg]
        return []


REGISTRY.register(_EdgeCollector())

REQUESTS = Counter(
    "isthmus_requests_total",
    "HTTP requests handled at L7, by outcome",
    [*_FLOW, "outcome"],
)
CONNECTIONS = Counter(
    "isthmus_connections_total",
    "Connections handled (finished), by outcome",
    [*_FLOW, "outcome"],
)
REQUEST_DURATION = Histogram(
    "isthmus_request_duration_seconds",
    "Duration of L7 requests, and of L4 connections, from accept to close",
    [*_FLOW, "outcome"],
    buckets=_BUCKETS,
)
BYTES_SENT = Counter(
    "isthmus_bytes_sent_total", "Bytes relayed from clients toward destinations", _FLOW
)
BYTES_RECEIVED = Counter(
    "isthmus_bytes_received_total", "Bytes relayed from destinations back to clients", _FLOW
)
ACTIVE_CONNECTIONS = Gauge("isthmus_active_connections", "Connections open now", _FLOW)
EJECTIONS = Counter(
    "isthmus_ejections_total",
    "Outlier ejections of local endpoints or remote cluster gateways",
    ["source_cluster", "destination_service", "destination_cluster", "target_kind"],
)
REJECTIONS = Counter(
    "isthmus_rejections_total",
    "Connections refused before routing (bad ClientHello, unknown SNI, limits), by reason",
    ["gateway", "cluster", "reason"],
)

# Egress: a tunnel connection whose peer answered neither an OPEN nor the PING that followed
# (gateway/proto/liveness.py): its waiting OPENs failed at once, and it took no new streams.
TUNNEL_SILENT = Counter(
    "isthmus_tunnel_silent_total",
    "Egress tunnel connections found silent by the OPEN probe (their waiting OPENs failed fast)",
)


@dataclass(slots=True)
class Flow:
    """Prebuilt metric children of one (gateway, source, service, destination)."""

    labels: tuple[str, str, str, str]
    active: Gauge = field(init=False)
    sent: Counter = field(init=False)
    received: Counter = field(init=False)
    _finished: dict[str, tuple[Counter, Counter, Histogram]] = field(
        init=False, default_factory=dict
    )
    # outcome -> [requests, duration sum, per-bucket counts (the last one is +Inf)]
    _pending: dict[str, list] = field(init=False, default_factory=dict)  # type: ignore[type-arg]
    _dirty: bool = field(init=False, default=False)
    totals: Totals = field(init=False)  # this flow's series (shared by flows of equal labels)
    edge: Totals = field(init=False)  # its edge's: the same without the service

    def __post_init__(self) -> None:
        self.active = ACTIVE_CONNECTIONS.labels(*self.labels)
        self.sent = BYTES_SENT.labels(*self.labels)
        self.received = BYTES_RECEIVED.labels(*self.labels)
        gateway, source, _, destination = self.labels
        self.totals = _series_totals(self.labels)
        self.edge = _edge_totals(gateway, source, destination)

    def _finish(self, outcome: str, duration: float) -> int:
        """Count one finished request or connection in the plain totals; its bucket index.
        (Written out rather than two `Totals.add` calls: this runs once per request.)"""
        bucket = bisect.bisect_left(_BUCKETS, duration)
        error = outcome in ERROR_OUTCOMES
        t = self.totals
        t.requests += 1
        t.errors += error
        t.duration_sum += duration
        t.buckets[bucket] += 1
        t = self.edge
        t.requests += 1
        t.errors += error
        t.duration_sum += duration
        t.buckets[bucket] += 1
        return bucket

    def _add_batch(self, outcome: str, count: int, total: float, buckets: list[int]) -> None:
        """Requests gathered since the last flush, into the plain totals (once per batch)."""
        errors = count if outcome in ERROR_OUTCOMES else 0
        for t in (self.totals, self.edge):
            t.requests += count
            t.errors += errors
            t.duration_sum += total
            t.buckets = [a + b for a, b in zip(t.buckets, buckets, strict=True)]

    def _by_outcome(self, outcome: str) -> tuple[Counter, Counter, Histogram]:
        children = self._finished.get(outcome)
        if children is None:
            children = (
                CONNECTIONS.labels(*self.labels, outcome),
                REQUESTS.labels(*self.labels, outcome),
                REQUEST_DURATION.labels(*self.labels, outcome),
            )
            self._finished[outcome] = children
        return children

    def connection_opened(self) -> None:
        self.active.inc()

    def connection_closed(
        self, outcome: Outcome | str, duration: float, sent: int, received: int
    ) -> None:
        """One L4 connection ended (it was counted as opened before)."""
        connections, _, durations = self._by_outcome(str(outcome))
        self._finish(str(outcome), duration)
        self.active.dec()
        connections.inc()
        durations.observe(duration)
        if sent:
            self.sent.inc(sent)
        if received:
            self.received.inc(received)

    def connection_failed(self, outcome: Outcome | str, duration: float) -> None:
        """A connection that never opened (refused, no destination): counted, not active."""
        connections, _, durations = self._by_outcome(str(outcome))
        self._finish(str(outcome), duration)
        connections.inc()
        durations.observe(duration)

    def request(
        self, outcome: Outcome | str, duration: float, sent: int = 0, received: int = 0
    ) -> None:
        """One L7 request ended (counted at the next collection, see the module docstring);
        `sent` and `received` are its body bytes."""
        pending = self._pending.get(outcome)
        if pending is None:
            pending = self._pending[str(outcome)] = [0, 0.0, [0] * (len(_BUCKETS) + 1), 0, 0]
        pending[0] += 1
        pending[1] += duration
        pending[2][bisect.bisect_left(_BUCKETS, duration)] += 1
        pending[3] += sent
        pending[4] += received
        if not self._dirty:
            self._dirty = True
            _DIRTY.append(self)

    def flush(self) -> None:
        self._dirty = False
        pending, self._pending = self._pending, {}
        for outcome, (count, total, buckets, sent, received) in pending.items():
            self._add_batch(outcome, count, total, buckets)
            _, requests, durations = self._by_outcome(outcome)
            requests.inc(count)
            if sent:
                self.sent.inc(sent)
            if received:
                self.received.inc(received)
            durations._sum.inc(total)  # the child's own fields: observe() once per request
            for child, n in zip(durations._buckets, buckets, strict=True):  # would cost the
                if n:  # same as counting them one by one here
                    child.inc(n)


def merge_families(groups: list[list[Metric]]) -> list[Metric]:
    """Metric families of several processes (the data-plane workers), as one process's.

    Samples with the same name and labels add up: counters, histogram buckets, sums and
    counts, and gauges (connections open now, listeners, streams: totals over the workers).
    `_created` timestamps take the earliest. The first process's help text and type win."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in groups:
        for family in families:
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type,
                                             family.unit)  # fmt: skip
                values[family.name] = {}
            into = values[family.name]
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in into:
                    into[key] = s.value
                elif s.name.endswith("_created"):
                    into[key] = min(into[key], s.value)
                else:
                    into[key] += s.value
    out = []
    for name, family in merged.items():
        family.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
        out.append(family)
    return out


@lru_cache(maxsize=4096)
def flow(gateway: GatewayKind, source: str, service: str, destination: str) -> Flow:
    """The shared `Flow` for these labels (bounded cache: label sets follow the catalog)."""
    return Flow((gateway.value, source, service, destination))


def record_ejection(source: str, service: str, destination: str, target_kind: str) -> None:
    EJECTIONS.labels(source, service, destination, target_kind).inc()


def record_rejection(gateway: GatewayKind, cluster: str, reason: str) -> None:
    REJECTIONS.labels(gateway.value, cluster, reason).inc()


def ejection_listener(source_cluster: str) -> Callable[[Choice, float], None]:
    """A `Balancer(on_eject=...)` hook that counts ejections for this cluster's gateway."""

    def on_eject(choice: Choice, duration: float) -> None:
        record_ejection(
            source_cluster, str(choice.route.service), choice.cluster, choice.target.kind.value
        )

    return on_eject
