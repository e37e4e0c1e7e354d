"""A two-cluster federation on loopback for the egress tests.

Cluster "east" (127.0.10.x, VIPs in 127.241.0.0/16) and cluster "west" (127.0.20.x, VIPs in
127.242.0.0/16), each with real aiohttp and TCP-echo backends, an ingress and an egress, with
certificates from the project's own CA code. Routing tables are built by hand: east's egress
sees east's endpoints and west's ingress gateway; west's ingress exports its local endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from discovery.names import ServiceKey
from federation.routing import Destination, Endpoint, RoutingTable, ServiceRoute, TableHolder
from federation.trust.bundle import TrustBundle
from federation.trust.ca import Identity, create_cluster_ca, create_root, issue_identity
from federation.trust.credentials import TlsCredentials
from gateway.balancer import Balancer, OutlierPolicy
from gateway.egress import Egress, EgressConfig
from gateway.ingress import Ingress, IngressConfig
from gateway.l4.relay import RelayConfig

TD = "mesh.test"
SERVICE = ServiceKey("reviews")
VIP = ipaddress.ip_address("127.241.0.10")
EAST_ONLY_VIP = ipaddress.ip_address("127.241.0.11")
WEST_ONLY_VIP = ipaddress.ip_address("127.241.0.12")
HTTP_PORT = 9080
TCP_PORT = 9081
PORTS = {"http": HTTP_PORT, "tcp": TCP_PORT}
ADDRESSES = {"east": "127.0.10", "west": "127.0.20"}


@dataclass(frozen=True)
class Pki:
    bundle: TrustBundle
    east: Identity
    west: Identity
    east_ca: object
    root: object

    @classmethod
    def create(cls) -> Pki:
        root = create_root(TD)
        east_ca = create_cluster_ca(root, "east")
        west_ca = create_cluster_ca(root, "west")
        return cls(
            TrustBundle.of([root.cert]),
            issue_identity(east_ca, "gateway", "east-gw"),
            issue_identity(west_ca, "gateway", "west-gw"),
            east_ca,
            root,
        )


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    writer.close()


@dataclass
class Backend:
    """One workload: an HTTP server and a TCP echo server on the same address."""

    cluster: str
    name: str
    address: str
    runner: web.AppRunner | None = None
    echo: asyncio.Server | None = None
    http_port: int = 0
    tcp_port: int = 0
    requests: int = 0
    delay: float = 0.0  # seconds each HTTP answer waits (for drain tests)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.address, self.http_port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.echo = await asyncio.start_server(_echo, self.address, self.tcp_port)
        self.tcp_port = self.echo.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.echo is not None:
            self.echo.close()
            self.echo = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.path == "/ws":  # a websocket echo (the egress relays it after the 101)
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str(f"{self.cluster}:{message.data}")
            return ws
        body = await request.read()
        if request.path == "/status/500":
            return web.Response(status=500, text="boom")
        if request.path.startswith("/chunked/"):  # a chunked body of n bytes, in 64 KiB writes
            n = int(request.path.rsplit("/", 1)[1])
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, n, 65536):
                await response.write(b"c" * min(65536, n - start))
            await response.write_eof()
            return response
        return web.json_response(
            {
                "cluster": self.cluster,
                "backend": self.name,
                "method": request.method,
                "body": len(body),
                "headers": {k.lower(): v for k, v in request.headers.items()},
            }
        )

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(
            f"{self.cluster}-{self.name}",
            self.address,
            {"http": self.http_port, "tcp": self.tcp_port},
        )


@dataclass
class Cluster:
    name: str
    backends: list[Backend]
    ingress: Ingress | None = None
    ingress_holder: TableHolder = field(default_factory=TableHolder)
    credentials: TlsCredentials | None = None
    gateway: str = ""  # the ingress "host:port", kept after it closes

    def local_destination(self, weight: int = 0) -> Destination:
        eps = tuple(b.endpoint for b in self.backends)
        return Destination(self.name, True, weight=weight, healthy=len(eps), total=len(eps),
                           endpoints=eps)  # fmt: skip


@dataclass
class Topology:
    pki: Pki
    east: Cluster
    west: Cluster
    egress: Egress
    holder: TableHolder
    version: int = 1

    def east_table(
        self, east_weight: int = 0, west_weight: int = 0, **route: object
    ) -> RoutingTable:
        """East's view: its endpoints and west's ingress (gateways) for reviews."""
        self.version += 1
        west = self.west
        remote = Destination(
            "west", False, priority=1, weight=west_weight, healthy=len(west.backends),
            total=len(west.backends), gateways=(west.gateway,),
        )  # fmt: skip
        r = ServiceRoute(
            SERVICE, VIP, PORTS,
            (self.east.local_destination(east_weight), remote),
            cluster_vips={"east": EAST_ONLY_VIP, "west": WEST_ONLY_VIP},
        )  # fmt: skip
        if route:
            r = replace(r, **route)  # type: ignore[arg-type]
        return RoutingTable.build(self.version, "east", TD, [r], frozenset({"east", "west"}))

    def publish(self, east_weight: int = 0, west_weight: int = 0, **route: object) -> None:
        self.holder.publish(self.east_table(east_weight, west_weight, **route))


def ingress_table(cluster: Cluster, version: int) -> RoutingTable:
    """What a cluster's ingress sees: its own endpoints, exported."""
    r = ServiceRoute(SERVICE, ipaddress.ip_address("127.242.0.10"), PORTS,
                     (cluster.local_destination(),), exported=True)  # fmt: skip
    return RoutingTable.build(version, cluster.name, TD, [r], frozenset({"east", "west"}))


