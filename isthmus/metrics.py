"""Appliance metrics: API requests and catalog gauges, served with the rest of the registry."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from discovery.catalog import Catalog
from gateway.metrics import merge_families

API_REQUESTS = Counter(
    "isthmus_api_requests_total", "Control API requests", ["method", "route", "status"]
)
API_LATENCY = Histogram(
    "isthmus_api_request_duration_seconds", "Control API request latency", ["method", "route"]
)
LISTENER_REJECTIONS = Counter(
    "isthmus_listener_rejections_total",
    "Connections an HTTP listener (api, control, metrics) refused or closed for a limit",
    ["listener", "reason"],
)
LISTENER_CONNECTIONS = Gauge(
    "isthmus_listener_connections", "Connections an HTTP listener holds now", ["listener"]
)


class CatalogCollector(Collector):
    """Reads live catalogs at scrape time: nothing to keep in sync on the write path."""

    def __init__(self) -> None:
        self.catalogs: weakref.WeakSet[Catalog] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        workloads = GaugeMetricFamily(
            "isthmus_catalog_workloads",
            "Registered workloads by health",
            labels=["cluster", "health"],
        )
        services = GaugeMetricFamily(
            "isthmus_catalog_services", "Services with at least one workload", labels=["cluster"]
        )
        index = GaugeMetricFamily(
            "isthmus_catalog_index", "Catalog change index", labels=["cluster"]
        )
        stale = GaugeMetricFamily(
            "isthmus_catalog_stale",
            "1 while the catalog serves its last-known state (its store, Consul, is unreachable)",
            labels=["cluster"],
        )
        for cat in list(self.catalogs):
            for h, n in cat.health_counts().items():
                workloads.add_metric([cat.cluster, h.value], n)
            services.add_metric([cat.cluster], len(cat.services()))
            index.add_metric([cat.cluster], cat.index)
            stale.add_metric([cat.cluster], 1.0 if cat.report().get("stale") else 0.0)
        yield workloads
        yield services
        yield index
        yield stale


CATALOGS = CatalogCollector()
REGISTRY.register(CATALOGS)


class WithWorkers:
    """The default registry with the data-plane workers' `isthmus_*` families added in, for
    one exposition (`generate_latest` only calls `collect`)."""

    def __init__(self, workers: list[Metric]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        own = list(REGISTRY.collect())
        if not self.workers:
            yield from own
            return
        mine = [m for m in own if m.name.startswith("isthmus_")]
        merged = {m.name: m for m in merge_families([mine, self.workers])}
        for m in own:
            yield merged.pop(m.name, m)
        yield from merged.values()
