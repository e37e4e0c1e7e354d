"""Multiplexed tunnels (`gateway.tunnel.transport`) end to end over real mutual TLS on loopback
(127.78.1.x). The stream's own rules (half-close, close and its FIN deadline, flow control,
resets, buffer bounds) are playbooks without sockets in test_stream_machine.py.

The egress side is a `MuxConnection(server=False)` that opens streams, the ingress side a
`MuxConnection(server=True)` whose `on_open` handler answers them (an echo in the test, or a
`ProtocolRelay` to a real TCP echo server as the ingress does). Where a test needs to see or
send frames by hand, one end is a `RawPeer`: TLS plus the sans-IO codec, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from gw_topology import TD, Pki

from federation.trust.contexts import client_context, server_context
from gateway.errors import StreamReset
from gateway.l4.relay import ProtocolRelay, RelayConfig, RelayOutcome
from gateway.proto.mux import (
    HEADER,
    MAX_TARGET,
    FrameDecoder,
    FrameType,
    StreamState,
    encode,
    parse_reset,
)
from gateway.proto.mux import window_payload as window
from gateway.proto.sni import tunnel_sni
from gateway.tunnel.transport import MuxConfig, MuxConnection, MuxStream

pytestmark = pytest.mark.timeout(60)

HOST = "127.78.1.1"
ECHO_HOST = "127.78.1.2"
TARGET = f"tcp.reviews.default.west.{TD}"
SMALL = MuxConfig(window=4096, frame_size=1024, high_water=16384, low_water=4096)
LIMIT = 20.0  # seconds any one test may take

Frame = tuple[int, int, bytes]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 7919 + n).randbytes(n)


async def until(check: Callable[[], object]) -> None:
    """Poll `check` until true (each test is bounded by its own asyncio.timeout)."""
    while not check():
        await asyncio.sleep(0.005)


# --- the stream's protocol in the tests ---------------------------------------------------------


class Peer(asyncio.Protocol):
    """Collects what a stream delivers; writes with back-pressure; records pause/resume."""

    def __init__(self, keep_open: bool = True, pause_at: int | None = None) -> None:
        self.transport: MuxStream | None = None
        self.data = bytearray()
        self.keep_open = keep_open  # eof_received's answer
        self.pause_at = pause_at  # pause reading once this many bytes came
        self.eof = asyncio.Event()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.pauses = 0
        self.resumes = 0
        self.after_eof = 0  # bytes that came after eof_received (must stay 0)
        self.after_lost = 0  # callbacks after connection_lost (must stay 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, MuxStream)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.eof.is_set():
            self.after_eof += len(data)
        if self.lost.done():
            self.after_lost += 1
        self.data += data
        if self.pause_at is not None and len(self.data) >= self.pause_at:
            assert self.transport is not None
            self.transport.pause_reading()
            self.pause_at = None

    def eof_received(self) -> bool:
        if self.lost.done():
            self.after_lost += 1
        self.eof.set()
        return self.keep_open

    def pause_writing(self) -> None:
        self.pauses += 1
        self.writable.clear()

    def resume_writing(self) -> None:
        self.resumes += 1
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost called twice"
        self.lost.set_result(exc)
        self.writable.set()

    async def write_all(self, data: bytes, chunk: int = 65536, eof: bool = True) -> None:
        assert self.transport is not None
        for start in range(0, len(data), chunk):
            await self.writable.wait()
            self.transport.write(data[start : start + chunk])
        if eof:
            self.transport.write_eof()

    async def read(self, n: int) -> bytes:
        await until(lambda: len(self.data) >= n or self.lost.done())
        assert len(self.data) >= n, (len(self.data), n, self.lost.result())
        return bytes(self.data[:n])

    async def reset_reason(self) -> str:
        exc = await self.lost
        assert isinstance(exc, StreamReset), exc
        return exc.reason


def attach(stream: MuxStream, protocol: asyncio.Protocol) -> None:
    stream.set_protocol(protocol)
    protocol.connection_made(stream)


class Echo(asyncio.Protocol):
    """Ingress-side echo that honours back-pressure, and FINs back after the peer's FIN."""

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream

    def data_received(self, data: bytes) -> None:
        self.stream.write(data)

    def eof_received(self) -> bool:
        self.stream.write_eof()
        return False  # the stream closes once our FIN went out

    def pause_writing(self) -> None:
        self.stream.pause_reading()

    def resume_writing(self) -> None:
        self.stream.resume_reading()


def echo(stream: MuxStream, target: str) -> None:
    attach(stream, Echo(stream))
    stream.accept()


class Acceptor:
    """An on_open handler that hands each stream to the test (with a Peer attached)."""

    def __init__(self, accept: bool = True, **peer: Any) -> None:
        self.accept = accept
        self.peer = peer
        self.queue: asyncio.Queue[tuple[MuxStream, Peer]] = asyncio.Queue()
        self.targets: list[str] = []

    def __call__(self, stream: MuxStream, target: str) -> None:
        self.targets.append(target)
        peer = Peer(**self.peer)
        attach(stream, peer)
        if self.accept:
            stream.accept()
        self.queue.put_nowait((stream, peer))

    async def next(self) -> tuple[MuxStream, Peer]:
        return await self.queue.get()


# --- a connection pair --------------------------------------------------------------------------


@dataclass
class Pair:
    client: MuxConnection  # egress side: opens streams
    server: MuxConnection  # ingress side

    async def open(self, target: str = TARGET, **peer: Any) -> tuple[MuxStream, Peer]:
        stream = self.client.open(target)
        p = Peer(**peer)
        attach(stream, p)
        assert stream.accepted is not None
        await stream.accepted
        return stream, p


