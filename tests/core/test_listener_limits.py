"""The HTTP listeners' limits under the attacks that took the appliance down: connections with
partial request heads (the API, plain HTTP; the control listener, TLS), TLS connections that
never handshake, and enough connections to take every file descriptor.

A real appliance (control and API listeners, its own PKI) on 127.77.x.y; attackers connect
from 127.78.0.6x, the legitimate client from 127.78.0.2x. Timeouts are set to 1 s so that the
tests wait little; the bounds they wait within only tell "closed" from "held forever".
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from isthmus import config as configmod
from isthmus.appliance import Appliance

from .conftest import free_port, make_config

pytestmark = pytest.mark.timeout(120)

ATTACKS = 300
CLOSED_WITHIN = 30.0  # seconds: "closed by a timeout", against aiohttp's hour of keep-alive
PARTIAL = b"GET /v1/health HTTP/1.1\r\nHost: isthmus\r\nX-Slow: "
LEGIT = "127.78.0.20"


def rejections(listener: str, reason: str) -> float:
    labels = {"listener": listener, "reason": reason}
    return REGISTRY.get_sample_value("isthmus_listener_rejections_total", labels) or 0.0


def held(listener: str) -> float:
    return REGISTRY.get_sample_value("isthmus_listener_connections", {"listener": listener}) or 0


async def until(check: Any, what: str, bound: float = CLOSED_WITHIN) -> None:
    try:
        async with asyncio.timeout(bound):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {bound} s: {what}") from None


@contextlib.asynccontextmanager
async def appliance(tmp_path: Path, **limits: Any) -> AsyncIterator[Appliance]:
    raw = make_config(tmp_path, **limits)
    host = raw["api"]["listen"].rpartition(":")[0]
    raw["control"] = {"listen": f"{host}:{free_port(host)}", **raw.get("control", {})}
    app = Appliance(configmod.validate(raw), builtin_default=True)  # its own PKI: control on
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


class Attack:
    """Connections from one source address that each send `payload` and then wait for the
    listener to close them; `closed` counts those it closed."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.closed = 0
        self.refused = 0  # closed before the connection was up (TCP accepted, TLS not)

    async def start(
        self, address: tuple[str, int], source: str, n: int, payload: bytes,
        tls: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        up = [asyncio.get_running_loop().create_future() for _ in range(n)]
        for fut in up:
            self.tasks.append(asyncio.create_task(self._one(address, source, payload, tls, fut)))
        await asyncio.gather(*up)  # every connection is up and has sent, or was refused

    async def _one(
        self, address: tuple[str, int], source: str, payload: bytes,
        tls: ssl.SSLContext | None, up: asyncio.Future[None],
    ) -> None:  # fmt: skip
        try:
            reader, writer = await asyncio.open_connection(
                *address, local_addr=(source, 0), ssl=tls,
                server_hostname="control" if tls else None,
            )  # fmt: skip
        except (OSError, ssl.SSLError):
            self.refused += 1
            self.closed += 1
            up.set_result(None)
            return
        self.writers.append(writer)
        if payload:
            writer.write(payload)
        up.set_result(None)
        with contextlib.suppress(OSError, ssl.SSLError):
            while await reader.read(4096):
                pass
        self.closed += 1

    async def close(self) -> None:
        for w in self.writers:
            w.transport.abort()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def client_tls() -> ssl.SSLContext:
    # The attackers' and the client's side: what they think of the server's certificate does
    # not matter to the limits under test.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def get(url: str, source: str, tls: bool = False) -> int:
    connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=client_tls() if tls else False)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        return r.status


