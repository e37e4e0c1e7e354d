"""Health checking cannot be turned into a probe flood: a floor under every check interval
(stored checks faster than it run at the floor) and a global probe rate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from discovery.embedded import EmbeddedCatalog
from discovery.health import HealthChecker
from discovery.limits import WriteLimits
from discovery.model import Check, CheckKind, Workload
from discovery.names import ServiceKey

from .conftest import loopback_host

pytestmark = pytest.mark.timeout(60)


class CountingTarget:
    """A TCP server that counts the connections (probes) it accepts."""

    def __init__(self) -> None:
        self.host = loopback_host()
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def _accept(self, _: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        w.close()

    async def __aenter__(self) -> CountingTarget:
        self.server = await asyncio.start_server(self._accept, self.host, 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def target(self) -> str:
        assert self.server is not None
        return f"{self.host}:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[EmbeddedCatalog]:
    # the floor is enforced on writes; this catalog stores what an older release accepted
    c = EmbeddedCatalog(tmp_path, "east", limits=WriteLimits(min_check_interval=0.001))
    await c.open()
    try:
        yield c
    finally:
        await c.close()


async def register(c: EmbeddedCatalog, n: int, target: str, interval: float) -> None:
    check = Check(CheckKind.TCP, target, interval=interval, timeout=interval)
    for i in range(n):
        await c.put(Workload(f"w{i}", ServiceKey("s"), "10.0.0.5", {"tcp": 1}, "east",
                             check=check))


async def run_for(h: HealthChecker, t: CountingTarget, seconds: float) -> tuple[int, float]:
    started = time.monotonic()
    await h.start()
    try:
        await asyncio.sleep(seconds)
        return t.accepted, time.monotonic() - started
    finally:
        await h.stop()


async def test_stored_checks_faster_than_the_floor_run_at_the_floor(
    catalog: EmbeddedCatalog,
) -> None:
    """20 workloads with `interval: 1ms` sent 8,679 probes/s to one target; at a 0.5 s floor
    each workload is probed at most once per half second."""
    async with CountingTarget() as t:
        await register(catalog, 20, t.target, 0.001)
        h = HealthChecker(catalog, min_interval=0.5, max_per_second=100_000)
        probes, elapsed = await run_for(h, t, 1.5)
    assert probes > 0
    # the first probe of each comes within its (floored) interval, then one per floor
    assert probes <= 20 * (elapsed / 0.5 + 1)


async def test_probes_are_rate_limited_across_workloads(catalog: EmbeddedCatalog) -> None:
    async with CountingTarget() as t:
        await register(catalog, 20, t.target, 0.01)
        h = HealthChecker(catalog, min_interval=0.01, max_per_second=20)
        probes, elapsed = await run_for(h, t, 1.5)
    assert probes > 0
    assert probes <= 20 * elapsed + h.probe_burst
