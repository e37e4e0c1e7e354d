"""Three appliances peering over their public (loopback) ingress addresses."""

from __future__ import annotations

import asyncio

from discovery.names import ServiceKey
from federation.trust import tls_accept

from .conftest import Cluster, eventually


async def peers_of(c: Cluster) -> dict[str, dict]:
    status, peers = await c.call("GET", "/v1/peers")
    assert status == 200
    return {p["cluster"]: p for p in peers}


async def test_exports_appear_on_every_peer(mesh: dict[str, Cluster]) -> None:
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    await a.register("r-a1", "reviews")
    await a.register("r-a2", "reviews", check={"ttl": "1h"})  # unknown: not healthy
    await b.register("r-b1", "reviews")
    await b.register("secret", "internal", namespace="ops")  # not exported (*.default only)

    async def c_sees_both() -> dict | None:
        status, svc = await c.call("GET", "/v1/services/default/reviews")
        if status == 200 and set(svc["clusters"]) == {"a", "b"}:
            return svc
        return None

    svc = await eventually(c_sees_both, what="c imports reviews from a and b")
    assert svc["clusters"]["a"] == {"healthy": 1, "total": 2}
    assert svc["clusters"]["b"] == {"healthy": 1, "total": 1}
    assert svc["ports"] == {"http": 9080}
    assert set(svc["cluster_vips"]) == {"a", "b"}
    assert (await c.call("GET", "/v1/services/ops/internal"))[0] == 404

    peers = await eventually(lambda: _connected(c, {"a", "b"}), what="c connected")
    assert peers["a"]["services"] == ["reviews.default"]
    # c's routing table: a and b are remote, same region as each other, not as c
    table = c.app.holder.current
    route = table.get(ServiceKey("reviews"))
    dests = {d.cluster: d for d in route.destinations}
    assert dests["a"].gateways == (a.ingress,) and not dests["a"].local
    assert dests["a"].priority == dests["b"].priority == 2  # c is in eu, a and b in us
    # a sees b in its own region: priority 1, after its local endpoints
    route_a = a.app.holder.current.get(ServiceKey("reviews"))
    await eventually(lambda: _has_dest(a, "reviews", "b"), what="a imports b")
    route_a = a.app.holder.current.get(ServiceKey("reviews"))
    assert [(d.cluster, d.priority) for d in route_a.destinations] == [("a", 0), ("b", 1)]


async def _connected(c: Cluster, names: set[str]) -> dict | None:
    peers = await peers_of(c)
    ok = all(peers[n]["state"] == "connected" for n in names)
    return peers if ok else None


async def _has_dest(c: Cluster, service: str, cluster: str) -> bool:
    route = c.app.holder.current.get(ServiceKey(service))
    return route is not None and route.destination(cluster) is not None


async def test_policy_replicates_to_every_cluster(mesh: dict[str, Cluster]) -> None:
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    await a.register("r-a1", "reviews")
    await b.register("r-b1", "reviews")
    status, policy = await a.call("PUT", "/v1/services/default/reviews/traffic",
                                  {"weights": {"a": 20, "b": 80}, "failover": True})
    assert status == 200 and policy["weights"] == {"a": 20, "b": 80}

    for other in (b, c):
        async def replicated(o: Cluster = other) -> bool:
            s, p = await o.call("GET", "/v1/services/default/reviews/traffic")
            return s == 200 and p["version"] == policy["version"]

        await eventually(replicated, what=f"policy on {other.name}")

    async def c_weights() -> bool:
        route = c.app.holder.current.get(ServiceKey("reviews"))
        return route is not None and {d.cluster: d.weight for d in route.destinations} == {
            "a": 20, "b": 80}

    await eventually(c_weights, what="c's table follows the weights")

    # reset replicates too
    assert (await b.call("DELETE", "/v1/services/default/reviews/traffic"))[0] == 204

    async def gone_everywhere() -> bool:
        codes = [(await o.call("GET", "/v1/services/default/reviews/traffic"))[0]
                 for o in (a, b, c)]
        return codes == [404, 404, 404]

    await eventually(gone_everywhere, what="reset replicated")