async def test_api_partial_heads_are_capped_per_source_and_closed(tmp_path: Path) -> None:
    """300 connections from one address send part of a request head and wait. 50 are held (the
    per-source cap), the others refused at once; a client from another address is served
    meanwhile; the held ones are closed by the header timeout."""
    limits = {"header_timeout": "1s", "idle_timeout": "1s", "max_connections_per_source": 50}
    async with asyncio.timeout(90), appliance(tmp_path, api=limits) as app:
        assert app.api_address is not None
        before = {r: rejections("api", r) for r in ("source_limit", "header_timeout")}
        attack = Attack()
        try:
            await attack.start(app.api_address, "127.78.0.66", ATTACKS, PARTIAL)
            await until(
                lambda: rejections("api", "source_limit") - before["source_limit"]
                >= ATTACKS - 50,
                "connections over the per-source cap refused",
                bound=10,
            )
            assert held("api") <= 50
            assert await get(f"{app.api_url}/v1/health", LEGIT) == 200
            await until(lambda: attack.closed == ATTACKS, "every partial head closed")
            assert rejections("api", "header_timeout") - before["header_timeout"] == 50
        finally:
            await attack.close()


async def test_api_keep_alive_connections_cannot_hold_a_partial_head(tmp_path: Path) -> None:
    """One complete request, then part of the next head: closed by the idle timeout."""
    async with asyncio.timeout(60), appliance(tmp_path, api={"idle_timeout": "1s"}) as app:
        assert app.api_address is not None
        reader, writer = await asyncio.open_connection(*app.api_address)
        try:
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: isthmus\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(PARTIAL)
            async with asyncio.timeout(CLOSED_WITHIN):
                assert await reader.read() == b""
        finally:
            writer.close()


async def test_api_total_cap_refuses_and_frees_up(tmp_path: Path) -> None:
    """Five sources of 10 idle connections against a total of 40: 10 refused
    (connection_limit); once the header timeout closes the idle ones, clients are served."""
    limits = {"header_timeout": "1s", "max_connections": 40, "max_connections_per_source": 10}
    async with asyncio.timeout(90), appliance(tmp_path, api=limits) as app:
        assert app.api_address is not None
        before = rejections("api", "connection_limit")
        attack = Attack()
        try:
            for i in range(5):
                await attack.start(app.api_address, f"127.78.0.7{i}", 10, b"")
            await until(
                lambda: rejections("api", "connection_limit") - before == 10,
                "connections over the total refused",
                bound=10,
            )
            await until(lambda: attack.closed == 50, "idle connections closed")
            assert await get(f"{app.api_url}/v1/health", LEGIT) == 200
        finally:
            await attack.close()


async def test_control_tls_partial_heads_and_stalled_handshakes(tmp_path: Path) -> None:
    """The control listener (TLS): 300 connections from one address that finish the handshake
    and send part of a head, 20 from another that never start TLS. The first are capped per
    source and closed by the header timeout, the others by the handshake timeout; an agent-like
    client from a third address is served meanwhile."""
    limits = {
        "handshake_timeout": "1s",
        "header_timeout": "1s",
        "max_connections_per_source": 50,
    }
    async with asyncio.timeout(90), appliance(tmp_path, control=limits) as app:
        address = app.control_address
        assert address is not None
        reasons = ("source_limit", "header_timeout", "handshake_timeout")
        before = {r: rejections("control", r) for r in reasons}
        heads, stalled = Attack(), Attack()
        try:
            await stalled.start(address, "127.78.0.68", 20, b"")
            await heads.start(address, "127.78.0.67", ATTACKS, PARTIAL, tls=client_tls())
            assert heads.refused == ATTACKS - 50
            assert rejections("control", "source_limit") - before["source_limit"] == 250
            url = f"https://{address[0]}:{address[1]}/v1/identity"
            assert await get(url, "127.78.0.21", tls=True) == 405  # served: a GET of a POST
            await until(lambda: heads.closed == ATTACKS, "every partial head closed")
            await until(lambda: stalled.closed == 20, "every stalled handshake closed")
            assert rejections("control", "header_timeout") - before["header_timeout"] == 50
            assert rejections("control", "handshake_timeout") - before["handshake_timeout"] == 20
        finally:
            await heads.close()
            await stalled.close()