@contextlib.asynccontextmanager
async def listening(
    pki: Pki, factory: Callable[[], asyncio.Protocol]
) -> AsyncIterator[asyncio.Server]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, HOST, 0, ssl=server_context(pki.west, pki.bundle))
    try:
        yield server
    finally:
        server.close()


async def dial(
    pki: Pki, port: int, factory: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    loop = asyncio.get_running_loop()
    ctx = client_context(pki.east, pki.bundle)
    transport, protocol = await loop.create_connection(
        factory, HOST, port, ssl=ctx, server_hostname=tunnel_sni("west", TD)
    )
    return transport, protocol  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def mux_pair(
    pki: Pki,
    on_open: Callable[[MuxStream, str], None] | None,
    config: MuxConfig = MuxConfig(),  # noqa: B008 (frozen)
    server_config: MuxConfig | None = None,
) -> AsyncIterator[Pair]:
    servers: list[MuxConnection] = []

    def factory() -> MuxConnection:
        conn = MuxConnection(server_config or config, server=True, on_open=on_open, label="east")
        servers.append(conn)
        return conn

    async with listening(pki, factory) as listener:
        port = listener.sockets[0].getsockname()[1]
        _, client = await dial(pki, port, lambda: MuxConnection(config, server=False, label="west"))
        assert isinstance(client, MuxConnection)
        await until(lambda: servers and servers[0].transport is not None)
        pair = Pair(client, servers[0])
        try:
            yield pair
        finally:
            client.abort()
            pair.server.abort()
            await asyncio.gather(client.closed, pair.server.closed)


class RawPeer(asyncio.Protocol):
    """One end of a tunnel that sends and reads frames by hand."""

    def __init__(self, answer_pings: bool = False) -> None:
        self.answer_pings = answer_pings
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            self.frames.append(frame)
            if frame[0] == FrameType.PING and self.answer_pings:
                self.send(FrameType.PONG, 0, frame[2])

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, kind: FrameType, sid: int, data: bytes = b"") -> None:
        assert self.transport is not None
        self.transport.write(encode(kind, sid, data))

    async def frame(self, kind: FrameType, sid: int) -> bytes:
        """The payload of the first `kind` frame on `sid` (waits for it)."""
        while True:
            for k, s, data in self.frames:
                if k == kind and s == sid:
                    return data
            assert not self.closed.done(), f"closed before a {kind.name} on {sid}: {self.frames}"
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def raw_client(
    pki: Pki,
    on_open: Callable[[MuxStream, str], None] | None,
    config: MuxConfig = MuxConfig(),  # noqa: B008 (frozen)
) -> AsyncIterator[tuple[RawPeer, MuxConnection]]:
    """A RawPeer dialled to a MuxConnection(server=True)."""
    servers: list[MuxConnection] = []

    def factory() -> MuxConnection:
        conn = MuxConnection(config, server=True, on_open=on_open, label="raw")
        servers.append(conn)
        return conn

    async with listening(pki, factory) as listener:
        _, raw = await dial(pki, listener.sockets[0].getsockname()[1], RawPeer)
        assert isinstance(raw, RawPeer)
        await until(lambda: servers and servers[0].transport is not None)
        try:
            yield raw, servers[0]
        finally:
            servers[0].abort()
            await servers[0].closed


@contextlib.asynccontextmanager
async def raw_server(
    pki: Pki,
    config: MuxConfig = MuxConfig(),  # noqa: B008 (frozen)
    answer_pings: bool = False,
) -> AsyncIterator[tuple[RawPeer, MuxConnection]]:
    """A MuxConnection(server=False) dialled to a RawPeer."""
    raws: list[RawPeer] = []

    def factory() -> RawPeer:
        raws.append(RawPeer(answer_pings))
        return raws[-1]

    async with listening(pki, factory) as listener:
        port = listener.sockets[0].getsockname()[1]
        _, conn = await dial(pki, port, lambda: MuxConnection(config, server=False))
        assert isinstance(conn, MuxConnection)
        await until(lambda: raws and raws[0].transport is not None)
        try:
            yield raws[0], conn
        finally:
            conn.abort()
            await conn.closed


# --- round trips --------------------------------------------------------------------------------

SIZES = [0, 1, 1000, 16384, 16385, 65536, 262_145, 1 << 20, (3 << 20) + 17, 6 << 20]
CHUNKS = [1, 1, 7, 16384, 1000, 65536, 100_000, 65536, 1 << 20, 300_000]  # write sizes


async def echo_round_trip(pair: Pair, data: bytes, chunk: int) -> bytes:
    stream, peer = await pair.open()
    writer = asyncio.create_task(peer.write_all(data, chunk))
    await peer.eof.wait()
    await writer
    assert stream.sent == len(data)
    assert stream.received == len(data)
    stream.close()
    assert await peer.lost is None
    assert peer.after_eof == 0 and peer.after_lost == 0
    return bytes(peer.data)


