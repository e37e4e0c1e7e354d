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

from gateway.egress import EgressConfig

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
    config = EgressConfig(vip_cidr="127.241.0.0/16", multiplex=False)
    async with asyncio.timeout(30), topology(pki, config=config) as topo:
        payload = b"x" * 300_000
        assert await tcp_round_trip(str(EAST_ONLY_VIP), payload) == payload
        for i in range(4):
            data = b"%d" % i * 1000
            assert await tcp_round_trip(str(WEST_ONLY_VIP), data) == data
        pool = topo.egress.pool
        assert pool.misses >= 1 and pool.hits >= 1
        # The hits' replacements are dialled a moment later, with the session of an earlier dial.
        while pool.resumed == 0:
            await asyncio.sleep(0.01)
        assert pool.resumed < pool.dials  # the first one cannot resume


async def test_l4_remote_streams_share_tunnels(pki: Pki) -> None:
    """With multiplexing (the default) every remote connection is a stream: concurrent ones
    share at most `mux.connections` TLS connections to the ingress and need no handshake."""
    async with asyncio.timeout(30), topology(pki) as topo:
        payloads = [b"%d" % i * (1000 + 50_000 * i) for i in range(8)]
        got = await asyncio.gather(*(tcp_round_trip(str(WEST_ONLY_VIP), p) for p in payloads))
        assert got == payloads
        for i in range(4):
            data = b"%d" % i * 1000
            assert await tcp_round_trip(str(WEST_ONLY_VIP), data) == data
        tunnels = topo.egress.tunnels
        assert tunnels.streams_opened == 12
        assert 1 <= tunnels.dials <= topo.egress.config.mux.connections
        assert topo.egress.pool.dials == 0
        # Closed streams leave their connections: nothing is left open.
        conns = tunnels.connections(topo.west.gateway)
        for _ in range(100):
            if not any(c.streams for c in conns):
                break
            await asyncio.sleep(0.01)
        assert conns and not any(c.streams for c in conns)


async def get_many(
    url: str, n: int, concurrency: int = 16, on_progress: object = None
) -> tuple[collections.Counter[str], list[str]]:
    """GET `url` n times; count which cluster served each, and collect failures."""
    served: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    done = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = iter(range(n))

        async def worker() -> None:
            nonlocal done
            for _ in queue:
                try:
                    async with session.get(url) as r:
                        body = await r.read()
                        if r.status == 200:
                            served[served_by(body)[0]] += 1
                        else:
                            failures.append(f"{r.status} {body[:200]!r}")
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))
                done += 1
                if callable(on_progress):
                    await on_progress(done)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served, failures


async def test_traffic_split_follows_weights(pki: Pki) -> None:
    async with asyncio.timeout(60), topology(pki) as topo:
        topo.publish(east_weight=30, west_weight=70)
        served, failures = await get_many(f"http://{VIP}:{HTTP_PORT}/", 2000)
        assert failures == []
        assert sum(served.values()) == 2000
        assert abs(served["west"] / 2000 - 0.70) <= 0.05, served
        assert abs(served["east"] / 2000 - 0.30) <= 0.05, served


async def test_killing_a_clusters_backends_fails_no_idempotent_request(pki: Pki) -> None:
    async with asyncio.timeout(60), topology(pki) as topo:
        topo.publish(east_weight=50, west_weight=50)

        async def kill_at(done: int) -> None:
            if done == 150:
                for b in topo.west.backends:
                    await b.stop()

        served, failures = await get_many(f"http://{VIP}:{HTTP_PORT}/", 800, 8, kill_at)
        assert failures == []
        assert served["west"] > 0 and served["east"] > served["west"]
        assert topo.egress.http.retries > 0


async def test_killing_a_clusters_ingress_fails_no_idempotent_request(pki: Pki) -> None:
    async with asyncio.timeout(60), topology(pki) as topo:
        topo.publish(east_weight=50, west_weight=50)
        ingress = topo.west.ingress
        assert ingress is not None

        async def kill_at(done: int) -> None:
            if done == 150:
                await ingress.close()

        served, failures = await get_many(f"http://{VIP}:{HTTP_PORT}/", 800, 8, kill_at)
        assert failures == []
        assert served["west"] > 0 and served["east"] > served["west"]


