"""The egress on a two-cluster loopback topology (see gw_topology.py): L4 and L7 paths, pools,
session resumption, failover, drain, table and identity swaps, bad input."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket

import aiohttp
import pytest
from gw_topology import (
    EAST_ONLY_VIP,
    HTTP_PORT,
    TCP_PORT,
    VIP,
    WEST_ONLY_VIP,
    Pki,
    served_by,
    topology,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


async def tcp_round_trip(host: str, payload: bytes, port: int = TCP_PORT) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    # No half-close: asyncio's TLS transports cannot carry one through the tunnel.
    out = await reader.readexactly(len(payload))
    writer.close()
    return out


async def test_l4_local_and_remote_with_pool_and_resumption(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki) as topo:
        payload = b"x" * 300_000
        assert await tcp_round_trip(str(EAST_ONLY_VIP), payload) == payload
        for i in range(4):
            data = b"%d" % i * 1000
            assert await tcp_round_trip(str(WEST_ONLY_VIP), data) == data
        pool = topo.egress.pool
        assert pool.misses >= 1 and pool.hits >= 1
        assert pool.resumed >= 1 and pool.resumed < pool.dials  # the first one cannot resume


async def test_smoke_http(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki) as topo:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{EAST_ONLY_VIP}:{HTTP_PORT}/a") as r:
                assert r.status == 200
                assert served_by(await r.read())[0] == "east"
            async with s.get(f"http://{WEST_ONLY_VIP}:{HTTP_PORT}/a") as r:
                assert r.status == 200, await r.text()
                assert served_by(await r.read())[0] == "west"
