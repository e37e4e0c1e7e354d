"""The ingress on loopback with real certificates from the project's CA code.

Cluster "west" runs the ingress (127.0.90.1) in front of echo backends (127.0.90.10+); the
client is cluster "east"'s gateway identity. Rejections are checked with `openssl s_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gw_topology import write_pem
from prometheus_client import REGISTRY

from discovery.names import ServiceKey
from federation.routing import Destination, Endpoint, RoutingTable, ServiceRoute, TableHolder
from federation.trust.bundle import TrustBundle
from federation.trust.ca import Identity, create_cluster_ca, create_root, issue_identity
from federation.trust.connections import VerifiedConnection, tls_connect
from federation.trust.credentials import TlsCredentials
from gateway.ingress import Ingress, IngressConfig
from gateway.l4.relay import RelayConfig

TD = "mesh.test"
HOST = "127.0.90.1"
SNI = f"tcp.reviews.default.west.{TD}"


@dataclass(frozen=True)
class Pki:
    bundle: TrustBundle
    west: Identity
    east: Identity
    stranger: Identity  # valid chain, but cluster "north" is not a federation member
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


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    writer.close()


def table(backends: list[tuple[str, int]], exported: bool = True, version: int = 1) -> RoutingTable:
    endpoints = tuple(
        Endpoint(f"w{i}", host, {"tcp": port}) for i, (host, port) in enumerate(backends)
    )
    routes = [
        ServiceRoute(
            ServiceKey("reviews"),
            ipaddress.ip_address("127.240.0.1"),
            {"tcp": 9080},
            (Destination("west", True, healthy=len(endpoints), endpoints=endpoints),),
            exported=exported,
        ),
        ServiceRoute(
            ServiceKey("secret"),
            ipaddress.ip_address("127.240.0.2"),
            {"tcp": 9090},
            (Destination("west", True, healthy=len(endpoints), endpoints=endpoints),),
            exported=False,
        ),
    ]
    return RoutingTable.build(version, "west", TD, routes, frozenset({"east", "west"}))


@dataclass
class Site:
    ingress: Ingress
    holder: TableHolder
    port: int
    federation: list[VerifiedConnection]


@contextlib.asynccontextmanager
async def site(pki: Pki, n_backends: int = 2, **cfg: object) -> AsyncIterator[Site]:
    servers = [await asyncio.start_server(echo, f"127.0.90.{10 + i}", 0) for i in range(n_backends)]
    backends = [s.sockets[0].getsockname()[:2] for s in servers]
    holder = TableHolder(table(backends))
    federation: list[VerifiedConnection] = []

    async def on_federation(conn: VerifiedConnection) -> None:
        federation.append(conn)
        conn.writer.write(f"hello {conn.peer.cluster}\n".encode())
        await conn.writer.drain()
        conn.writer.close()

    config = IngressConfig(
        host=HOST,
        port=0,
        relay=RelayConfig(idle_timeout=30),
        **cfg,  # type: ignore[arg-type]
    )
    ingress = Ingress(config, holder, TlsCredentials(pki.west, pki.bundle), None, on_federation)
    await ingress.start()
    try:
        yield Site(ingress, holder, ingress.address[1], federation)
    finally:
        await ingress.close()
        for s in servers:
            s.close()
            await s.wait_closed()


def rejections(reason: str) -> float:
    labels = {"gateway": "ingress", "cluster": "west", "reason": reason}
    return REGISTRY.get_sample_value("isthmus_rejections_total", labels) or 0.0


def handshake_failures(reason: str) -> float:
    name = "isthmus_tls_handshake_failures_total"
    return REGISTRY.get_sample_value(name, {"reason": reason}) or 0.0


async def s_client(
    port: int, *args: str, stdin: bytes = b"", until: str | None = None
) -> tuple[int, str]:
    """Run `openssl s_client`; stop at EOF, or once `until` shows up in its output."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{HOST}:{port}", "-tls1_3", *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    out = b""
    try:
        proc.stdin.write(stdin)
        async with asyncio.timeout(20):
            while chunk := await proc.stdout.read(4096):
                out += chunk
                if until is not None and until.encode() in out:
                    break
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
    return proc.returncode or 0, out.decode(errors="replace")


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


