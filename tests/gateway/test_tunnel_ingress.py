"""Multiplexed tunnels through a real Ingress on loopback (127.78.2.x).

Cluster "west" runs the ingress in front of TCP echo backends; the egress side is a
`MuxConnection` dialled with the reserved SNI `tunnel.west.<td>` and cluster "east"'s gateway
identity (or the real `TunnelClient`). Every stream's target is a service SNI, routed and
authorised like a ClientHello: refusals reset the stream with the reason and are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from gw_topology import write_pem
from prometheus_client import REGISTRY

from discovery.names import ServiceKey
from federation.routing import Destination, Endpoint, RoutingTable, ServiceRoute, TableHolder
from federation.trust.bundle import TrustBundle
from federation.trust.ca import Identity, create_cluster_ca, create_root, issue_identity
from federation.trust.contexts import client_context
from federation.trust.credentials import TlsCredentials
from gateway.errors import ConnectFailed, StreamReset
from gateway.ingress import Ingress, IngressConfig
from gateway.l4.relay import RelayConfig
from gateway.metrics import Outcome
from gateway.proto.mux import FrameDecoder, FrameType, encode
from gateway.proto.sni import tunnel_sni
from gateway.tlsclient import ClientContexts
from gateway.tunnel.client import TunnelClient
from gateway.tunnel.transport import MuxConfig, MuxConnection, MuxStream

pytestmark = pytest.mark.timeout(60)

TD = "mesh.test"
HOST = "127.78.2.1"
BACKENDS = ["127.78.2.10", "127.78.2.11"]
DEAD = "127.78.2.30"  # bound, never listening: connections to it are refused
CABLE_HOST = "127.78.2.40"  # the forwarder between egress and ingress
REVIEWS = f"tcp.reviews.default.west.{TD}"
TUNNEL = tunnel_sni("west", TD)
LIMIT = 20.0
FLOW = {
    "gateway": "ingress",
    "source_cluster": "east",
    "destination_service": "reviews.default",
    "destination_cluster": "west",
}

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


@dataclass(frozen=True)
class Pki:
    bundle: TrustBundle
    west: Identity
    east: Identity
    stranger: Identity  # a valid chain, but cluster "north" is not a federation member
    other_root_east: Identity  # cluster "east" under a root that is not in the bundle


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = create_root(TD)
    other = create_root(TD)
    return Pki(
        TrustBundle.of([root.cert]),
        issue_identity(create_cluster_ca(root, "west"), "gateway", "west-gw"),
        issue_identity(create_cluster_ca(root, "east"), "gateway", "east-gw"),
        issue_identity(create_cluster_ca(root, "north"), "gateway", "north-gw"),
        issue_identity(create_cluster_ca(other, "east"), "gateway", "east-gw"),
    )


def rejections(reason: str) -> float:
    labels = {"gateway": "ingress", "cluster": "west", "reason": reason}
    return REGISTRY.get_sample_value("isthmus_rejections_total", labels) or 0.0


def handshake_failures(reason: str) -> float:
    name = "isthmus_tls_handshake_failures_total"
    return REGISTRY.get_sample_value(name, {"reason": reason}) or 0.0


def connections(outcome: str, service: str = "reviews.default") -> float:
    labels = {**FLOW, "destination_service": service, "outcome": outcome}
    return REGISTRY.get_sample_value("isthmus_connections_total", labels) or 0.0


async def until(check: Callable[[], object]) -> None:
    """Poll `check` until true (each test is bounded by its own asyncio.timeout)."""
    while not check():
        await asyncio.sleep(0.005)


# --- the west site ------------------------------------------------------------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    writer.close()


def route(name: str, vip: str, endpoints: tuple[Endpoint, ...], exported: bool) -> ServiceRoute:
    return ServiceRoute(
        ServiceKey(name),
        ipaddress.ip_address(vip),
        {"tcp": 9080},
        (Destination("west", True, healthy=len(endpoints), endpoints=endpoints),),
        exported=exported,
    )


def table(backends: list[tuple[str, int]], dead_port: int) -> RoutingTable:
    live = tuple(Endpoint(f"w{i}", h, {"tcp": p}) for i, (h, p) in enumerate(backends))
    routes = [
        route("reviews", "127.240.7.1", live, True),
        route("secret", "127.240.7.2", live, False),
        route("broken", "127.240.7.3", (Endpoint("dead", DEAD, {"tcp": dead_port}),), True),
    ]
    return RoutingTable.build(1, "west", TD, routes, frozenset({"east", "west"}))


@dataclass
class Site:
    ingress: Ingress
    port: int

    @property
    def gateway(self) -> str:
        return f"{HOST}:{self.port}"


@contextlib.asynccontextmanager
async def site(pki: Pki, **cfg: object) -> AsyncIterator[Site]:
    servers = [await asyncio.start_server(echo, host, 0) for host in BACKENDS]
    backends = [s.sockets[0].getsockname()[:2] for s in servers]
    dead = socket.socket()
    dead.bind((DEAD, 0))
    holder = TableHolder(table(backends, dead.getsockname()[1]))
    config = IngressConfig(
        host=HOST,
        port=0,
        relay=RelayConfig(idle_timeout=30),
        **cfg,  # type: ignore[arg-type]
    )
    ingress = Ingress(config, holder, TlsCredentials(pki.west, pki.bundle))
    await ingress.start()
    try:
        yield Site(ingress, ingress.address[1])
    finally:
        await ingress.close()
        dead.close()
        for s in servers:
            s.close()


@contextlib.asynccontextmanager
async def tunnel(
    pki: Pki,
    s: Site,
    identity: Identity | None = None,
    config: MuxConfig = MuxConfig(),  # noqa: B008 (frozen)
) -> AsyncIterator[MuxConnection]:
    """A tunnel connection to the site's ingress, as the egress dials it."""
    loop = asyncio.get_running_loop()
    ctx = client_context(identity or pki.east, pki.bundle)
    _, conn = await loop.create_connection(
        lambda: MuxConnection(config, server=False, label=s.gateway),
        HOST,
        s.port,
        ssl=ctx,
        server_hostname=TUNNEL,
    )
    assert isinstance(conn, MuxConnection)
    try:
        yield conn
    finally:
        conn.abort()
        await conn.closed