async def test_l4_connections_fail_over_when_the_remote_ingress_is_gone(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki) as topo:
        topo.publish(east_weight=0, west_weight=1)  # all of it to west while west is up
        assert await tcp_round_trip(str(VIP), b"before") == b"before"
        assert topo.west.ingress is not None
        await topo.west.ingress.close()  # its pooled tunnels break and leave the pool
        for i in range(10):  # failover is on: the connect failure moves to east's endpoints
            assert await tcp_round_trip(str(VIP), b"after%d" % i) == b"after%d" % i


async def test_probes_take_a_dead_ingress_out_and_bring_it_back(pki: Pki) -> None:
    from gateway.balancer import Target, TargetKind
    from gateway.egress import EgressConfig
    from gateway.ingress import Ingress, IngressConfig
    from gateway.probe import ProbeConfig

    config = EgressConfig(vip_cidr="127.241.0.0/16", probe=ProbeConfig(interval=0.05, timeout=1))
    async with asyncio.timeout(30), topology(pki, config=config) as topo:
        gateway = topo.west.gateway
        target = Target("west", TargetKind.GATEWAY, gateway)
        balancer = topo.egress.balancer
        while topo.egress.prober.probes < 3:
            await asyncio.sleep(0.02)
        assert not balancer.is_down(target)
        assert topo.west.ingress is not None
        await topo.west.ingress.close()
        topo.west.ingress = None
        while not balancer.is_down(target):
            await asyncio.sleep(0.02)
        # Down by probes alone: traffic pinned nowhere goes to east without a failed connect.
        served, failures = await get_many(f"http://{VIP}:{HTTP_PORT}/", 50, 4)
        assert failures == [] and served == {"east": 50}
        host, port = gateway.rsplit(":", 1)
        revived = Ingress(IngressConfig(host=host, port=int(port)), topo.west.ingress_holder,
                          topo.west.credentials)  # type: ignore[arg-type]  # fmt: skip
        await revived.start()
        topo.west.ingress = revived
        while balancer.is_down(target):
            await asyncio.sleep(0.02)


async def test_5xx_is_returned_and_counted_and_post_is_not_retried(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki) as topo, aiohttp.ClientSession() as s:
        async with s.get(f"http://{EAST_ONLY_VIP}:{HTTP_PORT}/status/500") as r:
            assert r.status == 500  # 500 is the application's answer: passed on, not retried
        assert topo.egress.http.retries == 0
        assert topo.west.ingress is not None
        await topo.west.ingress.close()
        async with s.post(f"http://{WEST_ONLY_VIP}:{HTTP_PORT}/", data=b"x") as r:
            assert r.status == 502
        assert topo.egress.http.retries == 0
        async with s.put(f"http://{WEST_ONLY_VIP}:{HTTP_PORT}/", data=b"x") as r:
            assert r.status == 502  # pinned to west: a retry has nowhere else to go
        assert topo.egress.http.retries >= 1


async def test_isthmus_and_hop_by_hop_headers_are_stripped(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki), aiohttp.ClientSession() as s:
        for vip in (EAST_ONLY_VIP, WEST_ONLY_VIP):
            headers = {
                "X-Isthmus-Cluster": "west",
                "x-isthmus-anything": "1",
                "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "1",
                "X-Keep": "kept",
            }
            async with s.put(f"http://{vip}:{HTTP_PORT}/h", headers=headers, data=b"abc") as r:
                assert r.status == 200
                seen = (await r.json())["headers"]
            assert seen["x-keep"] == "kept"
            assert not [h for h in seen if h.startswith("x-isthmus-") or h == "x-drop-me"]
            assert seen["host"] == f"{vip}:{HTTP_PORT}"


async def raw_http(host: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, HTTP_PORT)
    try:
        writer.write(data)
        return await reader.read(65536)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


