"""Health checks against real HTTP and TCP targets on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from discovery.embedded import EmbeddedCatalog
from discovery.errors import InvalidInput, NotFound
from discovery.health import HealthChecker
from discovery.limits import WriteLimits
from discovery.model import Health
from discovery.probes import probe_http, probe_tcp
from discovery.schema import parse_workload

from .conftest import free_port, loopback_host


class Target:
    """A real HTTP server whose /healthz status the test flips, and which can go away."""

    def __init__(self) -> None:
        self.host = loopback_host()
        self.port = free_port(self.host)
        self.status = 200
        self.runner: web.AppRunner | None = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(status=self.status, text="ok" if self.status < 400 else "bad")

    async def up(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()

    async def down(self) -> None:
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/healthz"


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target()
    await t.up()
    try:
        yield t
    finally:
        await t.down()


# These tests run checks every 100 ms: below the 1 s floor an appliance enforces by default.
FAST = WriteLimits(min_check_interval=0.01)


@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[EmbeddedCatalog]:
    c = EmbeddedCatalog(tmp_path, "east", limits=FAST)
    await c.open()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def checker(catalog: EmbeddedCatalog) -> AsyncIterator[HealthChecker]:
    h = HealthChecker(catalog, min_interval=0.01)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


async def until(catalog: EmbeddedCatalog, wid: str, health: Health, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                if catalog.get(wid).health is health:
                    return
            except NotFound:
                pass
            await catalog.wait(catalog.index, 0.2)


def wl(wid: str, check: dict[str, object]):
    body = {"service": "reviews", "address": "127.0.0.1", "ports": {"http": 80}, "check": check}
    return parse_workload(body, wid, "east")


async def test_probes_directly(target: Target) -> None:
    assert (await probe_http(target.url, 1)).ok
    target.status = 503
    r = await probe_http(target.url, 1)
    assert not r.ok and "503" in r.output
    target.status = 302
    assert (await probe_http(target.url, 1)).ok  # 3xx passes
    assert (await probe_tcp(f"{target.host}:{target.port}", 1)).ok
    await target.down()
    r = await probe_tcp(f"{target.host}:{target.port}", 1)
    assert not r.ok and "refused" in r.output.lower()
    assert not (await probe_http(target.url, 1)).ok


async def test_http_probe_rejects_a_non_http_answer() -> None:
    host = loopback_host()

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"SSH-2.0-OpenSSH\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(garbage, host, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        r = await probe_http(f"http://{host}:{port}/", 1)
    assert not r.ok and "not an HTTP response" in r.output


async def test_http_probe_times_out() -> None:
    host = loopback_host()

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await asyncio.start_server(silent, host, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        r = await probe_http(f"http://{host}:{port}/", 0.2)
    assert not r.ok and "timed out" in r.output


async def test_http_check_follows_the_target(
    catalog: EmbeddedCatalog, checker: HealthChecker, target: Target
) -> None:
    await catalog.put(wl("w", {"http": target.url, "interval": "200ms", "timeout": "150ms"}))
    await until(catalog, "w", Health.PASSING)
    target.status = 500
    await until(catalog, "w", Health.CRITICAL)
    assert "HTTP 500" in catalog.get("w").output
    target.status = 200
    await until(catalog, "w", Health.PASSING)
    await target.down()
    await until(catalog, "w", Health.CRITICAL)


async def test_thresholds(catalog: EmbeddedCatalog, checker: HealthChecker, target: Target) -> None:
    check = {
        "tcp": f"{target.host}:{target.port}",
        "interval": "100ms",
        "timeout": "100ms",
        "failure_threshold": 3,
        "success_threshold": 2,
    }
    await catalog.put(wl("w", check))
    await until(catalog, "w", Health.PASSING)
    await target.down()
    seen: list[Health] = []
    catalog.subscribe(lambda i, wid, st: st and seen.append(st.health))
    await until(catalog, "w", Health.CRITICAL)
    # three failures were needed: the probe count says so, not the clock
    assert checker._tracked["w"].failures >= 3
    await target.up()
    await until(catalog, "w", Health.PASSING)
    assert checker._tracked["w"].successes >= 2
    assert seen == [Health.CRITICAL, Health.PASSING]


async def test_ttl_heartbeats(catalog: EmbeddedCatalog, checker: HealthChecker) -> None:
    await catalog.put(wl("w", {"ttl": "300ms"}))
    assert catalog.get("w").health is Health.UNKNOWN
    st = await checker.heartbeat("w")
    assert st.health is Health.PASSING
    await until(catalog, "w", Health.CRITICAL)
    assert "TTL" in catalog.get("w").output
    await checker.heartbeat("w")
    assert catalog.get("w").health is Health.PASSING


async def test_heartbeat_needs_a_ttl_check(
    catalog: EmbeddedCatalog, checker: HealthChecker, target: Target
) -> None:
    await catalog.put(wl("w", {"http": target.url}))
    with pytest.raises(InvalidInput, match="no TTL check"):
        await checker.heartbeat("w")
    with pytest.raises(NotFound):
        await checker.heartbeat("nobody")


async def test_deregister_after_critical(
    catalog: EmbeddedCatalog, checker: HealthChecker, target: Target
) -> None:
    await target.down()
    check = {
        "tcp": f"{target.host}:{target.port}",
        "interval": "100ms",
        "timeout": "100ms",
        "deregister_after": "300ms",
    }
    await catalog.put(wl("w", check))
    async with asyncio.timeout(10):
        while "w" in {s.workload.id for s in catalog.workloads()}:
            await catalog.wait(catalog.index, 0.2)
    assert checker.tracked == 0


async def test_ttl_deregister_after(catalog: EmbeddedCatalog, checker: HealthChecker) -> None:
    await catalog.put(wl("w", {"ttl": "100ms", "deregister_after": "200ms"}))
    async with asyncio.timeout(10):
        while catalog.workloads():
            await catalog.wait(catalog.index, 0.2)


async def test_first_checks_are_spread_over_the_interval(tmp_path: Path) -> None:
    import random

    c = EmbeddedCatalog(tmp_path, "east")
    await c.open()
    try:
        await asyncio.gather(
            *(c.put(wl(f"w{i}", {"tcp": "127.0.0.1:9", "interval": "10s"})) for i in range(500))
        )
        h = HealthChecker(c, rng=random.Random(7))
        clock = [1000.0]
        h._clock = lambda: clock[0]
        await h.start()
        try:
            dues = sorted(d - 1000.0 for d, *_ in h._heap)
            assert len(dues) == 500
            assert dues[0] >= 0 and dues[-1] <= 10
            # roughly uniform: every second of the interval gets a share
            buckets = [sum(1 for d in dues if s <= d < s + 1) for s in range(10)]
            assert min(buckets) > 20
        finally:
            await h.stop()
    finally:
        await c.close()


async def test_probes_in_flight_are_bounded(catalog: EmbeddedCatalog) -> None:
    """A checker that falls behind runs checks late; it never holds more than its cap."""
    host = loopback_host()
    active = [0, 0]  # now, peak (as the target sees them)

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        active[0] += 1
        active[1] = max(active)
        await r.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.2)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        w.close()
        active[0] -= 1

    server = await asyncio.start_server(slow, host, 0)
    port = server.sockets[0].getsockname()[1]
    h = HealthChecker(catalog, max_concurrent=2)
    await h.start()
    try:
        async with server:
            for i in range(8):
                await catalog.put(wl(f"w{i}", {"http": f"http://{host}:{port}/",
                                               "interval": "5s", "timeout": "1s"}))
            async with asyncio.timeout(15):
                while any(s.health is not Health.PASSING for s in catalog.workloads()):
                    assert h._inflight <= 2
                    await asyncio.sleep(0.02)
        assert active[1] <= 2
    finally:
        await h.stop()
