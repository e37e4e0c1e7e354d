"""Traffic across three federated clusters with real egress, ingress and backends."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from discovery.names import ServiceKey

from .conftest import Backend, Cluster, eventually, make_pki

_nets = itertools.count(1)
NAMES = ("a", "b", "c")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[dict[str, Cluster], dict[str, Backend]]]:
    n = (next(_nets) + 7 * (os.getpid() % 30)) % 200
    make_pki(tmp_path, list(NAMES))
    clusters = {
        name: Cluster(
            name,
            tmp_path,
            f"127.62.{n}.{i + 1}",
            {"a": "us", "b": "us", "c": "eu"}[name],
            vip_cidr=f"127.{241 + i}.{n}.0/24",
            roles=("control", "ingress", "egress"),
        )
        for i, name in enumerate(NAMES)
    }
    for c in clusters.values():
        c.peers = {o.name: o.ingress for o in clusters.values() if o is not c}
    backends = {name: Backend(name, f"127.63.{n}.{i + 1}") for i, name in enumerate(NAMES)}
    try:
        await asyncio.gather(*(b.up() for b in backends.values()))
        await asyncio.gather(*(c.start() for c in clusters.values()))
        for name, c in clusters.items():
            b = backends[name]
            status, out = await c.call(
                "PUT",
                f"/v1/workloads/reviews-{name}",
                {
                    "service": "reviews",
                    "address": b.host,
                    "ports": {"http": b.port},
                    "check": {
                        "http": f"http://{b.host}:{b.port}/healthz",
                        # generous: the backends share this busy test process
                        "interval": "1s",
                        "timeout": "1s",
                        "failure_threshold": 2,
                    },
                },
            )
            assert status == 201, out
        yield clusters, backends
    finally:
        await asyncio.gather(*(c.close() for c in clusters.values()), return_exceptions=True)
        await asyncio.gather(*(b.down() for b in backends.values()), return_exceptions=True)


def route_of(c: Cluster):
    assert c.app is not None
    return c.app.holder.current.get(ServiceKey("reviews"))


async def all_healthy(clusters: dict[str, Cluster]) -> None:
    """Every cluster's table shows one healthy endpoint in each of the three clusters."""
    seen: dict[str, dict | None] = {}

    async def probe() -> bool:
        for c in clusters.values():
            r = route_of(c)
            seen[c.name] = None if r is None else {d.cluster: d.healthy for d in r.destinations}
        return all(v == dict.fromkeys(NAMES, 1) for v in seen.values())

    try:
        await eventually(probe, timeout=30)
    except AssertionError:
        raise AssertionError(f"tables never converged: {seen}") from None


async def call(session: aiohttp.ClientSession, vip: str, port: int) -> str:
    async with session.get(f"http://{vip}:{port}/r") as r:
        body = await r.text()
        assert r.status == 200, (r.status, body)
        return body


async def test_weights_set_in_one_cluster_are_followed_everywhere(world) -> None:
    clusters, _ = world
    await all_healthy(clusters)
    a = clusters["a"]
    status, policy = await a.call(
        "PUT", "/v1/services/default/reviews/traffic", {"weights": {"a": 20, "b": 30, "c": 50}}
    )
    assert status == 200

    async def everywhere() -> bool:
        return all(
            (r := route_of(c)) is not None and r.policy_version == policy["version"]
            for c in clusters.values()
        )

    await eventually(everywhere, what="policy in every routing table")
    expected = {"a": 0.20, "b": 0.30, "c": 0.50}
    for name, c in clusters.items():
        route = route_of(c)
        port = next(iter(route.ports.values()))
        counts: collections.Counter[str] = collections.Counter()
        async with aiohttp.ClientSession() as s:
            for _ in range(2000 // 50):
                counts.update(
                    await asyncio.gather(*(call(s, str(route.vip), port) for _ in range(50)))
                )
        shares = {k: counts[k] / 2000 for k in NAMES}
        for k in NAMES:
            assert abs(shares[k] - expected[k]) <= 0.05, (name, shares)


async def test_losing_every_backend_of_a_cluster_fails_no_request(world) -> None:
    clusters, backends = world
    await all_healthy(clusters)
    a = clusters["a"]
    await a.call(
        "PUT",
        "/v1/services/default/reviews/traffic",
        {"weights": {"a": 0, "b": 50, "c": 50}, "failover": True},
    )
    await eventually(lambda: _weights_on(a, {"a": 0, "b": 50, "c": 50}), what="policy on a")
    route = route_of(a)
    port = next(iter(route.ports.values()))
    served: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    stop = asyncio.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                try:
                    served[await call(s, str(route.vip), port)] += 1
                except (AssertionError, aiohttp.ClientError) as e:
                    failures.append(repr(e))

    workers = [asyncio.create_task(load()) for _ in range(8)]
    await asyncio.sleep(0.5)
    await backends["c"].down()  # every backend of reviews in c

    async def c_is_empty() -> bool:
        d = route_of(a).destination("c")
        return d is not None and d.healthy == 0

    await eventually(c_is_empty, timeout=20, what="a learns that c has no healthy backend")
    before = served["c"]
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*workers)
    assert failures == []
    assert served["c"] == before  # no more traffic to c
    assert served["b"] > 0


async def _weights_on(c: Cluster, weights: dict[str, int]) -> bool:
    r = route_of(c)
    return r is not None and {d.cluster: d.weight for d in r.destinations} == weights


async def test_cut_control_channel_keeps_traffic_flowing(world) -> None:
    clusters, _ = world
    await all_healthy(clusters)
    a, c = clusters["a"], clusters["c"]
    assert a.app is not None and a.app.federation is not None
    await a.app.federation.close_links()  # a's control channel to everyone is gone

    async def stale() -> bool:
        _, peers = await a.call("GET", "/v1/peers")
        return peers == [] or all(p["state"] != "connected" for p in peers)

    await eventually(stale, what="a's peers not connected")
    route = route_of(a)
    assert route.destination(c.name) is not None  # last-known exports kept
    pinned = route.cluster_vips[c.name]  # reviews.default.c.global: only c
    port = next(iter(route.ports.values()))
    async with aiohttp.ClientSession() as s:
        got = await asyncio.gather(*(call(s, str(pinned), port) for _ in range(50)))
        spread = await asyncio.gather(*(call(s, str(route.vip), port) for _ in range(50)))
    assert set(got) == {"c"}
    assert set(spread) <= set(NAMES) and len(spread) == 50