async def test_bad_http_input_is_answered_400_and_others_keep_being_served(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki):
        vip = str(EAST_ONLY_VIP)
        assert status_of(await raw_http(vip, b"\x16\x03\x01\x00\x05hello\r\n\r\n")) == 400
        huge = b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert status_of(await raw_http(vip, huge)) in (400, 431)
        negative = b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"
        assert status_of(await raw_http(vip, negative)) == 400
        assert status_of(await raw_http(vip, b"\x00" * 100 + b"\r\n\r\n")) == 400
        ok = await raw_http(vip, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert status_of(ok) == 200


async def test_unknown_ports_and_vips_are_not_served(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki):
        for host, port in ((str(VIP), 9999), ("127.241.0.99", HTTP_PORT)):
            with pytest.raises(OSError):
                await asyncio.open_connection(host, port)


async def test_graceful_drain_lets_requests_and_connections_finish(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki) as topo, aiohttp.ClientSession() as s:
        for b in topo.east.backends:
            b.delay = 0.5
        reader, writer = await asyncio.open_connection(str(EAST_ONLY_VIP), TCP_PORT)
        request = asyncio.create_task(s.get(f"http://{EAST_ONLY_VIP}:{HTTP_PORT}/slow"))
        while not any(b.requests for b in topo.east.backends):
            await asyncio.sleep(0.01)
        closing = asyncio.create_task(topo.egress.close(drain=10))
        await asyncio.sleep(0.05)
        with pytest.raises(OSError):  # no new connections while draining
            await asyncio.open_connection(str(EAST_ONLY_VIP), HTTP_PORT)
        response = await request
        assert response.status == 200
        response.release()
        writer.write(b"still open")
        assert await reader.readexactly(10) == b"still open"
        writer.close()
        await closing


async def test_drain_timeout_closes_what_is_left(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki) as topo:
        reader, writer = await asyncio.open_connection(str(WEST_ONLY_VIP), TCP_PORT)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        await topo.egress.close(drain=0.2)
        assert await reader.read() == b""
        writer.close()


async def test_table_swaps_keep_connections_and_follow_listeners(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki) as topo:
        reader, writer = await asyncio.open_connection(str(WEST_ONLY_VIP), TCP_PORT)
        keys_before = set(topo.egress.listeners)
        topo.publish(east_weight=10, west_weight=90)
        await asyncio.sleep(0.05)
        assert set(topo.egress.listeners) == keys_before
        writer.write(b"one")
        assert await reader.readexactly(3) == b"one"
        # Drop the cluster VIPs: their listeners close, the open connection drains on.
        topo.publish(east_weight=10, west_weight=90, cluster_vips={})
        for _ in range(100):
            if len(topo.egress.listeners) == 2:
                break
            await asyncio.sleep(0.02)
        assert {k[0] for k in topo.egress.listeners} == {VIP}
        with pytest.raises(OSError):
            await asyncio.open_connection(str(WEST_ONLY_VIP), TCP_PORT)
        writer.write(b"two")
        assert await reader.readexactly(3) == b"two"
        writer.close()


async def test_identity_swap_keeps_connections(pki: Pki) -> None:
    from federation.trust.ca import issue_identity

    async with asyncio.timeout(30), topology(pki) as topo:
        reader, writer = await asyncio.open_connection(str(WEST_ONLY_VIP), TCP_PORT)
        writer.write(b"one")
        assert await reader.readexactly(3) == b"one"
        assert topo.east.credentials is not None
        tunnels = topo.egress.tunnels
        old = tunnels.connections(topo.west.gateway)
        dials = tunnels.dials
        renewed = issue_identity(pki.east_ca, "gateway", "east-gw")  # type: ignore[arg-type]
        topo.east.credentials.update(identity=renewed)
        assert await tcp_round_trip(str(WEST_ONLY_VIP), b"new") == b"new"
        assert tunnels.dials > dials  # no tunnel of the old identity takes new streams
        assert all(c.going_away for c in old)
        writer.write(b"two")  # ... but the stream it carries goes on
        assert await reader.readexactly(3) == b"two"
        writer.close()
        for _ in range(200):  # and once that stream is done, the old tunnel closes
            if all(c.lost for c in old):
                break
            await asyncio.sleep(0.01)
        assert all(c.lost for c in old)


async def test_garbage_on_an_l4_port_is_relayed_and_resets_are_contained(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki):
        sock = socket.create_connection((str(WEST_ONLY_VIP), TCP_PORT))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(b"\x00\xff" * 1000)
        sock.close()  # RST
        with contextlib.suppress(OSError):
            sock.close()
        assert await tcp_round_trip(str(WEST_ONLY_VIP), b"fine") == b"fine"