def test_listeners_take_a_share_of_the_open_files_limit() -> None:
    """At a soft limit of 1,024 files the control listener may hold 256 connections and the
    API 128 whatever their config says, which leaves the rest to the data plane and DNS."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    code = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (1024, {hard}))\n"
        "from isthmus.listeners import fd_budget, FD_SHARES\n"
        "print(*(fd_budget(FD_SHARES[n]) for n in ('control', 'api', 'metrics')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["256", "128", "32"]


async def test_refused_connections_do_not_reach_aiohttp(tmp_path: Path) -> None:
    """A connection over the cap is closed before any byte is read: the client sees the close,
    not an HTTP answer."""
    limits = {"max_connections_per_source": 1, "header_timeout": "5s"}
    async with asyncio.timeout(60), appliance(tmp_path, api=limits) as app:
        assert app.api_address is not None
        first = socket.create_connection(app.api_address, timeout=10)
        try:
            await until(lambda: held("api") == 1, "the first connection held", bound=10)
            reader, writer = await asyncio.open_connection(*app.api_address)
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: isthmus\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
            writer.close()
        finally:
            first.close()


async def test_the_ingress_knows_the_federation_peers(tmp_path: Path) -> None:
    """The configured peers' addresses (names resolved at start) and `ingress.peer_sources` are
    known sources of the ingress: they may take its reserved pending slots."""
    host = make_config(tmp_path)["api"]["listen"].rpartition(":")[0]
    raw = make_config(
        tmp_path,
        roles=["control", "ingress"],
        ingress={
            "listen": f"{host}:{free_port(host)}",
            "peer_sources": ["127.0.31.0/24"],
            "max_pending_per_source": 4,
        },
        federation={
            "peers": [
                {"cluster": "west", "address": "127.0.30.1:15443"},
                {"cluster": "north", "address": "localhost:15443"},
            ]
        },
    )
    app = Appliance(configmod.validate(raw), builtin_default=True)
    await app.start()
    try:
        assert app.ingress is not None
        assert app.ingress.config.max_pending_per_source == 4
        assert app.ingress.config.client_hello_timeout == 2.0
        for known in ("127.0.30.1", "127.0.0.1", "127.0.31.9"):
            assert app.ingress.is_known_peer(known), known
        assert not app.ingress.is_known_peer("127.0.32.1")
    finally:
        await app.stop()


async def test_the_resolver_takes_its_tcp_limits_from_the_config(tmp_path: Path) -> None:
    """`dns.max_tcp_connections_per_source` reaches the resolver's TCP listener: a source over
    it is closed at accept, and counted."""
    from dns.transport import TcpLimits

    host = make_config(tmp_path)["api"]["listen"].rpartition(":")[0]
    raw = make_config(
        tmp_path,
        roles=["control", "dns"],
        dns={"listen": f"{host}:0", "max_tcp_connections": 50,
             "max_tcp_connections_per_source": 2},
    )
    app = Appliance(configmod.validate(raw), builtin_default=True)
    await app.start()
    held_socks: list[socket.socket] = []
    try:
        assert app.dns is not None
        assert app.dns.tcp_limits == TcpLimits(max_connections=50, max_connections_per_source=2)
        server = f"dns://{host}:{app.dns.port}"
        labels = {"server": server, "reason": "source"}
        before = REGISTRY.get_sample_value("isthmus_dns_tcp_connections_refused_total",
                                           labels) or 0.0
        for _ in range(3):
            s = socket.create_connection((host, app.dns.port), timeout=10,
                                         source_address=(LEGIT, 0))
            held_socks.append(s)
        await until(lambda: (REGISTRY.get_sample_value(
            "isthmus_dns_tcp_connections_refused_total", labels) or 0.0) == before + 1,
            "the third connection from one source refused", bound=10)
        held_socks[2].settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert held_socks[2].recv(1) == b""
    finally:
        for s in held_socks:
            s.close()
        await app.stop()