async def test_concurrent_writes_converge(mesh: dict[str, Cluster]) -> None:
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    await eventually(lambda: _connected(a, {"b", "c"}), what="a connected")
    path = "/v1/services/default/reviews/traffic"
    (_, pa), (_, pb) = await asyncio.gather(
        a.call("PUT", path, {"weights": {"a": 100, "b": 0}}),
        b.call("PUT", path, {"weights": {"a": 0, "b": 100}}),
    )
    winner = max([pa, pb], key=lambda p: tuple(
        int(x) if x.isdigit() else x for x in p["version"].split(".", 2)))

    async def converged() -> bool:
        got = [(await o.call("GET", path))[1] for o in (a, b, c)]
        return all(g and g["version"] == winner["version"] for g in got)

    await eventually(converged, what="all clusters on the same winner")
    _, final = await c.call("GET", path)
    assert final["weights"] == winner["weights"]


async def test_bad_policies_are_rejected(mesh: dict[str, Cluster]) -> None:
    a = mesh["a"]
    path = "/v1/services/default/reviews/traffic"
    cases = [
        ({"weights": {"a": 1, "zz": 1}}, "weights.zz", "unknown cluster"),
        ({"weights": {"a": -1}}, "weights.a", "integer from 0"),
        ({"weights": {"a": 0, "b": 0}}, "weights", "greater than 0"),
        ({"weights": {"a": 1.5}}, "weights.a", "integer"),
        ({"weights": {"a": 1}, "failover": "yes"}, "failover", "true or false"),
        ({"weights": {"a": 1}, "color": 1}, "color", "unknown field"),
        ({}, "weights", "at least one cluster"),
    ]
    for body, field, needle in cases:
        status, err = await a.call("PUT", path, body)
        assert status == 422, (body, err)
        assert err["field"] == field and needle in err["error"], (body, err)
    assert (await a.call("GET", path))[0] == 404  # nothing stored


async def test_partition_keeps_last_exports_then_converges(mesh: dict[str, Cluster]) -> None:
    a, b = mesh["a"], mesh["b"]
    await b.register("r-b1", "reviews")
    await eventually(lambda: _has_dest(a, "reviews", "b"), what="a imports b")
    await b.stop()

    async def stale() -> bool:
        return (await peers_of(a))["b"]["state"] == "stale"

    await eventually(stale, timeout=30, what="b stale on a")
    assert await _has_dest(a, "reviews", "b")  # last-known exports kept
    status, svc = await a.call("GET", "/v1/services/default/reviews")
    assert status == 200 and "b" in svc["clusters"]
    # a keeps serving its own services and its API during the partition
    await a.register("r-a1", "reviews")
    # b comes back with a new workload: a converges without an operator
    await b.start()
    await b.register("r-b2", "reviews")

    async def converged() -> bool:
        _, svc = await a.call("GET", "/v1/services/default/reviews")
        peers = await peers_of(a)
        return peers["b"]["state"] == "connected" and svc["clusters"].get("b", {}).get(
            "total") == 2

    await eventually(converged, timeout=30, what="a converges on b's new state")


async def test_restart_keeps_vips_and_policies(mesh: dict[str, Cluster]) -> None:
    a = mesh["a"]
    await a.register("r-a1", "reviews")

    async def routed() -> dict | None:
        _, svc = await a.call("GET", "/v1/services/default/reviews")
        return svc if "cluster_vips" in svc else None

    before = await eventually(routed, what="reviews in a's routing table")
    _, policy = await a.call("PUT", "/v1/services/default/reviews/traffic",
                             {"weights": {"a": 1, "b": 3}, "failover": False})
    await a.stop()
    await a.start()
    after = await routed()
    assert after is not None and after["vip"] == before["vip"]
    assert after["cluster_vips"]["a"] == before["cluster_vips"]["a"]
    _, again = await a.call("GET", "/v1/services/default/reviews/traffic")
    assert again == policy


async def test_a_peer_with_another_clusters_identity_is_refused(
    mesh: dict[str, Cluster],
) -> None:
    """a is told that 'b' lives where a server presents c's (valid) gateway identity."""
    a, c = mesh["a"], mesh["c"]
    assert c.app is not None and c.app.trust is not None
    creds = c.app.trust.credentials  # c's real identity, from the shared root
    accepted = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            conn = await tls_accept(reader, writer, creds)
            accepted.append(conn.peer)
            await asyncio.sleep(5)
        except Exception:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(impostor, c.host, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await a.stop()
        a.peers = {"b": f"{c.host}:{port}"}
        await a.start()

        async def refused() -> dict | None:
            peer = (await peers_of(a))["b"]
            return peer if peer["error"] else None

        peer = await eventually(refused, what="a refuses the impostor")
        assert peer["state"] == "unreachable"
        assert "cluster" in peer["error"], peer["error"]
        assert not await _has_dest(a, "reviews", "c")
