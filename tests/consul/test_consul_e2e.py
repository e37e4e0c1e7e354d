"""End to end: two appliances, one cluster each, on loopback. East keeps its catalog in Consul
(the stand-in), west in its embedded store. A service registered in Consul is called from west
through west's egress and east's ingress; a VM workload registered through east's API lands in
Consul with its check; Consul stopping keeps traffic flowing and shows stale; Consul starting
again recovers; services west exports are never written into Consul."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import REGISTRY

from discovery.names import ServiceKey
from isthmus import config as configmod
from isthmus.appliance import Appliance
from isthmus.render import render_status
from tests.consul_standin.fixture import standin_host
from tests.consul_standin.standin import ConsulStandIn, Policy
from tests.federation.conftest import Backend, Cluster, eventually, make_pki

_nets = itertools.count(1)
TOKEN = "e2e-consul-acl-token"


class ConsulCluster(Cluster):
    """An appliance whose catalog is Consul."""

    def __init__(self, *args: Any, consul_address: str, token_file: Path, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.consul_address, self.token_file = consul_address, token_file

    def config(self) -> dict[str, Any]:
        raw = super().config()
        raw["discovery"] = {
            **raw["discovery"],
            "backend": "consul",
            "consul": {
                "address": self.consul_address,
                "token_file": str(self.token_file),
                "wait": "30s",
                "request_timeout": "1s",
                "liveness_interval": "200ms",
                "retry_max": "500ms",
                "query_min_interval": "50ms",
            },
        }
        return raw

    async def start(self) -> None:
        # from a file, as `isthmus run --config` does: SIGHUP (`reload`) reads it again
        path = self.dir / f"{self.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config()))
        self.app = Appliance(configmod.load(path), str(path))
        await self.app.start()
        if self.http is None:
            self.http = aiohttp.ClientSession()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    n = (next(_nets) + 11 * (os.getpid() % 20)) % 200
    # names of their own: the metrics registry is shared by every appliance of this process
    make_pki(tmp_path, ["ceast", "cwest"])
    consul = ConsulStandIn(standin_host(), acl_tokens={TOKEN: Policy(read=True, write=True)})
    token_file = tmp_path / "consul-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    roles = ("control", "ingress", "egress")
    east = ConsulCluster("ceast", tmp_path, f"127.64.{n}.1", "us", vip_cidr=f"127.243.{n}.0/24",
                         roles=roles, consul_address="", token_file=token_file)
    west = Cluster("cwest", tmp_path, f"127.64.{n}.2", "eu", vip_cidr=f"127.244.{n}.0/24",
                   roles=roles)
    east.peers, west.peers = {"cwest": west.ingress}, {"ceast": east.ingress}
    reviews = Backend("east", f"127.65.{n}.1")  # a service only Consul knows of
    ratings = Backend("west", f"127.65.{n}.2")  # west's own
    try:
        await consul.start()
        east.consul_address = consul.address
        await reviews.up()
        await ratings.up()
        consul.register_entity({
            "Node": "vm-db", "Address": reviews.host, "NodeMeta": {"region": "us"},
            "Service": {"ID": "reviews-1", "Service": "reviews", "Port": reviews.port,
                        "Meta": {"isthmus-port": "http"}},
        })
        await asyncio.gather(east.start(), west.start())
        yield {"consul": consul, "east": east, "west": west, "reviews": reviews,
               "ratings": ratings}
    finally:
        consul.hang(False)
        await asyncio.gather(east.close(), west.close(), return_exceptions=True)
        await asyncio.gather(reviews.down(), ratings.down(), consul.stop(),
                             return_exceptions=True)


def route(c: Cluster, name: str):
    assert c.app is not None
    return c.app.holder.current.get(ServiceKey(name))


async def call_via_egress(c: Cluster, name: str) -> str:
    r = route(c, name)
    port = next(iter(r.ports.values()))
    async with aiohttp.ClientSession() as s, s.get(f"http://{r.vip}:{port}/x") as resp:
        body = await resp.text()
        assert resp.status == 200, (resp.status, body)
        return body


async def reachable_from_west(world: dict[str, Any]) -> None:
    west = world["west"]

    async def east_healthy() -> bool:
        r = route(west, "reviews")
        d = r.destination("ceast") if r else None
        return d is not None and d.healthy == 1

    await eventually(east_healthy, timeout=30, what="west routes reviews to east")


async def stale_on(c: Cluster) -> bool:
    _, status = await c.call("GET", "/v1/status")
    return bool(status["catalog"]["stale"])


async def test_consul_backed_cluster_in_a_federation(world: dict[str, Any]) -> None:
    consul, east, west = world["consul"], world["east"], world["west"]

    # 1. a service registered in Consul is callable from west: west's egress, east's ingress
    await reachable_from_west(world)
    assert await call_via_egress(west, "reviews") == "east"
    _, status = await east.call("GET", "/v1/status")
    assert status["catalog"]["backend"] == "ConsulCatalog"
    assert status["catalog"]["stale"] is False
    assert status["catalog"]["consul"]["node"] == consul.node_name

    # 2. a VM workload registered through east's API lands in Consul with its check
    code, out = await east.call("PUT", "/v1/workloads/vm-17-web", {
        "service": "web", "address": "127.0.0.17", "ports": {"http": 8080},
        "check": {"ttl": "30s", "deregister_after": "1h"}})
    assert code == 201, out
    svc = consul.agent_services()["vm-17-web"]
    assert (svc.name, svc.address, svc.port) == ("web", "127.0.0.17", 8080)
    assert svc.meta["isthmus-source"] == "api"
    check = consul.agent_checks()["service:vm-17-web"]
    assert (check.type, check.ttl, check.deregister_after) == ("ttl", 30.0, 3600.0)
    code, out = await east.call("PUT", "/v1/workloads/vm-17-web/heartbeat")
    assert code == 200 and out["health"] == "passing", out
    assert consul.agent_checks()["service:vm-17-web"].status == "passing"

    # 3. west's own exported service reaches east, and is never written into Consul
    code, out = await west.call("PUT", "/v1/workloads/ratings-1", {
        "service": "ratings", "address": world["ratings"].host,
        "ports": {"http": world["ratings"].port}})
    assert code == 201, out

    async def east_imports_ratings() -> bool:
        r = route(east, "ratings")
        return r is not None and r.destination("cwest") is not None

    await eventually(east_imports_ratings, timeout=30, what="east imports ratings")
    assert await call_via_egress(east, "ratings") == "west"
    names = {s.name for s in consul.state.services.values()}
    assert names == {"reviews", "web"}
    assert not any("ratings" in key and "/owners/" in key for key in consul.state.kv)

    # 4. Consul stops: traffic keeps flowing, east says it is stale
    await consul.stop()
    await eventually(lambda: stale_on(east), what="east marked stale")
    assert await call_via_egress(west, "reviews") == "east"
    assert route(west, "reviews").destination("ceast").healthy == 1  # no endpoint dropped
    assert REGISTRY.get_sample_value("isthmus_catalog_stale", {"cluster": "ceast"}) == 1.0
    _, status = await east.call("GET", "/v1/status")
    _, workloads = await east.call("GET", "/v1/workloads")
    text = render_status(status, workloads, time.time())
    assert "the catalog is STALE" in text and "cannot connect" in text

    # 5. Consul back: east recovers by itself and follows changes again
    consul.register_entity({"Node": "vm-db2", "Address": world["reviews"].host,
                            "Service": {"ID": "reviews-2", "Service": "reviews",
                                        "Port": world["reviews"].port,
                                        "Meta": {"isthmus-port": "http"}}})
    await consul.start()

    async def fresh() -> bool:
        return not await stale_on(east)

    await eventually(fresh, what="east fresh again")
    assert REGISTRY.get_sample_value("isthmus_catalog_stale", {"cluster": "ceast"}) == 0.0

    async def two_reviews() -> bool:
        r = route(west, "reviews")
        d = r.destination("ceast") if r else None
        return d is not None and d.total == 2

    await eventually(two_reviews, timeout=30, what="the instance added while Consul was away")
    assert await call_via_egress(west, "reviews") == "east"


async def test_a_rotated_consul_token_is_used_after_a_reload(world: dict[str, Any]) -> None:
    """Rotating Consul's ACL token: a new file content and SIGHUP (`reload`), no restart."""
    consul, east = world["consul"], world["east"]
    assert east.app is not None
    consul.acl_tokens["rotated-consul-acl-token"] = Policy(read=True, write=True)
    east.token_file.write_text("rotated-consul-acl-token\n")
    del consul.acl_tokens[TOKEN]  # the old token is revoked
    assert await east.app.reload()
    code, out = await east.call("PUT", "/v1/workloads/vm-18-web", {
        "service": "web", "address": "127.0.0.18", "ports": {"http": 8080},
        "check": {"ttl": "30s"}})
    assert code == 201, out
    assert "vm-18-web" in consul.agent_services()

    # a token file others may read is refused: the running token stays, and says why
    east.token_file.write_text("leaked\n")
    east.token_file.chmod(0o644)
    assert not await east.app.reload()
    east.token_file.chmod(0o600)
    code, out = await east.call("DELETE", "/v1/workloads/vm-18-web")
    assert code in (200, 204), out
    assert "vm-18-web" not in consul.agent_services()
