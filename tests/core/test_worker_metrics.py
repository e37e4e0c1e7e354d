"""`workers: N`: the data-plane workers' metrics reach the appliance's /metrics, added up, and
their traffic reaches the console's figures (/v1/edges, /v1/services/.../requests)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from isthmus import config as configmod
from isthmus.api import INDEX_HEADER
from isthmus.appliance import Appliance
from isthmus.identity import ensure_local_pki

from .conftest import ApiSession, free_port, loopback_host, make_config

pytestmark = pytest.mark.timeout(120)

REQUESTS = 40


async def _hi(_: web.Request) -> web.Response:
    return web.Response(text="hi")


def edge_requests_total(text: str, cluster: str) -> float:
    """`isthmus_edge_requests_total` of the egress edge `cluster` -> `cluster`, ok and error."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "isthmus_edge_requests_total"
                and s.labels.get("gateway") == "egress"
                and s.labels.get("source_cluster") == cluster
                and s.labels.get("destination_cluster") == cluster
            ):
                total += s.value
    return total


def requests_total(text: str, service: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "isthmus_requests":
            continue
        for s in family.samples:
            if (
                s.name == "isthmus_requests_total"
                and s.labels.get("destination_service") == service
                and s.labels.get("outcome") == "ok"
            ):
                total += s.value
    return total


async def test_requests_served_by_two_workers_add_up_in_metrics(tmp_path: Path) -> None:
    backend_host = loopback_host()
    app = web.Application()
    app.router.add_get("/{tail:.*}", _hi)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, backend_host, free_port(backend_host))
    await site.start()
    backend_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    host = loopback_host()
    raw = make_config(
        tmp_path, roles=["control", "egress"], workers=2,
        control={"listen": f"{host}:{free_port(host)}"},
        egress={"vip_cidr": f"127.252.{os.getpid() % 250}.0/24"},
    )  # fmt: skip
    ensure_local_pki(configmod.validate(raw))
    appliance = Appliance(configmod.validate(raw))
    try:
        async with asyncio.timeout(100):
            await appliance.start()
            assert appliance.egress_workers is not None and len(appliance.egress_workers.pids) == 2
            api = ApiSession(appliance.api_url,
                             Path(raw["api"]["token_file"]).read_text().strip())  # fmt: skip
            try:
                body = {"service": "counted", "address": backend_host,
                        "ports": {"http": backend_port}}  # fmt: skip
                status, _, _ = await api.call("PUT", "/v1/workloads/w1", body)
                assert status == 201
                status, svc, _ = await api.call("GET", "/v1/services/default/counted")
                assert status == 200
                url = f"http://{svc['vip']}:{svc['ports']['http']}/"
                async with aiohttp.ClientSession() as s:
                    for _ in range(400):  # the workers open the VIP once the table reaches them
                        try:
                            async with s.get(url, headers={"Connection": "close"}) as r:
                                if r.status == 200:
                                    break
                        except aiohttp.ClientConnectorError:
                            pass
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("the VIP never answered")
                    # New connections: SO_REUSEPORT spreads them over both workers.
                    for _ in range(REQUESTS - 1):
                        async with s.get(url, headers={"Connection": "close"}) as r:
                            assert r.status == 200
                    assert appliance.metrics_address is not None
                    mhost, mport = appliance.metrics_address
                    async with s.get(f"http://{mhost}:{mport}/metrics") as r:
                        text = await r.text()
                assert requests_total(text, "counted.default") == REQUESTS
                cluster = raw["cluster"]
                assert edge_requests_total(text, cluster) == REQUESTS
                # The console's figures: the history gathers the workers' totals every tick.
                index, served = 0, 0
                async with asyncio.timeout(30):
                    while served < REQUESTS:
                        status, body, r = await api.call(
                            "GET", f"/v1/edges?window=5m&index={index}&wait=10s"
                        )
                        assert status == 200
                        index = int(r.headers[INDEX_HEADER])
                        served = sum(e["requests"] for e in body["edges"]
                                     if e["gateway"] == "egress"
                                     and e["source"] == e["destination"] == cluster)  # fmt: skip
                assert served == REQUESTS
                status, body, _ = await api.call("GET", "/v1/services/default/counted/requests")
                assert status == 200
                assert sum(body["egress"][cluster]["requests"]) == REQUESTS
            finally:
                await api.close()
    finally:
        await appliance.stop()
        await runner.cleanup()