async def start_cluster(
    name: str, pki: Pki, identity: Identity, n_backends: int, **ingress: object
) -> Cluster:
    """A cluster's backends and ingress; `ingress` are more IngressConfig fields."""
    prefix = ADDRESSES[name]
    backends = [Backend(name, f"b{i}", f"{prefix}.{10 + i}") for i in range(n_backends)]
    for b in backends:
        await b.start()
    cluster = Cluster(name, backends, credentials=TlsCredentials(identity, pki.bundle))
    cluster.ingress_holder = TableHolder(ingress_table(cluster, 1))
    cluster.ingress = Ingress(
        IngressConfig(
            host=f"{prefix}.1",
            port=0,
            relay=RelayConfig(idle_timeout=60),
            **ingress,  # type: ignore[arg-type]
        ),
        cluster.ingress_holder,
        cluster.credentials,  # type: ignore[arg-type]
    )
    await cluster.ingress.start()
    host, port = cluster.ingress.address
    cluster.gateway = f"{host}:{port}"
    return cluster


@contextlib.asynccontextmanager
async def topology(
    pki: Pki,
    n_backends: int = 2,
    config: EgressConfig | None = None,
    policy: OutlierPolicy | None = None,
    west_ingress: dict[str, object] | None = None,
) -> AsyncIterator[Topology]:
    """`west_ingress`: more IngressConfig fields for west's ingress."""
    east = await start_cluster("east", pki, pki.east, n_backends)
    west = await start_cluster("west", pki, pki.west, n_backends, **(west_ingress or {}))
    holder = TableHolder()
    config = config or EgressConfig(vip_cidr="127.241.0.0/16")
    assert east.credentials is not None
    egress = Egress(config, holder, east.credentials, Balancer(policy), "east")
    topo = Topology(pki, east, west, egress, holder)
    holder.publish(topo.east_table())
    await egress.start()
    try:
        yield topo
    finally:
        await egress.close()
        for c in (east, west):
            if c.ingress is not None:
                await c.ingress.close()
            for b in c.backends:
                await b.stop()


def served_by(body: bytes) -> tuple[str, str]:
    data = json.loads(body)
    return data["cluster"], data["backend"]


def write_pem(tmp: Path, name: str, identity: Identity, bundle: TrustBundle) -> list[str]:
    """openssl s_client arguments presenting `identity`."""
    cert = tmp / f"{name}.pem"
    chain = tmp / f"{name}-chain.pem"
    key = tmp / f"{name}.key"
    cert.write_bytes(identity.chain[0].public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in identity.chain[1:])
    )
    key.write_bytes(
        identity.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca = tmp / "bundle.pem"
    ca.write_bytes(bundle.to_pem())
    return ["-cert", str(cert), "-cert_chain", str(chain), "-key", str(key), "-CAfile", str(ca)]