async def round_trip(pki: Pki, port: int, payload: bytes, sni: str = SNI) -> bytes:
    creds = TlsCredentials(pki.east, pki.bundle)
    conn = await tls_connect(HOST, port, creds, server_hostname=sni, expected_cluster="west")
    conn.writer.write(payload)
    await conn.writer.drain()
    if conn.writer.can_write_eof():
        conn.writer.write_eof()
    out = await conn.reader.readexactly(len(payload))
    conn.writer.close()
    return out


async def test_routes_by_sni_to_a_local_endpoint(pki: Pki) -> None:
    async with asyncio.timeout(30), site(pki) as s:
        flow_labels = {
            "gateway": "ingress",
            "source_cluster": "east",
            "destination_service": "reviews.default",
            "destination_cluster": "west",
        }
        before = REGISTRY.get_sample_value("isthmus_bytes_sent_total", flow_labels) or 0.0
        payloads = [bytes([i]) * (100_000 + i) for i in range(5)]
        results = await asyncio.gather(*(round_trip(pki, s.port, p) for p in payloads))
        assert results == payloads
        for _ in range(100):  # the relays finish after the clients close
            sent = REGISTRY.get_sample_value("isthmus_bytes_sent_total", flow_labels) or 0.0
            if sent - before == sum(map(len, payloads)):
                break
            await asyncio.sleep(0.05)
        assert sent - before == sum(map(len, payloads))


async def test_federation_sni_goes_to_the_control_side(pki: Pki) -> None:
    async with asyncio.timeout(30), site(pki) as s:
        creds = TlsCredentials(pki.east, pki.bundle)
        conn = await tls_connect(HOST, s.port, creds, server_hostname=f"federation.west.{TD}")
        assert await conn.reader.readline() == b"hello east\n"
        conn.writer.close()
        assert [c.peer.cluster for c in s.federation] == ["east"]


async def test_dead_endpoint_is_skipped(pki: Pki) -> None:
    async with asyncio.timeout(30), site(pki) as s:
        dead = socket.socket()
        dead.bind(("127.0.90.30", 0))  # bound, never listening: connections are refused
        try:
            live = s.holder.current.get(ServiceKey("reviews")).destinations[0].endpoints[0]  # type: ignore[union-attr]
            s.holder.publish(
                table([("127.0.90.30", dead.getsockname()[1]), (live.address, live.ports["tcp"])],
                      version=2)
            )  # fmt: skip
            for i in range(6):
                assert await round_trip(pki, s.port, b"x%d" % i) == b"x%d" % i
        finally:
            dead.close()


@needs_openssl
async def test_openssl_client_with_a_member_certificate(pki: Pki, tmp_path: Path) -> None:
    async with asyncio.timeout(30), site(pki) as s:
        args = write_pem(tmp_path, "east", pki.east, pki.bundle)
        _, out = await s_client(
            s.port, "-servername", SNI, "-quiet", *args, stdin=b"ping\n", until="ping"
        )
        assert "ping" in out, out


@needs_openssl
@pytest.mark.parametrize(
    ("servername", "reason"),
    [
        (f"tcp.nothing.default.west.{TD}", "unknown_sni"),
        (f"tcp.reviews.default.east.{TD}", "unknown_sni"),  # another cluster's name
        (f"udp.reviews.default.west.{TD}", "unknown_sni"),  # no such port
        ("www.example.org", "unknown_sni"),
        (f"tcp.secret.default.west.{TD}", "not_exported"),
        (None, "no_sni"),
    ],
)
async def test_refused_before_the_handshake(
    pki: Pki, tmp_path: Path, servername: str | None, reason: str
) -> None:
    async with asyncio.timeout(30), site(pki) as s:
        args = write_pem(tmp_path, "east", pki.east, pki.bundle)
        name_args = ["-servername", servername] if servername else ["-noservername"]
        before = rejections(reason)
        code, out = await s_client(s.port, *name_args, *args)
        assert code != 0
        assert "BEGIN CERTIFICATE" not in out and "Server certificate" not in out, out
        assert rejections(reason) == before + 1


