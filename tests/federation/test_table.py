"""Routing-table snapshots built from a real embedded catalog."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from discovery.embedded import EmbeddedCatalog
from discovery.model import Health, Locality
from discovery.names import ServiceKey
from discovery.schema import parse_workload
from federation.routing import RoutingTable, TableHolder
from federation.table import LocalTableBuilder


@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[EmbeddedCatalog]:
    c = EmbeddedCatalog(tmp_path, "east")
    await c.open()
    try:
        yield c
    finally:
        await c.close()


def wl(wid: str, service: str, address: str = "10.0.0.1"):
    return parse_workload({"service": service, "address": address, "ports": {"http": 80}},
                          wid, "east")


async def eventually(holder: TableHolder, predicate) -> RoutingTable:
    """Wait (bounded) for a published snapshot that satisfies `predicate`."""
    changed = asyncio.Event()
    unsub = holder.subscribe(lambda _t: changed.set())
    try:
        async with asyncio.timeout(5):
            while not predicate(holder.current):
                await changed.wait()
                changed.clear()
    finally:
        unsub()
    return holder.current


def endpoints(t: RoutingTable, service: str) -> list[tuple[str, bool]]:
    route = t.get(ServiceKey(service))
    if route is None:
        return []
    return [(e.workload_id, e.healthy) for e in route.destinations[0].endpoints]


async def test_table_follows_the_catalog(catalog: EmbeddedCatalog) -> None:
    holder = TableHolder()
    b = LocalTableBuilder(catalog, holder, cluster="east", trust_domain="td",
                          locality=Locality("us-east", "a"))
    await catalog.put(wl("a", "reviews"))
    await b.start()
    try:
        t = holder.current
        route = t.get(ServiceKey("reviews"))
        assert route is not None and route.vip == catalog.known_vip("reviews.default")
        assert route.cluster_vips["east"] == catalog.known_vip("reviews.default.east")
        assert t.by_vip[route.vip] == (ServiceKey("reviews"), None)
        assert t.by_vip[route.cluster_vips["east"]] == (ServiceKey("reviews"), "east")
        dest = route.destinations[0]
        assert dest.local and dest.healthy == 1 and dest.locality.region == "us-east"

        await catalog.put(wl("b", "reviews", "10.0.0.2"))
        await catalog.put(wl("c", "ratings"))
        t = await eventually(holder, lambda t: len(endpoints(t, "reviews")) == 2
                             and endpoints(t, "ratings") == [("c", True)])
        assert t.version > 1

        await catalog.set_health("b", Health.CRITICAL, "down")
        t = await eventually(holder, lambda t: ("b", False) in endpoints(t, "reviews"))
        assert t.get(ServiceKey("reviews")).destinations[0].healthy == 1

        # a workload moving to another service leaves the old one
        await catalog.put(wl("b", "ratings", "10.0.0.2"))
        await eventually(holder, lambda t: [w for w, _ in endpoints(t, "reviews")] == ["a"])
        await catalog.delete("a")
        t = await eventually(holder, lambda t: t.get(ServiceKey("reviews")) is None)
        assert [w for w, _ in endpoints(t, "ratings")] == ["b", "c"]
    finally:
        await b.stop()


async def test_a_restart_keeps_vips(tmp_path: Path) -> None:
    vips = []
    for _ in range(2):
        c = EmbeddedCatalog(tmp_path, "east")
        await c.open()
        await c.put(wl("a", "reviews"))
        holder = TableHolder()
        b = LocalTableBuilder(c, holder, cluster="east", trust_domain="td", locality=Locality())
        await b.start()
        r = holder.current.get(ServiceKey("reviews"))
        vips.append((r.vip, r.cluster_vips["east"]))
        await b.stop()
        await c.close()
    assert vips[0] == vips[1]