class Peer(asyncio.Protocol):
    """The egress end of one stream: collects bytes, EOF and the end."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def open_stream(conn: MuxConnection, target: str = REVIEWS) -> tuple[MuxStream, Peer]:
    stream = conn.open(target)
    peer = Peer()
    stream.set_protocol(peer)
    peer.connection_made(stream)
    assert stream.accepted is not None
    await stream.accepted
    return stream, peer


async def round_trip(conn: MuxConnection, data: bytes) -> bytes:
    """Echo `data` through a stream: write, FIN, read to the echoed FIN, close."""
    stream, peer = await open_stream(conn)
    for start in range(0, len(data), 1 << 20):
        stream.write(data[start : start + (1 << 20)])
    stream.write_eof()
    await peer.eof.wait()
    stream.close()
    assert await peer.lost is None
    return bytes(peer.data)


# --- streams that go through --------------------------------------------------------------------


async def test_streams_are_relayed_to_local_endpoints(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), site(pki) as s, tunnel(pki, s) as conn:
        ok_before = connections(Outcome.OK)
        sent_before = REGISTRY.get_sample_value("isthmus_bytes_sent_total", FLOW) or 0.0
        datas = [bytes([i]) * n for i, n in enumerate([1, 5000, 100_000, 1 << 20, 3 << 20])]
        got = await asyncio.gather(*(round_trip(conn, d) for d in datas))
        assert got == datas
        assert conn.opened == len(datas) and not conn.lost
        await until(lambda: connections(Outcome.OK) == ok_before + len(datas))
        sent = REGISTRY.get_sample_value("isthmus_bytes_sent_total", FLOW) or 0.0
        assert sent - sent_before == sum(map(len, datas))
        await until(lambda: not conn.streams)
        # One TLS connection for them all: the ingress serves it as one tunnel.
        assert len(s.ingress._tunnels) == 1


async def test_half_close_through_the_ingress(pki: Pki) -> None:
    """The egress' FIN reaches the endpoint (a TCP half-close), whose answer still flows."""
    async with asyncio.timeout(LIMIT), site(pki) as s, tunnel(pki, s) as conn:
        stream, peer = await open_stream(conn)
        stream.write(b"first part, ")
        await until(lambda: len(peer.data) == 12)
        assert not peer.eof.is_set()
        stream.write(b"then FIN")
        stream.write_eof()
        await peer.eof.wait()
        assert bytes(peer.data) == b"first part, then FIN"
        stream.close()
        assert await peer.lost is None
        await until(lambda: not conn.streams)


