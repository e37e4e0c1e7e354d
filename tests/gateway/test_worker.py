"""Worker processes sharing VIP listeners with SO_REUSEPORT, fed tables over a pipe."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from pathlib import Path

import aiohttp
import pytest
from gw_topology import PORTS, SERVICE, TD, Backend, Pki

from federation.routing import Destination, RoutingTable, ServiceRoute
from federation.trust.pemfiles import write_bundle, write_identity
from gateway.egress import EgressConfig
from gateway.probe import ProbeConfig
from gateway.worker import TlsPaths, WorkerPool, WorkerSpec

pytestmark = pytest.mark.timeout(90)


def table(backends: list[Backend], vips: list[str], version: int) -> RoutingTable:
    eps = tuple(b.endpoint for b in backends)
    routes = [
        ServiceRoute(
            dataclasses.replace(SERVICE, name=f"s{i}"),
            ipaddress.ip_address(vip),
            PORTS,
            (Destination("east", True, healthy=len(eps), endpoints=eps),),
        )
        for i, vip in enumerate(vips)
    ]
    return RoutingTable.build(version, "east", TD, routes, frozenset({"east"}))


async def test_workers_share_listeners_and_follow_tables(tmp_path: Path) -> None:
    pki = Pki.create()
    cert, key, bundle = tmp_path / "node.pem", tmp_path / "node.key", tmp_path / "bundle.pem"
    write_identity(cert, key, pki.east, force=True)
    write_bundle(bundle, pki.bundle)
    backend = Backend("east", "b0", "127.0.30.10")
    await backend.start()
    spec = WorkerSpec(
        TlsPaths(str(cert), str(key), str(bundle)),
        "east",
        egress=EgressConfig(vip_cidr="127.243.0.0/16", probe=ProbeConfig(enabled=False)),
    )
    pool = WorkerPool(spec, 2)
    try:
        async with asyncio.timeout(60):
            await pool.start(table([backend], ["127.243.0.1"], 1))
            assert len(pool.pids) == 2
            async with aiohttp.ClientSession() as s:
                for _ in range(20):
                    async with s.get(
                        "http://127.243.0.1:9080/", headers={"Connection": "close"}
                    ) as r:
                        assert r.status == 200
                pool.publish(table([backend], ["127.243.0.1", "127.243.0.2"], 2))
                pool.reload_credentials()
                for _ in range(200):  # both workers open the new VIP soon after the table
                    try:
                        async with s.get("http://127.243.0.2:9080/") as r:
                            assert r.status == 200
                            break
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the new VIP never opened")
            assert backend.requests >= 21
    finally:
        await pool.stop(drain=1)
        await backend.stop()
