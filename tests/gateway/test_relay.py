"""The L4 relay on real loopback sockets, under asyncio and uvloop, in both modes.

Topology per test: client -> [front listener] a | relay | b -> [backend listener] server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from gw_topology import Pki

from federation.trust.contexts import client_context, server_context
from gateway.errors import RelayError
from gateway.l4.relay import (
    ProtocolRelay,
    RelayConfig,
    RelayOutcome,
    RelayStats,
    SpliceRelay,
    relay_sockets,
)

LOOPS = ["asyncio", "uvloop"]
MODES = ["protocol", "splice"]
SMALL_BUF = 128 << 10
BLOCK = bytes(range(256)) * 4096  # 1 MiB pattern


def run(loop_kind: str, coro: Coroutine[Any, Any, None], limit: float = 60) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(limit):
            await coro

    if loop_kind == "uvloop":
        uvloop.run(bounded())
    else:
        asyncio.run(bounded())


@dataclass
class Wiring:
    client: socket.socket
    server: socket.socket
    task: asyncio.Task[RelayStats]


def _small_buffers(*socks: socket.socket) -> None:
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUF)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)


@asynccontextmanager
async def wired(
    config: RelayConfig, small: bool = False, host: str = "127.0.60.1"
) -> AsyncIterator[Wiring]:
    """Connect client -> relay -> server on loopback and run `relay_sockets` in a task."""
    loop = asyncio.get_running_loop()
    front = socket.create_server((host, 0))
    back = socket.create_server((host.replace(".1", ".2"), 0))
    client = socket.socket()
    b = socket.socket()
    if small:
        _small_buffers(client, b)
    for s in (front, back, client, b):
        s.setblocking(False)
    try:
        await loop.sock_connect(client, front.getsockname())
        a, _ = await loop.sock_accept(front)
        await loop.sock_connect(b, back.getsockname())
        server, _ = await loop.sock_accept(back)
        if small:
            _small_buffers(a, server)
        task = asyncio.create_task(relay_sockets(a, b, config))
        try:
            yield Wiring(client, server, task)
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            server.close()
    finally:
        for s in (front, back, client):
            s.close()


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 16):
        out += chunk
    return bytes(out)


def config(mode: str, **kw: Any) -> RelayConfig:
    return RelayConfig(splice=(mode == "splice"), **kw)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("mode", MODES)
def test_large_transfer_with_slow_reader(loop_kind: str, mode: str) -> None:
    total = 64 << 20

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cfg = config(mode, high_water=512 << 10, low_water=128 << 10, pipe_size=256 << 10)
        async with wired(cfg, small=True) as w:
            sent = 0
            max_lead = 0
            received = 0
            digest = hashlib.sha256()

            async def send() -> None:
                nonlocal sent
                for _ in range(total // len(BLOCK)):
                    await loop.sock_sendall(w.client, BLOCK)
                    sent += len(BLOCK)
                w.client.shutdown(socket.SHUT_WR)

            async def slow_read() -> None:
                nonlocal received, max_lead
                reads = 0
                while chunk := await loop.sock_recv(w.server, 64 << 10):
                    digest.update(chunk)
                    received += len(chunk)
                    max_lead = max(max_lead, sent - received)
                    reads += 1
                    if reads % 8 == 0:
                        await asyncio.sleep(0.001)  # a slow consumer
                w.server.shutdown(socket.SHUT_WR)

            await asyncio.gather(send(), slow_read())
            stats = await w.task
        assert received == total
        expected = hashlib.sha256()
        for _ in range(total // len(BLOCK)):
            expected.update(BLOCK)
        assert digest.hexdigest() == expected.hexdigest()
        assert stats == RelayStats(total, 0, RelayOutcome.CLOSED, mode)
        # Back-pressure: the sender never got far ahead of the slow reader; without it the
        # relay would have buffered nearly the whole 64 MiB.
        assert max_lead <= 16 << 20, max_lead

    run(loop_kind, main())


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("mode", MODES)
def test_half_close_client_first(loop_kind: str, mode: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with wired(config(mode)) as w:
            await loop.sock_sendall(w.client, b"request")
            w.client.shutdown(socket.SHUT_WR)
            assert await read_all(w.server) == b"request"  # EOF reached the server
            # The other direction still works after the client's half-close.
            await loop.sock_sendall(w.server, b"response after your EOF" * 1000)
            w.server.shutdown(socket.SHUT_WR)
            assert await read_all(w.client) == b"response after your EOF" * 1000
            stats = await w.task
        assert stats.outcome is RelayOutcome.CLOSED
        assert (stats.a_to_b, stats.b_to_a) == (7, 23000)

    run(loop_kind, main())


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("mode", MODES)
def test_half_close_server_first(loop_kind: str, mode: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with wired(config(mode)) as w:
            await loop.sock_sendall(w.server, b"banner")
            w.server.shutdown(socket.SHUT_WR)
            assert await read_all(w.client) == b"banner"
            await loop.sock_sendall(w.client, b"upload" * 50000)
            w.client.shutdown(socket.SHUT_WR)
            assert await read_all(w.server) == b"upload" * 50000
            stats = await w.task
        assert stats.outcome is RelayOutcome.CLOSED
        assert (stats.a_to_b, stats.b_to_a) == (300000, 6)

    run(loop_kind, main())


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout(loop_kind: str, mode: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with wired(config(mode, idle_timeout=0.2)) as w:
            await loop.sock_sendall(w.client, b"hello")
            assert await loop.sock_recv(w.server, 100) == b"hello"
            stats = await w.task  # nobody says anything more
            assert stats.outcome is RelayOutcome.IDLE_TIMEOUT
            assert stats.a_to_b == 5
            try:
                rest = await loop.sock_recv(w.client, 100)
            except ConnectionResetError:
                rest = b""
            assert rest == b""  # the client's connection is gone

    run(loop_kind, main())


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("mode", MODES)
def test_reset_by_the_server(loop_kind: str, mode: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with wired(config(mode)) as w:
            await loop.sock_sendall(w.client, b"x" * 1000)
            assert len(await loop.sock_recv(w.server, 100000)) > 0
            w.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            w.server.close()  # linger 0: an RST
            stats = await w.task
            assert stats.outcome is RelayOutcome.RESET
            assert stats.error
            try:
                rest = await loop.sock_recv(w.client, 100)
            except ConnectionResetError:
                rest = b""
            assert rest == b""

    run(loop_kind, main())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_protocol_relay_holds_bytes_that_arrive_before_start(loop_kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        front = socket.create_server(("127.0.61.1", 0))
        back = socket.create_server(("127.0.61.2", 0))
        front.setblocking(False)
        back.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        try:
            await loop.sock_connect(client, front.getsockname())
            a, _ = await loop.sock_accept(front)
            relay = ProtocolRelay(RelayConfig(idle_timeout=None))
            await loop.connect_accepted_socket(lambda: relay.a, a)
            await loop.sock_sendall(client, b"early bytes")
            await asyncio.sleep(0.05)  # let them arrive while the backend is not connected
            with pytest.raises(RelayError):
                relay.start()
            await loop.create_connection(lambda: relay.b, *back.getsockname())
            server, _ = await loop.sock_accept(back)
            relay.start()
            assert await loop.sock_recv(server, 100) == b"early bytes"
            relay.close()
            stats = await relay.wait()
            assert stats.outcome is RelayOutcome.ABORTED
            assert stats.a_to_b == 11
            server.close()
        finally:
            for s in (front, back, client):
                s.close()

    run(loop_kind, main())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_protocol_relay_passes_on_an_eof_that_came_before_start(loop_kind: str) -> None:
    # Bytes and EOF already waiting when the relay starts go on in that order, and the other
    # direction stays open. CPython 3.11.0-3.11.3 ignore pause_reading() called from
    # connection_made (gh-103607), so there a side reads them before the relay starts.
    async def main() -> None:
        loop = asyncio.get_running_loop()
        front = socket.create_server(("127.0.61.3", 0))
        back = socket.create_server(("127.0.61.4", 0))
        client = socket.socket()
        for s in (front, back, client):
            s.setblocking(False)
        try:
            await loop.sock_connect(client, front.getsockname())
            a, _ = await loop.sock_accept(front)
            await loop.sock_sendall(client, b"early request")
            client.shutdown(socket.SHUT_WR)
            relay = ProtocolRelay(RelayConfig(idle_timeout=None))
            await loop.connect_accepted_socket(lambda: relay.a, a)
            await asyncio.sleep(0.05)  # let them arrive while the backend is not connected
            await loop.create_connection(lambda: relay.b, *back.getsockname())
            server, _ = await loop.sock_accept(back)
            try:
                relay.start()
                assert await read_all(server) == b"early request"  # then the EOF
                await loop.sock_sendall(server, b"answer after your EOF")
                server.shutdown(socket.SHUT_WR)
                assert await read_all(client) == b"answer after your EOF"
                stats = await relay.wait()
            finally:
                server.close()
            assert stats == RelayStats(13, 21, RelayOutcome.CLOSED, "protocol")
        finally:
            for s in (front, back, client):
                s.close()

    run(loop_kind, main(), limit=20)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_protocol_relay_reads_no_more_than_a_chunk_before_start(loop_kind: str) -> None:
    # Back-pressure before the start: the sender is held by the kernel's buffers, not by the
    # relay's memory. 3.11.0-3.11.3 kept reading after pause_reading() from connection_made
    # (gh-103607): 13 MB were held here before the fix.
    async def main() -> None:
        loop = asyncio.get_running_loop()
        front = socket.create_server(("127.0.61.7", 0))
        back = socket.create_server(("127.0.61.8", 0))
        client = socket.socket()
        for s in (front, back, client):
            s.setblocking(False)
        try:
            await loop.sock_connect(client, front.getsockname())
            a, _ = await loop.sock_accept(front)
            relay = ProtocolRelay(RelayConfig(idle_timeout=None))
            await loop.connect_accepted_socket(lambda: relay.a, a)
            sent = 0
            for _ in range(100):
                with contextlib.suppress(BlockingIOError):
                    sent += client.send(BLOCK[:65536])
                await asyncio.sleep(0.001)
            assert relay.a.received <= 256 << 10, relay.a.received
            await loop.create_connection(lambda: relay.b, *back.getsockname())
            server, _ = await loop.sock_accept(back)
            try:
                relay.start()
                client.shutdown(socket.SHUT_WR)
                assert len(await read_all(server)) == sent
                server.shutdown(socket.SHUT_WR)
                stats = await relay.wait()
            finally:
                server.close()
            assert (stats.a_to_b, stats.outcome) == (sent, RelayOutcome.CLOSED)
        finally:
            for s in (front, back, client):
                s.close()

    run(loop_kind, main(), limit=20)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_closing_a_relay_whose_tls_side_ended_leaves_it_whole(loop_kind: str) -> None:
    # close() on asyncio's TLS transport once it is closing (here: after the peer's
    # close_notify) cuts it from its TLS layer (CPython gh-98539): abort() then raised
    # AttributeError on 3.11.1-3.11.3, and get_extra_info() raises on every version.
    pki = Pki.create()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        front = socket.create_server(("127.0.61.5", 0))
        back = socket.create_server(("127.0.61.6", 0))
        b = socket.socket()
        for s in (front, back, b):
            s.setblocking(False)
        relay = ProtocolRelay(RelayConfig(idle_timeout=None))
        try:
            client_ctx = client_context(pki.east, pki.bundle)
            dialing = asyncio.ensure_future(
                asyncio.open_connection(
                    *front.getsockname(), ssl=client_ctx, server_hostname="relay.test"
                )
            )
            a, _ = await loop.sock_accept(front)
            server_ctx = server_context(pki.west, pki.bundle)
            await loop.connect_accepted_socket(lambda: relay.a, a, ssl=server_ctx)
            reader, writer = await dialing
            await loop.sock_connect(b, back.getsockname())
            await loop.connect_accepted_socket(lambda: relay.b, b)
            server, _ = await loop.sock_accept(back)
            try:
                relay.start()
                writer.write(b"hello over tls")
                writer.close()  # close_notify: the relay's TLS side ends
                assert await read_all(server) == b"hello over tls"
                assert await reader.read() == b""
                server.shutdown(socket.SHUT_WR)
                stats = await relay.wait()
            finally:
                server.close()
            assert (stats.a_to_b, stats.outcome) == (14, RelayOutcome.CLOSED)
            relay.close()
            relay.abort()
            tls = relay.a.transport
            assert tls is not None and tls.is_closing()
            assert tls.get_extra_info("ssl_object") is not None  # still whole
        finally:
            for s in (front, back):
                s.close()

    run(loop_kind, main(), limit=20)


def test_splice_refuses_non_tcp_sockets() -> None:
    async def main() -> None:
        x, y = socket.socketpair()
        try:
            with pytest.raises(RelayError):
                SpliceRelay(x, y, RelayConfig())
        finally:
            x.close()
            y.close()

    run("asyncio", main())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_unix_sockets_fall_back_to_protocols(loop_kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        c, a = socket.socketpair()
        b, s = socket.socketpair()
        for sock in (c, s):
            sock.setblocking(False)
        task = asyncio.create_task(relay_sockets(a, b, RelayConfig()))
        await loop.sock_sendall(c, b"over unix")
        c.shutdown(socket.SHUT_WR)
        assert await read_all(s) == b"over unix"
        s.shutdown(socket.SHUT_WR)
        stats = await task
        assert stats.mode == "protocol"
        assert stats.outcome is RelayOutcome.CLOSED
        c.close()
        s.close()

    run(loop_kind, main())


@pytest.mark.parametrize(
    "kw", [{"idle_timeout": 0}, {"low_water": 10, "high_water": 5}, {"pipe_size": 100}]
)
def test_bad_config(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RelayConfig(**kw)  # type: ignore[arg-type]