async def test_tunnel_client_opens_streams(pki: Pki) -> None:
    """The egress' own client: one dial for several streams, refusals as ConnectFailed."""
    async with asyncio.timeout(LIMIT), site(pki) as s:
        client = TunnelClient(
            MuxConfig(connections=1), ClientContexts(TlsCredentials(pki.east, pki.bundle))
        )
        try:
            streams = [await client.open(s.gateway, "west", TD, REVIEWS) for _ in range(3)]
            peers = []
            for i, stream in enumerate(streams):
                peer = Peer()
                stream.set_protocol(peer)
                peer.connection_made(stream)
                stream.write(b"via client %d" % i)
                stream.write_eof()
                peers.append(peer)
            for i, peer in enumerate(peers):
                await peer.eof.wait()
                assert bytes(peer.data) == b"via client %d" % i
            assert client.dials == 1 and client.streams_opened == 3
            with pytest.raises(ConnectFailed) as info:
                await client.open(s.gateway, "west", TD, f"tcp.secret.default.west.{TD}")
            assert info.value.outcome == Outcome.CONNECT_ERROR
            assert isinstance(info.value.__cause__, StreamReset)
            assert info.value.__cause__.reason == "not_exported"
            assert client.dials == 1  # a refused stream leaves the tunnel up
        finally:
            await client.close()



class Cable:
    """A TCP forwarder between the egress and the ingress whose "cable" can be pulled: while
    cut it moves no byte either way (held, not dropped, as TCP would retransmit them) and
    keeps both connections open, as a partition does."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.connected = asyncio.Event()
        self.connected.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def address(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, CABLE_HOST, 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await self.connected.wait()
                data = await src.read(65536)
                if not data:
                    break
                await self.connected.wait()
                dst.write(data)
                await dst.drain()
        dst.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()


def silent_total() -> float:
    return REGISTRY.get_sample_value("isthmus_tunnel_silent_total") or 0.0


async def test_a_cut_link_fails_opens_fast_then_heals(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The partition drill: the link to a remote ingress is cut with the tunnel up. An OPEN
    fails (as a connect timeout, which the egress retries elsewhere) once the probe PING
    went unanswered, long before open_timeout (30 s here: only the probe can end it within
    the test's limit); the next open fails at once; the healed link takes streams again."""
    caplog.set_level(logging.INFO, logger="gateway.tunnel.transport")
    config = MuxConfig(connections=1, open_timeout=30.0, open_probe_after=0.2, probe_timeout=0.5)
    async with asyncio.timeout(LIMIT), site(pki) as s:
        cable = Cable((HOST, s.port))
        await cable.start()
        client = TunnelClient(config, ClientContexts(TlsCredentials(pki.east, pki.bundle)))
        try:
            stream = await client.open(cable.address, "west", TD, REVIEWS)
            stream.close()
            before = silent_total()
            cable.connected.clear()  # the cable is pulled
            with pytest.raises(ConnectFailed) as info:
                await client.open(cable.address, "west", TD, REVIEWS)
            assert info.value.outcome == Outcome.CONNECT_TIMEOUT
            assert isinstance(info.value.__cause__, StreamReset)
            assert info.value.__cause__.reason == "tunnel_silent"
            assert silent_total() == before + 1
            (conn,) = client.connections(cable.address)
            assert conn.suspect and not conn.lost  # only the keepalive drops a connection
            # The next open does not wait at all: the connection takes no new streams.
            with pytest.raises(ConnectFailed) as info:
                await client.open(cable.address, "west", TD, REVIEWS)
            assert info.value.outcome == Outcome.CONNECT_TIMEOUT
            assert "tunnel silent" in str(info.value)
            lines = [r for r in caplog.records
                     if r.getMessage() == "tunnel peer silent, opens failed fast"]  # fmt: skip
            assert len(lines) == 1 and lines[0].peer == cable.address  # type: ignore[attr-defined]
            assert lines[0].silent_s >= 0  # type: ignore[attr-defined]
            cable.connected.set()  # healed: the next probe PING is answered
            await until(lambda: not conn.suspect)
            stream = await client.open(cable.address, "west", TD, REVIEWS)
            assert stream.connection is conn and silent_total() == before + 1
            stream.close()
            assert any(r.getMessage() == "tunnel peer heard again, takes streams"
                       for r in caplog.records)  # fmt: skip
        finally:
            await client.close()
            await cable.close()