@needs_openssl
@pytest.mark.parametrize(
    ("who", "reason"),
    [
        (None, "no_peer_certificate"),
        ("other_root_east", "untrusted_root"),
        ("stranger", "peer_not_allowed"),
    ],
)
async def test_refused_peers(pki: Pki, tmp_path: Path, who: str | None, reason: str) -> None:
    async with asyncio.timeout(30), site(pki) as s:
        args = write_pem(tmp_path, who, getattr(pki, who), pki.bundle) if who else []
        count = rejections if reason == "peer_not_allowed" else handshake_failures
        before = count(reason)
        _, out = await s_client(
            s.port, "-servername", SNI, "-quiet", *args, stdin=b"should not arrive\n"
        )
        assert "should not arrive" not in out
        for _ in range(100):
            if count(reason) == before + 1:
                break
            await asyncio.sleep(0.05)
        assert count(reason) == before + 1, out


async def test_plaintext_garbage_and_slow_clients_are_dropped(pki: Pki) -> None:
    async with asyncio.timeout(30), site(pki, client_hello_timeout=0.5) as s:
        loop = asyncio.get_running_loop()

        async def send_and_wait_close(data: bytes) -> bytes:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (HOST, s.port))
                if data:
                    await loop.sock_sendall(sock, data)
                try:
                    return await loop.sock_recv(sock, 100)
                except ConnectionResetError:
                    return b""
            finally:
                sock.close()

        before = {r: rejections(r) for r in ("plaintext", "not_tls", "client_hello_timeout")}
        slow = [asyncio.create_task(send_and_wait_close(b"\x16\x03\x01")) for _ in range(5)]
        assert await send_and_wait_close(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        assert await send_and_wait_close(b"\x00" * 50) == b""
        # Everyone else is still served while the slow ones wait out their timeout.
        assert await round_trip(pki, s.port, b"still here") == b"still here"
        assert await asyncio.gather(*slow) == [b""] * 5
        assert rejections("plaintext") == before["plaintext"] + 1
        assert rejections("not_tls") == before["not_tls"] + 1
        assert rejections("client_hello_timeout") == before["client_hello_timeout"] + 5


async def test_pending_slots_are_shared_by_source_with_a_reserve_for_peers(pki: Pki) -> None:
    """4 pending slots, half kept for known peers, 2 per unknown source: a third connection from
    one source is refused (source_limit); another unknown source finds the shared half taken
    (pending_limit); a configured peer source still gets the reserve; a closed connection gives
    its slot back."""
    limits = {
        "max_pending": 4,
        "max_pending_per_source": 2,
        "reserved_pending_share": 0.5,
        "peer_sources": ("127.0.91.0/24",),
        "client_hello_timeout": 20,
    }
    async with asyncio.timeout(30), site(pki, **limits) as s:  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        socks: list[socket.socket] = []

        async def connect(source: str) -> socket.socket:
            sock = socket.socket()
            sock.setblocking(False)
            socks.append(sock)
            sock.bind((source, 0))
            await loop.sock_connect(sock, (HOST, s.port))
            return sock

        async def held(n: int) -> None:
            for _ in range(500):
                if s.ingress.pending == n:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"{s.ingress.pending} pending, expected {n}")

        async def refused(source: str, reason: str) -> None:
            before = rejections(reason)
            sock = await connect(source)
            assert await loop.sock_recv(sock, 10) == b""  # closed at once
            assert rejections(reason) == before + 1

        try:
            first = await connect("127.0.92.1")
            await connect("127.0.92.1")
            await held(2)
            await refused("127.0.92.1", "source_limit")
            await refused("127.0.93.1", "pending_limit")
            await connect("127.0.91.1")
            await connect("127.0.91.2")
            await held(4)
            assert s.ingress.is_known_peer("127.0.91.7")
            assert not s.ingress.is_known_peer("127.0.92.1")
            await refused("127.0.91.3", "pending_limit")  # every slot is taken
            first.close()
            await held(3)
            await connect("127.0.93.1")
            await held(4)
        finally:
            for sock in socks:
                sock.close()


async def test_a_verified_handshake_makes_its_source_a_known_peer(pki: Pki) -> None:
    async with asyncio.timeout(30), site(pki) as s:
        assert not s.ingress.is_known_peer("127.0.0.1")
        assert await round_trip(pki, s.port, b"hello") == b"hello"
        assert s.ingress.is_known_peer("127.0.0.1")