@contextlib.asynccontextmanager
async def tcp_echo_server() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        writer.close()

    server = await asyncio.start_server(handle, ECHO_HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def relay_to(port: int, tasks: set[asyncio.Task[Any]]) -> Callable[[MuxStream, str], None]:
    """An on_open handler that relays each stream to the TCP echo server, as the ingress does."""

    async def serve(stream: MuxStream) -> None:
        loop = asyncio.get_running_loop()
        relay = ProtocolRelay(RelayConfig(idle_timeout=None))
        try:
            await loop.create_connection(lambda: relay.b, ECHO_HOST, port)
        except OSError as exc:
            stream.reset("connect_error", repr(exc))
            return
        stream.set_protocol(relay.a)
        relay.a.attach(stream)
        stream.accept()
        relay.start()
        await relay.wait()

    def on_open(stream: MuxStream, target: str) -> None:
        task = asyncio.get_running_loop().create_task(serve(stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return on_open


async def scenario_round_trips(pki: Pki, config: MuxConfig, handler: str) -> None:
    relay_tasks: set[asyncio.Task[Any]] = set()
    async with contextlib.AsyncExitStack() as stack:
        if handler == "relay":
            port = await stack.enter_async_context(tcp_echo_server())
            on_open = relay_to(port, relay_tasks)
        else:
            on_open = echo
        pair = await stack.enter_async_context(mux_pair(pki, on_open, config))
        datas = [payload(n, i) for i, n in enumerate(SIZES)]
        got = await asyncio.gather(
            *(echo_round_trip(pair, d, c) for d, c in zip(datas, CHUNKS, strict=True))
        )
        assert [len(g) for g in got] == SIZES
        assert got == datas
        # Every stream is forgotten on both sides once both FINs went through.
        await until(lambda: not pair.client.streams and not pair.server.streams)
        assert pair.client.opened == pair.server.opened == len(SIZES)
        assert not pair.client.lost and pair.client.usable
        await asyncio.gather(*relay_tasks)


@pytest.mark.parametrize(
    ("config", "handler"),
    [(MuxConfig(), "echo"), (SMALL, "echo"), (MuxConfig(), "relay")],
    ids=["default-echo", "small-window-echo", "default-relay"],
)
async def test_many_concurrent_streams_round_trip(
    pki: Pki, config: MuxConfig, handler: str
) -> None:
    async with asyncio.timeout(LIMIT):
        await scenario_round_trips(pki, config, handler)


@pytest.mark.timeout(30)
def test_round_trips_under_uvloop(pki: Pki) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(LIMIT):
            await scenario_round_trips(pki, MuxConfig(), "relay")
            await scenario_backpressure(pki, pause_in_callback=False)

    uvloop.run(bounded())


async def test_write_forms_and_transport_queries(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT):
        acceptor = Acceptor()
        async with mux_pair(pki, acceptor) as pair:
            stream, peer = await pair.open()
            server_stream, server_peer = await acceptor.next()
            assert acceptor.targets == [TARGET]
            assert server_stream.target == TARGET and server_stream.id == stream.id == 1
            stream.write(b"bytes,")
            stream.write(bytearray(b"bytearray,"))
            stream.write(memoryview(b"xxmemoryview,")[2:])
            stream.write(b"")
            stream.writelines([b"line1,", bytearray(b"line2,"), memoryview(b"line3")])
            stream.write_eof()
            stream.write(b"dropped after write_eof")
            assert stream.can_write_eof()
            await server_peer.eof.wait()
            assert bytes(server_peer.data) == b"bytes,bytearray,memoryview,line1,line2,line3"
            # Transport queries.
            assert stream.get_extra_info("mux_stream") == 1
            assert isinstance(stream.get_extra_info("ssl_object"), ssl.SSLObject)
            assert stream.get_extra_info("peercert") is not None
            assert stream.get_extra_info("nothing", "dflt") == "dflt"
            assert stream.get_protocol() is peer
            assert stream.connection is pair.client
            assert stream.is_reading() and not stream.is_closing()
            stream.pause_reading()
            assert not stream.is_reading()
            stream.resume_reading()
            assert stream.get_write_buffer_limits() == (256 << 10, 1 << 20)
            stream.set_write_buffer_limits(high=1000)
            assert stream.get_write_buffer_limits() == (250, 1000)
            stream.set_write_buffer_limits(low=100)
            assert stream.get_write_buffer_limits() == (100, 400)
            with pytest.raises(ValueError):
                stream.set_write_buffer_limits(high=10, low=20)
            server_stream.close()
            assert server_stream.is_closing()
            await peer.eof.wait()
            stream.close()
            assert await peer.lost is None and await server_peer.lost is None
            await until(lambda: not pair.client.streams and not pair.server.streams)


async def test_open_refuses_a_bad_target_without_leaving_a_stream(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), mux_pair(pki, echo) as pair:
        with pytest.raises(ValueError):
            pair.client.open("tcp.rëviews.default.west.mesh.test")
        with pytest.raises(ValueError):
            pair.client.open("a" * (MAX_TARGET + 1))
        assert not pair.client.streams
        # The connection was not harmed: the peer saw no bad frame.
        assert await echo_round_trip(pair, b"still fine", 4) == b"still fine"
        assert not pair.client.lost
        with pytest.raises(RuntimeError):
            pair.server.open(TARGET)  # only the egress side opens streams


async def check_alive(pair: Pair, acceptor: Acceptor) -> None:
    """A new stream on the pair still carries bytes (the ingress side is `acceptor`)."""
    stream, _ = await pair.open()
    _, server_peer = await acceptor.next()
    stream.write(b"still alive")
    assert await server_peer.read(11) == b"still alive"
    stream.reset("done")
    assert await server_peer.reset_reason() == "done"


# --- half-close ---------------------------------------------------------------------------------


async def test_half_close_client_first_server_keeps_sending(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT):
        acceptor = Acceptor()
        async with mux_pair(pki, acceptor) as pair:
            stream, peer = await pair.open()
            server_stream, server_peer = await acceptor.next()
            request = payload(100_000, 1)
            await peer.write_all(request)  # ... and FIN
            await server_peer.eof.wait()
            assert bytes(server_peer.data) == request
            assert server_stream.remote_fin and stream.local_fin
            # The other direction still flows, in several writes, after the client's FIN.
            response = payload(2 << 20, 2)
            await server_peer.write_all(response, chunk=300_000)
            await peer.eof.wait()
            assert bytes(peer.data) == response
            server_stream.close()
            stream.close()
            assert await peer.lost is None and await server_peer.lost is None
            await until(lambda: not pair.client.streams and not pair.server.streams)


# --- back-pressure ------------------------------------------------------------------------------


async def scenario_backpressure(pki: Pki, pause_in_callback: bool) -> None:
    config = MuxConfig(window=65536, frame_size=16384, high_water=256 << 10, low_water=64 << 10)
    acceptor = Acceptor(pause_at=50_000 if pause_in_callback else None)
    async with mux_pair(pki, acceptor, config) as pair:
        stream = pair.client.open(TARGET)
        peer = Peer()
        attach(stream, peer)
        server_stream, server_peer = await acceptor.next()
        if not pause_in_callback:
            server_stream.pause_reading()
        assert stream.accepted is not None
        await stream.accepted
        data = payload(2 << 20, 4)
        step = 32768
        sent = 0
        # Write without waiting: the protocol is paused once unsent bytes pass high water.
        while peer.pauses == 0:
            assert stream.get_write_buffer_size() <= config.high_water
            stream.write(data[sent : sent + step])
            sent += step
        assert stream.get_write_buffer_size() > config.high_water
        assert not peer.writable.is_set()
        # A writer that ignores the pause is still buffered, not dropped.
        stream.write(data[sent : sent + 300_000])
        sent += 300_000
        assert peer.pauses == 1

        # The receiver holds at most one window of unread bytes, however long it waits: once
        # all that went out arrived, the sender still has bytes but no window to send them.
        def on_the_wire() -> int:
            return stream.sent - stream.get_write_buffer_size() - server_stream.received

        await until(lambda: on_the_wire() == 0)
        assert stream.get_write_buffer_size() > 0
        held = len(server_peer.data), server_stream.received
        assert 0 < server_stream.received - len(server_peer.data) <= config.window
        if not pause_in_callback:
            assert server_stream.received == config.window and not server_peer.data
        await asyncio.sleep(0.2)
        assert (len(server_peer.data), server_stream.received) == held
        assert peer.pauses == 1 and peer.resumes == 0
        # Reading again delivers everything, in order, and the writer resumes.
        server_stream.resume_reading()
        await peer.writable.wait()
        assert peer.resumes == 1
        await peer.write_all(data[sent:])
        await server_peer.eof.wait()
        assert bytes(server_peer.data) == data
        assert stream.get_write_buffer_size() == 0
        assert server_stream.received == len(data)


@pytest.mark.parametrize("pause_in_callback", [False, True], ids=["paused", "pauses-in-callback"])
async def test_backpressure(pki: Pki, pause_in_callback: bool) -> None:
    async with asyncio.timeout(LIMIT):
        await scenario_backpressure(pki, pause_in_callback)


async def test_slow_stream_does_not_block_a_fast_one(pki: Pki) -> None:
    config = MuxConfig(window=65536, frame_size=16384, high_water=128 << 10, low_water=32 << 10)

    slow_side: list[tuple[MuxStream, Peer]] = []

    def on_open(stream: MuxStream, target: str) -> None:
        if target.startswith("slow."):
            peer = Peer()
            attach(stream, peer)
            stream.pause_reading()  # reads nothing until told
            stream.accept()
            slow_side.append((stream, peer))
        else:
            echo(stream, target)

    async with asyncio.timeout(LIMIT), mux_pair(pki, on_open, config) as pair:
        _, slow_peer = await pair.open("slow." + TARGET)
        slow_data = payload(2 << 20, 5)
        slow_writer = asyncio.create_task(slow_peer.write_all(slow_data))
        await until(lambda: slow_peer.pauses == 1)
        # Meanwhile a fast stream on the same connection moves several windows both ways.
        fast = payload(4 << 20, 6)
        assert await echo_round_trip(pair, fast, 65536) == fast
        assert not slow_writer.done() and slow_peer.resumes == 0
        server_slow, server_slow_peer = slow_side[0]
        assert server_slow.received <= config.window
        server_slow.resume_reading()
        await slow_writer
        await server_slow_peer.eof.wait()
        assert bytes(server_slow_peer.data) == slow_data


async def test_tls_backpressure_pauses_every_stream(pki: Pki) -> None:
    """The TLS connection's own buffer above `tls_high_water` pauses all streams' writers,
    even streams with window left and nothing buffered themselves."""
    config = MuxConfig(window=16 << 20, initial_window=16 << 20, frame_size=1 << 20,
                       high_water=16 << 20, low_water=1 << 20,
                       tls_high_water=256 << 10)  # fmt: skip
    acceptor = Acceptor()
    async with asyncio.timeout(LIMIT), mux_pair(pki, acceptor, config) as pair:
        opened = [await pair.open() for _ in range(3)]
        server_side = [await acceptor.next() for _ in range(3)]
        assert pair.server.transport is not None
        pair.server.transport.pause_reading()  # the ingress stops reading its socket
        datas = [payload(16 << 20, 10 + i) for i in range(3)]
        sent = 0
        # Round-robin writes, one event-loop turn apart, until the tunnel pushes back.
        while not pair.client.write_paused:
            assert sent < len(datas[0]), "16 MiB per stream did not fill the TLS connection"
            for (stream, _), data in zip(opened, datas, strict=True):
                stream.write(data[sent : sent + 65536])
            sent += 65536
            await asyncio.sleep(0)
        assert all(s.get_write_buffer_size() == 0 for s, _ in opened)  # window left
        assert all(p.pauses == 1 and not p.writable.is_set() for _, p in opened)
        pair.server.transport.resume_reading()
        for (stream, peer), data in zip(opened, datas, strict=True):
            await peer.writable.wait()
            # At least once: a big write on another stream may fill the tunnel again first.
            assert peer.resumes >= 1
            stream.write(data[sent:])
            stream.write_eof()
        for (_, server_peer), data in zip(server_side, datas, strict=True):
            await server_peer.eof.wait()
            assert bytes(server_peer.data) == data


# --- resets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "server"])
async def test_reset_reaches_the_other_protocol_with_its_reason(pki: Pki, side: str) -> None:
    async with asyncio.timeout(LIMIT):
        acceptor = Acceptor()
        async with mux_pair(pki, acceptor) as pair:
            stream, peer = await pair.open()
            server_stream, server_peer = await acceptor.next()
            stream.write(b"some bytes")
            await server_peer.read(10)
            if side == "client":
                stream.reset("policy", "the caller gave up")
                this, other = peer, server_peer
            else:
                server_stream.reset("policy", "the caller gave up")
                this, other = server_peer, peer
            assert await this.lost is None  # the side that resets is told without an error
            exc = await other.lost
            assert isinstance(exc, StreamReset)
            assert (exc.reason, exc.detail) == ("policy", "the caller gave up")
            await until(lambda: not pair.client.streams and not pair.server.streams)
            # Resetting again, closing or writing after a reset does nothing.
            stream.reset("again")
            stream.close()
            stream.write(b"nothing")
            assert stream.is_closing()
            # The connection carries on.
            await check_alive(pair, acceptor)


async def test_reset_before_accept_fails_accepted(pki: Pki) -> None:
    held: list[MuxStream] = []

    def on_open(stream: MuxStream, target: str) -> None:
        if target == "at-once":
            stream.reset("not_exported", f"{target} is not exported")
        else:
            held.append(stream)  # answered later by the test

    async with asyncio.timeout(LIMIT), mux_pair(pki, on_open) as pair:
        stream = pair.client.open("at-once")
        peer = Peer()
        attach(stream, peer)
        assert stream.accepted is not None
        with pytest.raises(StreamReset) as info:
            await stream.accepted
        assert (info.value.reason, info.value.detail) == ("not_exported", "at-once is not exported")
        assert await peer.reset_reason() == "not_exported"

        later = pair.client.open("later")
        assert later.accepted is not None
        await until(lambda: held)
        assert not later.accepted.done()
        held[0].reset("connect_timeout", "no endpoint answered")
        with pytest.raises(StreamReset) as info:
            await later.accepted
        assert info.value.reason == "connect_timeout"

        # Closed by the opener before an answer: `accepted` fails at once.
        mine = pair.client.open("later")
        mine.close()
        assert mine.accepted is not None
        with pytest.raises(StreamReset) as info:
            await mine.accepted
        assert info.value.reason == "closed"
        await until(lambda: len(held) == 2)
        held[1].accept()  # too late: the stream is closed here and waits for the FIN
        held[1].close()
        await until(lambda: not pair.client.streams and not pair.server.streams)


async def test_unknown_stream_data_gets_a_reset(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), raw_client(pki, echo) as (raw, conn):
        raw.send(FrameType.DATA, 9, b"who is this for?")
        reason, _ = parse_reset(await raw.frame(FrameType.RESET, 9))
        assert reason == "closed"
        # WINDOW, FIN and RESET for unknown streams are ignored; the connection is fine.
        raw.send(FrameType.WINDOW, 11, window(100))
        raw.send(FrameType.FIN, 13)
        raw.send(FrameType.RESET, 15, b"whatever")
        raw.send(FrameType.OPEN, 17, TARGET.encode())
        await raw.frame(FrameType.ACCEPT, 17)
        raw.send(FrameType.DATA, 17, b"echo me")
        assert await raw.frame(FrameType.DATA, 17) == b"echo me"
        assert not conn.lost
        assert [s for _, s, _ in raw.frames if s in (11, 13, 15)] == []


async def test_unknown_stream_data_from_the_ingress_gets_a_reset(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), raw_server(pki) as (raw, conn):
        raw.send(FrameType.DATA, 41, b"stray")
        reason, _ = parse_reset(await raw.frame(FrameType.RESET, 41))
        assert reason == "closed"
        assert not conn.lost


async def test_non_ascii_target_is_refused(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), raw_client(pki, echo) as (raw, conn):
        raw.send(FrameType.OPEN, 1, "tcp.ünicode".encode())
        assert parse_reset(await raw.frame(FrameType.RESET, 1))[0] == "unknown_sni"
        assert not conn.streams and not conn.lost


# --- limits, GOAWAY, losing the connection -----------------------------------------------------


async def test_server_refuses_streams_beyond_max_streams(pki: Pki) -> None:
    acceptor = Acceptor()
    server_config = MuxConfig(max_streams=2)
    async with asyncio.timeout(LIMIT), mux_pair(pki, acceptor, MuxConfig(), server_config) as pair:
        first, _ = await pair.open()
        await pair.open()
        third = pair.client.open(TARGET)
        assert third.accepted is not None
        with pytest.raises(StreamReset) as info:
            await third.accepted
        assert info.value.reason == "too_many_streams"
        assert len(pair.server.streams) == 2
        # A stream that ends makes room for a new one.
        first.reset("done")
        await until(lambda: len(pair.server.streams) == 1)
        await pair.open()
        assert len(pair.server.streams) == 2


async def test_client_respects_its_own_max_streams(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), mux_pair(pki, echo, MuxConfig(max_streams=1)) as pair:
        await pair.open()
        assert not pair.client.usable
        with pytest.raises(StreamReset):
            pair.client.open(TARGET)


async def test_goaway_lets_open_streams_finish_then_closes(pki: Pki) -> None:
    acceptor = Acceptor()
    async with asyncio.timeout(LIMIT), mux_pair(pki, acceptor) as pair:
        stream, peer = await pair.open()
        server_stream, server_peer = await acceptor.next()
        pair.server.goaway("draining")
        # An OPEN already on its way when the GOAWAY went out is refused.
        racing = pair.client.open(TARGET)
        assert racing.accepted is not None
        with pytest.raises(StreamReset) as info:
            await racing.accepted
        assert info.value.reason == "going_away"
        await until(lambda: pair.client.going_away)
        assert not pair.client.usable
        with pytest.raises(StreamReset) as info:
            pair.client.open(TARGET)
        assert info.value.reason == "going_away"
        # The open stream still works both ways.
        data = payload(1 << 20, 7)
        await peer.write_all(data)
        await server_peer.eof.wait()
        assert bytes(server_peer.data) == data
        assert not pair.client.lost and not pair.server.lost
        await server_peer.write_all(b"goodbye")
        await peer.eof.wait()
        assert bytes(peer.data) == b"goodbye"
        stream.close()
        server_stream.close()
        assert await peer.lost is None and await server_peer.lost is None
        # Its last stream done, the connection closes without an error on either side.
        await asyncio.gather(pair.client.closed, pair.server.closed)
        assert pair.client.lost and pair.server.lost


async def test_close_and_abort_after_the_peer_closed_the_tunnel(pki: Pki) -> None:
    # Once the peer's close_notify came, asyncio's TLS transport says it is closing; a close()
    # then cuts it from its TLS layer (CPython gh-98539), after which abort() raised
    # AttributeError on 3.11.1-3.11.3 and get_extra_info() raises on every version.
    async with asyncio.timeout(LIMIT), mux_pair(pki, echo) as pair:
        stream, peer = await pair.open()
        pair.server.close()  # GOAWAY, then close_notify: the egress learns it was dropped
        assert await peer.reset_reason() == "tunnel_lost"
        await pair.client.closed
        transport = pair.client.transport
        assert transport is not None and transport.is_closing()
        pair.client.close()
        pair.client.goaway("again")
        pair.client.abort()
        stream.close()
        assert transport.get_extra_info("peercert") is not None  # still whole


async def test_goaway_from_the_egress_side(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), mux_pair(pki, echo) as pair:
        pair.client.goaway("new identity")
        with pytest.raises(StreamReset):
            pair.client.open(TARGET)
        await asyncio.gather(pair.client.closed, pair.server.closed)  # no streams: at once


@pytest.mark.parametrize("how", ["server-close", "server-abort", "client-abort", "client-close"])
async def test_losing_the_connection_drops_every_stream(pki: Pki, how: str) -> None:
    acceptor = Acceptor()
    async with asyncio.timeout(LIMIT), mux_pair(pki, acceptor) as pair:
        opened = [await pair.open() for _ in range(3)]
        server_side = [await acceptor.next() for _ in range(3)]
        for stream, _ in opened:
            stream.write(b"x" * 100_000)
        acceptor.accept = False
        pending = pair.client.open(TARGET)  # opened, never accepted
        pending_peer = Peer()
        attach(pending, pending_peer)
        await acceptor.next()
        side, verb = how.split("-")
        conn = pair.server if side == "server" else pair.client
        getattr(conn, verb)()
        for _, peer in opened + server_side:
            assert await peer.reset_reason() == "tunnel_lost"
        assert pending.accepted is not None
        with pytest.raises(StreamReset) as info:
            await pending.accepted
        assert info.value.reason == "tunnel_lost"
        assert await pending_peer.reset_reason() == "tunnel_lost"
        await asyncio.gather(pair.client.closed, pair.server.closed)
        assert not pair.client.streams and not pair.server.streams
        assert not pair.client.usable
        with pytest.raises(StreamReset):
            pair.client.open(TARGET)
        for stream, _ in opened:
            stream.write(b"ignored")  # writes to a lost stream do nothing
            stream.close()
            assert stream.is_closing() and not stream.is_reading()


# --- keepalive and broken peers -----------------------------------------------------------------


async def test_silent_peer_is_dropped(pki: Pki) -> None:
    config = MuxConfig(ping_interval=0.2, ping_timeout=0.3)
    async with asyncio.timeout(LIMIT), raw_server(pki, config) as (raw, conn):
        stream = conn.open(TARGET)
        peer = Peer()
        attach(stream, peer)
        await raw.frame(FrameType.OPEN, 1)
        raw.send(FrameType.ACCEPT, 1)
        assert stream.accepted is not None
        await stream.accepted
        # The raw peer never answers the PINGs.
        await conn.closed
        assert any(k == FrameType.PING and s == 0 and len(p) == 8 for k, s, p in raw.frames)
        assert await peer.reset_reason() == "tunnel_lost"
        await raw.closed



async def test_a_slow_open_on_a_live_peer_keeps_waiting(pki: Pki) -> None:
    """The OPEN probe's PING is answered (an ingress still connecting its endpoint): the OPEN
    waits for its ACCEPT as before, and the connection is not suspect."""
    config = MuxConfig(open_timeout=30.0, open_probe_after=0.05, probe_timeout=0.1)
    async with asyncio.timeout(LIMIT), raw_server(pki, config, answer_pings=True) as (raw, conn):
        stream = conn.open(TARGET)
        attach(stream, Peer())
        await raw.frame(FrameType.PING, 0)  # the probe
        await asyncio.sleep(0.5)  # several probe timeouts: its PONG kept the OPEN waiting
        assert not conn.suspect and stream.state is StreamState.OPENING
        assert sum(k == FrameType.PING for k, _, _ in raw.frames) == 1  # one probe per silence
        raw.send(FrameType.ACCEPT, 1)
        assert stream.accepted is not None
        await stream.accepted


async def test_an_unanswered_open_fails_on_a_silent_peer(pki: Pki) -> None:
    config = MuxConfig(open_timeout=30.0, open_probe_after=0.05, probe_timeout=0.1)
    async with asyncio.timeout(LIMIT), raw_server(pki, config) as (raw, conn):
        opened = await open_accepted(raw, conn)
        stream = conn.open(TARGET)
        attach(stream, Peer())
        assert stream.accepted is not None
        with pytest.raises(StreamReset) as info:
            await stream.accepted
        assert info.value.reason == "tunnel_silent"
        assert parse_reset(await raw.frame(FrameType.RESET, 3))[0] == "tunnel_silent"
        assert conn.suspect and not conn.usable
        with pytest.raises(StreamReset) as refused:
            conn.open(TARGET)
        assert refused.value.reason == "tunnel_silent"
        assert opened.state is StreamState.OPEN  # an established stream is left alone
        raw.send(FrameType.WINDOW, 1, window(1024))  # any frame clears the suspicion
        await until(lambda: not conn.suspect)
        assert conn.usable and opened.state is StreamState.OPEN


async def open_accepted(raw: RawPeer, conn: MuxConnection) -> MuxStream:
    stream = conn.open(TARGET)
    attach(stream, Peer())
    await raw.frame(FrameType.OPEN, stream.id)
    raw.send(FrameType.ACCEPT, stream.id)
    assert stream.accepted is not None
    await stream.accepted
    return stream

async def test_answered_pings_keep_an_idle_connection(pki: Pki) -> None:
    config = MuxConfig(ping_interval=0.1, ping_timeout=0.2)
    async with asyncio.timeout(LIMIT), raw_server(pki, config, answer_pings=True) as (raw, conn):
        await until(lambda: sum(k == FrameType.PING for k, _, _ in raw.frames) >= 5)
        assert not conn.lost


async def test_idle_pair_stays_up_and_answers_pings(pki: Pki) -> None:
    config = MuxConfig(ping_interval=0.1, ping_timeout=0.2)
    async with asyncio.timeout(LIMIT), mux_pair(pki, echo, config) as pair:
        start = pair.client.last_received, pair.server.last_received
        # Only PINGs and PONGs move; both sides hear from the other again and again.
        for _ in range(3):
            seen = pair.client.last_received, pair.server.last_received
            await until(
                lambda s=seen: (
                    pair.client.last_received > s[0]  # type: ignore[misc]
                    and pair.server.last_received > s[1]
                )
            )
        assert (pair.client.last_received, pair.server.last_received) > start
        assert not pair.client.lost and not pair.server.lost
        assert await echo_round_trip(pair, b"alive", 5) == b"alive"


@pytest.mark.parametrize(
    ("who", "garbage"),
    [
        ("client", b"\xff" * 9),  # unknown frame type
        ("client", HEADER.pack(FrameType.PING, 3, 8) + b"01234567"),  # PING on a stream
        ("client", HEADER.pack(FrameType.DATA, 1, 2 << 20)),  # DATA over the limit
        ("client", encode(FrameType.ACCEPT, 1)),  # ACCEPT sent to the ingress
        ("client", encode(FrameType.OPEN, 4, b"even")),  # even stream id
        ("client", encode(FrameType.OPEN, 1, b"reused")),  # id not increasing
        ("client", encode(FrameType.WINDOW, 1, window(0))),  # zero increment
        ("client", encode(FrameType.WINDOW, 1, window(0xFFFFFFFF))),  # window overflow
        ("server", encode(FrameType.OPEN, 2, TARGET.encode())),  # OPEN sent to the egress
        ("server", HEADER.pack(FrameType.FIN, 0, 0)),  # stream frame on stream 0
        ("server", b"GET / HTTP/1.1\r\n\r\n"),
    ],
)
async def test_protocol_error_aborts_the_connection(pki: Pki, who: str, garbage: bytes) -> None:
    acceptor = Acceptor()
    async with asyncio.timeout(LIMIT), mux_pair(pki, acceptor) as pair:
        _, peer = await pair.open()  # stream 1, open on both sides
        _, server_peer = await acceptor.next()
        sender = pair.client if who == "client" else pair.server
        assert sender.transport is not None
        sender.transport.write(garbage)  # straight into the TLS connection
        await asyncio.gather(pair.client.closed, pair.server.closed)
        assert await peer.reset_reason() == "tunnel_lost"
        assert await server_peer.reset_reason() == "tunnel_lost"


async def test_early_streams_wait_for_the_open_handler(pki: Pki) -> None:
    """The ingress makes its MuxConnection before it verified the peer: streams opened with
    the handshake wait (unserved) until `set_open_handler`."""
    async with asyncio.timeout(LIMIT), mux_pair(pki, None) as pair:
        stream = pair.client.open(TARGET)
        peer = Peer()
        attach(stream, peer)
        before = pair.server.last_received
        stream.write(b"early bytes")
        await until(lambda: pair.server.last_received > before)  # OPEN and DATA arrived
        await asyncio.sleep(0.05)
        assert not pair.server.streams  # nothing served yet
        assert stream.accepted is not None and not stream.accepted.done()
        acceptor = Acceptor()
        pair.server.set_open_handler(acceptor)
        await stream.accepted
        _, server_peer = await acceptor.next()
        assert await server_peer.read(11) == b"early bytes"


# --- closing with bytes still waiting for window -------------------------------------------


@pytest.mark.parametrize("then", ["fin", "data"])
async def test_drained_relay_with_unsent_bytes_ends(pki: Pki, then: str) -> None:
    """The ingress drains a relay (`ProtocolRelay.close`) whose stream side still holds bytes
    waiting for window. If the egress' FIN crosses, those bytes still arrive; if bytes cross,
    the stream is reset. Either way the relay ends: its `wait()` returns."""
    config = MuxConfig(window=4096, frame_size=1024, high_water=1 << 20, low_water=1 << 18)
    relays: list[ProtocolRelay] = []
    tasks: set[asyncio.Task[None]] = set()
    greeting = b"z" * 500_000

    async def endpoint(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)  # more than a window: most of it waits in the stream
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    async def serve(stream: MuxStream) -> None:
        loop = asyncio.get_running_loop()
        relay = ProtocolRelay(RelayConfig(idle_timeout=None))
        relays.append(relay)
        await loop.create_connection(lambda: relay.b, ECHO_HOST, port)
        stream.set_protocol(relay.a)
        relay.a.attach(stream)
        stream.accept()
        relay.start()
        await relay.wait()

    def on_open(stream: MuxStream, target: str) -> None:
        tasks.add(asyncio.get_running_loop().create_task(serve(stream)))

    server = await asyncio.start_server(endpoint, ECHO_HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(LIMIT), mux_pair(pki, on_open, config) as pair:
            stream, peer = await pair.open(pause_at=1)  # reads a little, then stops
            await until(lambda: 1 in pair.server.streams)
            server_stream = pair.server.streams[1]
            await until(lambda: server_stream.sent == len(greeting))
            # One window waits unread (the bytes handed on before the pause were credited).
            await until(lambda: stream.received - len(peer.data) == config.window)
            assert server_stream.get_write_buffer_size() > 0
            relays[0].close()  # graceful drain: flush what is buffered, then close
            assert server_stream.is_closing()
            if then == "fin":
                stream.write_eof()
                await until(lambda: server_stream.remote_fin)
                stream.resume_reading()
                await peer.eof.wait()
                assert bytes(peer.data) == greeting
            else:
                stream.write(b"crossing bytes")
                assert await peer.reset_reason() == "closed"
            await asyncio.gather(*tasks)
            assert relays[0].done
    finally:
        server.close()


# --- configuration ------------------------------------------------------------------------------


def test_config_validation() -> None:
    for bad in (
        {"window": 1000},
        {"frame_size": 100},
        {"frame_size": 2 << 20},
        {"low_water": 10, "high_water": 5},
        {"max_streams": 0},
        {"connections": 0},
        {"ping_timeout": 0},
    ):
        with pytest.raises(ValueError):
            MuxConfig(**bad)  # type: ignore[arg-type]


async def test_tunnel_gauges_read_the_live_connections(pki: Pki) -> None:
    from prometheus_client import REGISTRY

    def gauge(name: str, side: str) -> float:
        return REGISTRY.get_sample_value(name, {"side": side}) or 0.0

    acceptor = Acceptor()
    async with asyncio.timeout(LIMIT), mux_pair(pki, acceptor) as pair:
        before = {s: gauge("isthmus_tunnel_streams", s) for s in ("egress", "ingress")}
        opened = [await pair.open() for _ in range(3)]
        for _ in range(3):
            await acceptor.next()
        assert gauge("isthmus_tunnel_connections", "egress") >= 1
        assert gauge("isthmus_tunnel_connections", "ingress") >= 1
        assert gauge("isthmus_tunnel_streams", "egress") == before["egress"] + 3
        assert gauge("isthmus_tunnel_streams", "ingress") == before["ingress"] + 3
        for stream, _ in opened:
            stream.abort()
        await until(lambda: gauge("isthmus_tunnel_streams", "ingress") == before["ingress"])
        assert gauge("isthmus_tunnel_streams", "egress") == before["egress"]


async def test_a_stream_that_ended_before_it_had_a_protocol_tells_the_next_one(pki: Pki) -> None:
    """Found in review: ACCEPT and RESET in one read (an endpoint that resets at once) left a
    stream that never told the protocol attached after it, and a relay on it never ended."""

    def accept_then_reset(stream: MuxStream, target: str) -> None:
        stream.accept()
        stream.reset("reset", "endpoint reset the connection")

    async with asyncio.timeout(LIMIT), mux_pair(pki, accept_then_reset) as pair:
        loop = asyncio.get_running_loop()
        stream = pair.client.open(TARGET)
        assert stream.accepted is not None
        await stream.accepted
        assert stream.is_closing()
        relay = ProtocolRelay(RelayConfig(idle_timeout=300), loop)
        stream.set_protocol(relay.b)
        relay.b.attach(stream)
        a, b = socket.socketpair()
        try:
            await loop.connect_accepted_socket(lambda: relay.a, a)
            relay.start()
            stats = await relay.wait()  # bounded by LIMIT: it used to hang here
            assert stats.outcome is RelayOutcome.RESET
        finally:
            b.close()