# --- streams that are refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (f"tcp.secret.default.west.{TD}", "not_exported"),
        (f"tcp.nothing.default.west.{TD}", "unknown_sni"),
        (f"udp.reviews.default.west.{TD}", "unknown_sni"),  # no such port
        (f"tcp.reviews.default.east.{TD}", "unknown_sni"),  # another cluster's service
        (f"federation.west.{TD}", "unknown_sni"),  # reserved: peering, not a service
        (f"probe.west.{TD}", "unknown_sni"),
        (f"tunnel.west.{TD}", "unknown_sni"),
        ("tcp.reviews.default.west.other.org", "unknown_sni"),  # another trust domain
        ("www.example.org", "unknown_sni"),
    ],
)
async def test_refused_targets_are_reset_and_counted(pki: Pki, target: str, reason: str) -> None:
    async with asyncio.timeout(LIMIT), site(pki) as s, tunnel(pki, s) as conn:
        before = rejections(reason)
        stream = conn.open(target)
        peer = Peer()
        stream.set_protocol(peer)
        peer.connection_made(stream)
        assert stream.accepted is not None
        with pytest.raises(StreamReset) as info:
            await stream.accepted
        assert info.value.reason == reason
        assert info.value.detail  # says what was wrong
        exc = await peer.lost
        assert isinstance(exc, StreamReset) and exc.reason == reason
        assert rejections(reason) == before + 1
        # Only the stream was refused: the tunnel still carries others.
        assert await round_trip(conn, b"after a refusal") == b"after a refusal"
        assert not conn.lost and not conn.streams


async def test_unreachable_endpoint_resets_with_the_outcome(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), site(pki, connect_attempts=1) as s, tunnel(pki, s) as conn:
        before = connections(Outcome.CONNECT_ERROR, "broken.default")
        stream = conn.open(f"tcp.broken.default.west.{TD}")
        assert stream.accepted is not None
        with pytest.raises(StreamReset) as info:
            await stream.accepted
        assert info.value.reason == Outcome.CONNECT_ERROR
        assert connections(Outcome.CONNECT_ERROR, "broken.default") == before + 1
        assert await round_trip(conn, b"fine") == b"fine"


async def test_streams_count_against_the_connection_limit(pki: Pki) -> None:
    # The tunnel itself is one connection, its first stream the second.
    async with asyncio.timeout(LIMIT), site(pki, max_connections=2) as s, tunnel(pki, s) as conn:
        before = rejections("connection_limit")
        stream, _ = await open_stream(conn)
        with pytest.raises(StreamReset) as info:
            await open_stream(conn)
        assert info.value.reason == "connection_limit"
        assert rejections("connection_limit") == before + 1
        stream.reset("done")
        await until(lambda: s.ingress.connections == 1)
        assert await round_trip(conn, b"room again") == b"room again"


# --- peers that are refused -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "reason"), [("stranger", "peer_not_allowed"), ("other_root_east", "untrusted_root")]
)
async def test_refused_peer_gets_no_stream(pki: Pki, who: str, reason: str) -> None:
    """A client the ingress does not accept never has a stream served, even an OPEN that
    came with the handshake."""
    count = rejections if reason == "peer_not_allowed" else handshake_failures
    async with asyncio.timeout(LIMIT), site(pki) as s:
        before = count(reason)
        loop = asyncio.get_running_loop()
        ctx = client_context(getattr(pki, who), pki.bundle)
        try:
            _, conn = await loop.create_connection(
                lambda: MuxConnection(MuxConfig(), server=False),
                HOST,
                s.port,
                ssl=ctx,
                server_hostname=TUNNEL,
            )
        except OSError:  # ssl.SSLError too: refused inside the handshake
            conn = None
        if conn is not None:
            assert isinstance(conn, MuxConnection)
            stream = conn.open(REVIEWS)
            stream.write(b"should not arrive")
            assert stream.accepted is not None
            with pytest.raises(StreamReset) as info:
                await stream.accepted
            assert info.value.reason == "tunnel_lost"  # closed, never answered
            await conn.closed
            assert stream.received == 0
        await until(lambda: count(reason) == before + 1)
        assert not s.ingress._tunnels


