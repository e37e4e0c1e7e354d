"""The L7 engine (gateway/l7/) on the two-cluster loopback topology: keep-alive upstream reuse
over the mTLS tunnel, pipelining, chunked and large responses, and what once went to aiohttp
(HTTP/1.0, Expect, chunked and large request bodies, upgrades) served by the engine itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from gw_topology import EAST_ONLY_VIP, HTTP_PORT, WEST_ONLY_VIP, Pki, topology

from gateway.proto.h1 import BodyKind, BodyScanner, parse_response_head

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> tuple[int, bytes]:
    """One response from a raw connection, framed with the parser under test's own rules."""
    buf = b""
    while (head := parse_response_head(buf, method)) is None:
        chunk = await reader.read(65536)
        assert chunk, "connection closed before a response head"
        buf += chunk
    body, rest = b"", buf[head.size :]
    scanner = BodyScanner(head.body, head.length)
    while True:
        n = scanner.scan(rest)
        body += rest[:n]
        if scanner.done:
            return head.status, body
        rest = await reader.read(65536)
        if not rest and head.body is BodyKind.UNTIL_CLOSE:
            return head.status, body
        assert rest, "connection closed inside a body"


async def test_pipelined_requests_share_a_kept_upstream_connection(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki) as topo:
        reader, writer = await asyncio.open_connection(str(WEST_ONLY_VIP), HTTP_PORT)
        get = b"GET /p%d HTTP/1.1\r\nHost: r\r\nX-Isthmus-Cluster: east\r\n\r\n"
        writer.write(get % 1 + get % 2 + get % 3)  # three requests in one segment
        for _ in range(3):
            status, body = await read_response(reader)
            seen = json.loads(body)
            assert status == 200 and seen["cluster"] == "west"
            assert "x-isthmus-cluster" not in seen["headers"]
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: r\r\n\r\n")
        assert (await read_response(reader, "HEAD"))[0] == 200
        writer.close()
        upstreams = topo.egress.http.upstreams
        assert upstreams.reuses >= 3 and upstreams.dials <= 2  # not one tunnel per request


async def test_chunked_and_large_responses_stream_through(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki), aiohttp.ClientSession() as s:
        for n in (0, 10, 70_000, 3 << 20):
            async with s.get(f"http://{WEST_ONLY_VIP}:{HTTP_PORT}/chunked/{n}") as r:
                assert r.status == 200
                assert await r.read() == b"c" * n
        async with s.get(f"http://{WEST_ONLY_VIP}:{HTTP_PORT}/after") as r:
            assert r.status == 200  # the same client connection goes on after a stream


async def test_http10_chunked_bodies_and_expect_are_served_by_the_engine(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki):
        reader, writer = await asyncio.open_connection(str(WEST_ONLY_VIP), HTTP_PORT)
        writer.write(b"GET /old HTTP/1.0\r\nHost: r\r\n\r\n")
        status, body = await read_response(reader)
        assert status == 200 and json.loads(body)["cluster"] == "west"
        writer.close()

        async def parts() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"x" * 1000

        async with aiohttp.ClientSession() as s:
            url = f"http://{WEST_ONLY_VIP}:{HTTP_PORT}/up"
            async with s.put(url, data=parts()) as r:  # chunked request body
                assert r.status == 200 and (await r.json())["body"] == 3000
        # The engine answers 100 Continue itself.
        async with (
            aiohttp.ClientSession() as s,
            s.put(url, data=b"y" * 500, expect100=True) as r,
        ):
            assert r.status == 200 and (await r.json())["body"] == 500
            assert "expect" not in (await r.json())["headers"]


async def test_websockets_and_large_uploads_go_through_locally_and_across_the_tunnel(
    pki: Pki,
) -> None:
    """An upgrade is forwarded and relayed as bytes after the 101; a body above the retry
    buffer (1 MiB) streams through once."""
    async with asyncio.timeout(30), topology(pki), aiohttp.ClientSession() as s:
        for vip, cluster in ((EAST_ONLY_VIP, "east"), (WEST_ONLY_VIP, "west")):
            async with s.ws_connect(f"http://{vip}:{HTTP_PORT}/ws") as ws:
                for i in range(3):
                    await ws.send_str(f"m{i}")
                    assert (await ws.receive_str()) == f"{cluster}:m{i}"
            big = b"u" * (3 << 20)
            async with s.put(f"http://{vip}:{HTTP_PORT}/up", data=big) as r:
                assert r.status == 200 and (await r.json())["body"] == len(big)


async def test_gateway_errors_carry_the_error_header_and_keep_the_connection(pki: Pki) -> None:
    async with asyncio.timeout(30), topology(pki) as topo:
        assert topo.west.ingress is not None
        await topo.west.ingress.close()
        reader, writer = await asyncio.open_connection(str(WEST_ONLY_VIP), HTTP_PORT)
        writer.write(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await reader.read(65536)
        head = parse_response_head(buf, "GET")
        assert head is not None and head.status == 502
        assert b"x-isthmus-error: upstream failed" in head.forward
        await read_body(reader, buf[head.size :], head.length)
        writer.write(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
        assert (await read_response(reader))[0] == 502  # still open for the next request
        writer.close()


async def read_body(reader: asyncio.StreamReader, rest: bytes, length: int) -> bytes:
    while len(rest) < length:
        rest += await reader.read(65536)
    return rest[:length]
