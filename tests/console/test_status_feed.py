"""`GET /v1/status` as a blocking query over two real appliances: it wakes for what a peer
exports, not only for this cluster's own catalog (the console's topology feed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .conftest import ConsoleCluster, Federation

pytestmark = pytest.mark.timeout(90)


async def status(c: ConsoleCluster, query: str = "") -> tuple[int, dict[str, Any]]:
    """The status body and its `X-Isthmus-Index`."""
    assert c.http is not None
    async with c.http.get(f"http://{c.api_listen}/v1/status{query}",
                          headers={"Authorization": f"Bearer {c.token()}"}) as r:
        assert r.status == 200, await r.text()
        return int(r.headers["X-Isthmus-Index"]), await r.json()


def names(body: dict[str, Any]) -> set[str]:
    return {f"{s['name']}.{s['namespace']}" for s in body["services"]}


async def test_a_service_a_peer_starts_exporting_wakes_the_status_query(
    federation: Federation,
) -> None:
    east, west = federation.clusters
    index, before = await status(east)
    assert "ratings.default" not in names(before)

    waiter = asyncio.create_task(status(east, f"?index={index}&wait=60s"))
    await asyncio.sleep(0.3)
    assert not waiter.done()  # nothing changed yet: the query blocks
    backend = federation.backends["west"]
    code, out = await west.call("PUT", "/v1/workloads/ratings-west", {
        "service": "ratings", "address": backend.host, "ports": {"http": backend.port},
    })  # a service only west has: east's catalog does not change, its routing table does
    assert code in (200, 201), out
    after, body = await asyncio.wait_for(waiter, 60)
    assert after != index
    assert "ratings.default" in names(body)