async def s_client(port: int, args: list[str], stdin: bytes, stop_at: bytes | None) -> bytes:
    """`openssl s_client -quiet` to the tunnel SNI: its raw output (the frames it received),
    once `stop_at` shows up or at EOF."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{HOST}:{port}", "-tls1_3", "-quiet",
        "-servername", TUNNEL, *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    out = b""
    try:
        proc.stdin.write(stdin)
        async with asyncio.timeout(15):
            while chunk := await proc.stdout.read(4096):
                out += chunk
                if stop_at is not None and stop_at in out:
                    break
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
    return out


def frames_of(out: bytes) -> list[tuple[int, int, bytes]]:
    decoder = FrameDecoder()
    return decoder.feed(out)


@needs_openssl
async def test_openssl_member_speaks_the_tunnel_protocol(pki: Pki, tmp_path: Path) -> None:
    """The tunnel is plain frames in TLS: openssl can open a stream by hand."""
    async with asyncio.timeout(LIMIT), site(pki) as s:
        args = write_pem(tmp_path, "east", pki.east, pki.bundle)
        hello = b"hello through openssl"
        frames = encode(FrameType.OPEN, 1, REVIEWS.encode()) + encode(FrameType.DATA, 1, hello)
        out = await s_client(s.port, args, frames, stop_at=hello)
        assert (FrameType.ACCEPT, 1, b"") in frames_of(out)
        assert (FrameType.DATA, 1, hello) in frames_of(out)


@needs_openssl
async def test_openssl_non_member_is_refused_on_the_tunnel_sni(pki: Pki, tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), site(pki) as s:
        args = write_pem(tmp_path, "stranger", pki.stranger, pki.bundle)
        before = rejections("peer_not_allowed")
        frames = encode(FrameType.OPEN, 1, REVIEWS.encode()) + encode(
            FrameType.DATA, 1, b"should not arrive"
        )
        out = await s_client(s.port, args, frames, stop_at=None)  # to EOF: the ingress closes
        assert out == b""  # no ACCEPT, no RESET, no echo: not a single frame
        await until(lambda: rejections("peer_not_allowed") == before + 1)
        assert not s.ingress._tunnels


# --- draining -----------------------------------------------------------------------------------


async def test_drain_sends_goaway_and_lets_open_streams_finish(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), site(pki) as s, tunnel(pki, s) as conn:
        stream, peer = await open_stream(conn)
        stream.write(b"before the drain")
        await until(lambda: len(peer.data) == 16)
        closing = asyncio.create_task(s.ingress.close(drain=15))
        await until(lambda: conn.going_away)
        assert not conn.usable
        with pytest.raises(StreamReset) as info:
            conn.open(REVIEWS)
        assert info.value.reason == "going_away"
        # The open stream still goes both ways while the ingress waits for it.
        data = b"d" * (2 << 20)
        stream.write(data)
        await until(lambda: len(peer.data) == 16 + len(data))
        assert not closing.done() and not conn.lost
        stream.write_eof()
        await peer.eof.wait()
        assert bytes(peer.data) == b"before the drain" + data
        stream.close()
        # Its last stream done, the tunnel closes and the ingress' close returns.
        await conn.closed
        await closing
        assert not s.ingress._tunnels and s.ingress.connections == 0


async def test_drain_timeout_drops_streams_that_do_not_finish(pki: Pki) -> None:
    async with asyncio.timeout(LIMIT), site(pki) as s, tunnel(pki, s) as conn:
        stream, peer = await open_stream(conn)
        await s.ingress.close(drain=0.3)  # the stream never ends by itself
        exc = await peer.lost
        assert isinstance(exc, StreamReset)
        await conn.closed
        assert stream.is_closing()
