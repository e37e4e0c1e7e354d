"""The ingress gateway: one public TLS listener that routes by SNI (DESIGN §2 step 5).

Per connection:
1. Peek the ClientHello (MSG_PEEK, so the bytes stay for the TLS stack) and parse it with the
   sans-IO parser. SO_RCVLOWAT makes the socket readable again only when more bytes arrived, so
   a slow sender costs no busy loop. Bad input is refused here, before any handshake.
2. Route the SNI against the current routing table: the reserved peering name, or an exported
   local service and port. Unknown or unexported names are refused before the handshake.
3. TLS 1.3 handshake with a required client certificate, then strict SPIFFE verification; the
   peer's cluster must be a member of the federation.
4. Connect to a healthy local endpoint chosen by the balancer (retrying other endpoints on
   connect failure) and relay bytes both ways.

Every refusal is counted (`isthmus_rejections_total`, or the trust library's handshake
counter) and logged rate-limited: the first of a reason at once, then one line per reason per
`refusal_log_interval` with the count (`gateway/admission.py: RefusalLog`).

Limits: connections overall; connections still before their relay (ClientHello + handshake +
endpoint connect), the "pending" slots, shared by source (`gateway/admission.py:
ConnectionSlots`) so that one source cannot starve the federation's peers: a per-source cap
for unknown sources, a share of the slots kept for known peers (configured `peer_sources`, and
addresses that completed a verified handshake in the last `known_peer_ttl`), and a per-peer
cap inside it; and a timeout for each step, the ClientHello's shorter than the handshake's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from discovery.addresses import join_host_port, split_host_port
from federation.routing import RoutingTable, ServiceRoute, TableHolder
from federation.trust.connections import VerifiedConnection
from federation.trust.credentials import TlsCredentials
from federation.trust.errors import TrustError
from federation.trust.observe import classify, count_failure
from federation.trust.spiffe import SpiffeId
from federation.trust.verify import verify_peer
from gateway.admission import ConnectionSlots, Full, RefusalLog, Slot, SlotLimits
from gateway.balancer import Balancer, Choice, FailureKind, Target
from gateway.errors import RoutingError, SniError
from gateway.l4.relay import ProtocolRelay, RelayConfig, RelayOutcome
from gateway.listen import listening_socket
from gateway.metrics import GatewayKind, Outcome, flow, record_rejection
from gateway.proto.clienthello import (
    MAX_CLIENT_HELLO,
    MAX_RECORDS,
    NEED_MORE,
    ClientHello,
    Rejected,
    RejectReason,
    parse_client_hello,
)
from gateway.proto.sni import FederationSni, ProbeSni, ServiceSni, TunnelSni, parse_sni
from gateway.tunnel.transport import MuxConfig, MuxConnection, MuxStream

__all__ = ["FederationHandler", "Ingress", "IngressConfig"]

log = logging.getLogger(__name__)

# The most bytes a ClientHello the parser accepts can occupy on the wire.
PEEK_LIMIT = MAX_CLIENT_HELLO + 5 * MAX_RECORDS
MAX_PEEKS = 32  # real clients need one or two; more is a trickle meant to waste our time

FederationHandler = Callable[[VerifiedConnection], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class IngressConfig:
    host: str = "0.0.0.0"
    port: int = 15443
    # A ClientHello comes in the first flight after the TCP handshake: a short deadline frees the
    # slot of a client that sends a few bytes and stalls, long before the handshake timeout.
    client_hello_timeout: float = 2.0
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    connect_attempts: int = 3
    max_connections: int = 10_000
    max_pending: int = 512  # connections not yet relaying (reading hello, handshaking, connecting)
    max_pending_per_source: int = 16  # pending slots one unknown source (IPv4, IPv6 /64) may hold
    max_pending_per_peer: int = 128  # pending slots one known peer may hold
    reserved_pending_share: float = 0.5  # of max_pending, taken only by known peers
    peer_sources: tuple[str, ...] = ()  # peers' source addresses or CIDRs: always known
    known_peer_ttl: float = 3600.0  # a verified handshake makes its source known this long
    refusal_log_interval: float = 10.0  # one log line per refusal reason per interval
    backlog: int = 1024
    reuse_port: bool = False  # several worker processes share the port
    relay: RelayConfig = field(default_factory=RelayConfig)
    mux: MuxConfig = field(default_factory=MuxConfig)


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str
    detail: str


class Ingress:
    def __init__(
        self,
        config: IngressConfig,
        tables: TableHolder,
        credentials: TlsCredentials,
        balancer: Balancer | None = None,
        on_federation: FederationHandler | None = None,
    ) -> None:
        self.config = config
        self._tables = tables
        self._credentials = credentials
        self.balancer = balancer or Balancer()
        self._on_federation = on_federation
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._relays: set[ProtocolRelay] = set()
        self._tunnels: set[MuxConnection] = set()
        self._slots = ConnectionSlots(
            SlotLimits(
                total=config.max_pending,
                per_source=config.max_pending_per_source,
                reserved_share=config.reserved_pending_share,
                per_peer=config.max_pending_per_peer,
                known_ttl=config.known_peer_ttl,
            ),
            config.peer_sources,
        )
        self._refusals = RefusalLog(log, "ingress refused connection", config.refusal_log_interval)
        self._tls_refusals = RefusalLog(
            log, "ingress tls handshake refused", config.refusal_log_interval, {"side": "server"}
        )

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the ingress is not listening")
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def connections(self) -> int:
        return len(self._tasks)

    @property
    def pending(self) -> int:
        """Connections holding a pending slot (before their relay)."""
        return self._slots.held

    def is_known_peer(self, host: str) -> bool:
        return self._slots.is_known(host)

    async def start(self) -> None:
        cfg = self.config
        sock = listening_socket(cfg.host, cfg.port, cfg.backlog, reuse_port=cfg.reuse_port)
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop(sock))
        log.info("ingress listening", extra={"address": f"{cfg.host}:{self.address[1]}"})

    async def close(self, drain: float = 0.0) -> None:
        """Stop accepting; give open connections `drain` seconds, then close them."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._tunnels):
            conn.goaway("draining")  # egresses open new streams elsewhere; these may finish
        if drain > 0 and self._tasks:
            await asyncio.wait(set(self._tasks), timeout=drain)
        for relay in list(self._relays):
            relay.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._refusals.flush()
        self._tls_refusals.flush()

    # --- accepting ----------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("ingress accept failed", extra={"error": repr(exc)})
                await asyncio.sleep(0.1)
                continue
            peer = join_host_port(addr[0], addr[1])
            if len(self._tasks) >= self.config.max_connections:
                self._refuse(sock, peer, _Refusal("connection_limit", "too many connections"))
                continue
            slot = self._slots.acquire(addr[0])
            if slot is Full.SOURCE:
                self._refuse(sock, peer, _Refusal("source_limit", "this source holds its share"))
                continue
            if isinstance(slot, Full):
                self._refuse(sock, peer, _Refusal("pending_limit", "too many handshakes"))
                continue
            task = asyncio.create_task(self._serve(sock, peer, slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _refuse(self, sock: socket.socket | None, peer: str, refusal: _Refusal) -> None:
        record_rejection(GatewayKind.INGRESS, self._tables.current.cluster, refusal.reason)
        self._refusals.refused(refusal.reason, peer, refusal.detail, _host(peer))
        if sock is not None:
            sock.close()

    def _handshake_refused(self, err: TrustError, peer: str) -> None:
        count_failure(err, "server", peer)
        self._tls_refusals.refused(err.reason, peer, str(err), _host(peer))

    async def _serve(self, sock: socket.socket, peer: str, slot: Slot) -> None:
        started = time.monotonic()
        pending = True

        def admitted() -> None:
            """Out of the pending phase (relaying, serving a tunnel, or done): free the slot."""
            nonlocal pending
            if pending:
                pending = False
                self._slots.release(slot)

        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                async with asyncio.timeout(self.config.client_hello_timeout):
                    hello = await _peek_client_hello(sock)
            except TimeoutError:
                hello = Rejected(RejectReason.TIMEOUT, "no complete ClientHello in time")
            if isinstance(hello, Rejected):
                self._refuse(sock, peer, _Refusal(str(hello.reason), hello.detail))
                return
            table = self._tables.current
            target = _route_name(hello.server_name, table)
            if isinstance(target, _Refusal):
                self._refuse(sock, peer, target)
                return
            if isinstance(target, ProbeSni):
                # A remote egress checking that we are up: the handshake is the answer.
                conn = await self._federation_handshake(sock, peer)
                if conn is not None:
                    conn.writer.close()
                return
            if isinstance(target, TunnelSni):
                conn = await self._tunnel_handshake(sock, peer)
                if conn is None:
                    return
                admitted()
                await self._serve_tunnel(conn)
                return
            if isinstance(target, FederationSni):
                conn = await self._federation_handshake(sock, peer)
                if conn is None:
                    return
                admitted()
                if self._on_federation is None:
                    conn.writer.transport.abort()
                    return
                await self._on_federation(conn)
                return
            route, port_name = target
            relay = ProtocolRelay(self.config.relay)
            sid = await self._handshake(sock, peer, relay, table)
            if sid is None:
                return
            admitted()
            await self._relay_to_endpoint(relay, route, port_name, table, sid, started)
        finally:
            admitted()

    # --- TLS ------------------------------------------------------------------------------------

    async def _handshake(
        self, sock: socket.socket, peer: str, relay: ProtocolRelay, table: RoutingTable
    ) -> SpiffeId | None:
        loop = asyncio.get_running_loop()
        ctx = self._credentials.server_context(require_client_cert=True)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: relay.a,
                sock,
                ssl=ctx,
                ssl_handshake_timeout=self.config.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            self._handshake_refused(classify(exc), peer)
            sock.close()
            return None
        sid = self._verify(transport, peer, table)
        if sid is None:
            transport.abort()
        return sid

    async def _verified_tls(
        self, sock: socket.socket, peer: str, protocol: asyncio.Protocol
    ) -> tuple[asyncio.Transport, SpiffeId] | None:
        """Handshake on `sock` for `protocol` and verify the peer; None (counted, logged and
        closed) when either fails."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=self._credentials.server_context(require_client_cert=True),
                ssl_handshake_timeout=self.config.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            self._handshake_refused(classify(exc), peer)
            sock.close()
            return None
        sid = self._verify(transport, peer, self._tables.current)
        if sid is None:
            transport.abort()
            return None
        return transport, sid  # type: ignore[return-value]

    async def _federation_handshake(
        self, sock: socket.socket, peer: str
    ) -> VerifiedConnection | None:
        reader = asyncio.StreamReader(limit=1 << 20)
        protocol = asyncio.StreamReaderProtocol(reader)
        verified = await self._verified_tls(sock, peer, protocol)
        if verified is None:
            return None
        transport, sid = verified
        loop = asyncio.get_running_loop()
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return VerifiedConnection(reader, writer, sid)

    async def _tunnel_handshake(self, sock: socket.socket, peer: str) -> MuxConnection | None:
        conn = MuxConnection(self.config.mux, server=True, label=peer)
        verified = await self._verified_tls(sock, peer, conn)
        if verified is None:
            return None
        sid = verified[1]
        # Streams are served only now that the peer is verified (an OPEN that came with the
        # handshake waited in the connection until here).
        conn.set_open_handler(lambda stream, target: self._open_stream(stream, target, sid, peer))
        return conn

    async def _serve_tunnel(self, conn: MuxConnection) -> None:
        self._tunnels.add(conn)
        try:
            await asyncio.shield(conn.closed)
        finally:
            self._tunnels.discard(conn)
            if not conn.lost:
                conn.abort()

    def _open_stream(self, stream: MuxStream, target: str, sid: SpiffeId, peer: str) -> None:
        if len(self._tasks) >= self.config.max_connections:
            self._refuse(None, peer, _Refusal("connection_limit", "too many connections"))
            stream.reset("connection_limit", "too many connections")
            return
        task = asyncio.get_running_loop().create_task(self._serve_stream(stream, target, sid, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, stream: MuxStream, target: str, sid: SpiffeId, peer: str) -> None:
        started = time.monotonic()
        table = self._tables.current
        routed = _route_name(target, table)
        if not isinstance(routed, tuple):
            refusal = (
                routed if isinstance(routed, _Refusal)
                else _Refusal("unknown_sni", f"{target} is reserved, not a service")
            )  # fmt: skip
            self._refuse(None, f"{peer} stream {stream.id}", refusal)
            stream.reset(refusal.reason, refusal.detail)
            return
        route, port_name = routed
        relay = ProtocolRelay(self.config.relay)
        try:
            await self._relay_to_endpoint(relay, route, port_name, table, sid, started, stream)
        except asyncio.CancelledError:
            stream.abort()
            raise

    def _verify(
        self, transport: asyncio.BaseTransport, peer: str, table: RoutingTable
    ) -> SpiffeId | None:
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            if ssl_object is None:
                raise classify(ssl.SSLError("no TLS session after the handshake"))
            sid = verify_peer(
                ssl_object,
                self._credentials.bundle,
                self._credentials.trust_domain,
                peer_is_server=False,
            )
        except TrustError as err:
            self._handshake_refused(err, peer)
            return None
        if sid.cluster not in table.clusters:
            self._refuse(None, peer, _Refusal("peer_not_allowed", f"{sid} is not a member"))
            return None
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            self._slots.verified(peername[0])  # a known peer from now on: the reserved share
        return sid

    # --- relaying ---------------------------------------------------------------------------

    async def _relay_to_endpoint(
        self,
        relay: ProtocolRelay,
        route: ServiceRoute,
        port_name: str,
        table: RoutingTable,
        sid: SpiffeId,
        started: float,
        stream: MuxStream | None = None,
    ) -> None:
        """Connect an endpoint to `relay.b` and relay. `relay.a` is the peer's TLS connection
        (already attached) or, for a tunnel, `stream`: attached and accepted once the endpoint
        is connected, or reset with the outcome if none could be."""
        f = flow(GatewayKind.INGRESS, sid.cluster, str(route.service), table.cluster)
        choice = await self._connect_endpoint(relay, route, port_name, table.cluster)
        if isinstance(choice, Outcome):
            f.connection_failed(choice, time.monotonic() - started)
            relay.abort()
            if stream is not None:
                stream.reset(choice.value, f"no endpoint of {route.service} could be reached")
            return
        if stream is not None:
            stream.set_protocol(relay.a)
            relay.a.attach(stream)
            stream.accept()
        self._relays.add(relay)
        f.connection_opened()
        try:
            relay.start()
            stats = await relay.wait()
        finally:
            self._relays.discard(relay)
            self.balancer.end(choice)
            if not relay.done:
                relay.abort()
        outcome = {
            RelayOutcome.CLOSED: Outcome.OK,
            RelayOutcome.IDLE_TIMEOUT: Outcome.IDLE_TIMEOUT,
            RelayOutcome.RESET: Outcome.RESET,
            RelayOutcome.ABORTED: Outcome.DRAINED,
        }[stats.outcome]
        f.connection_closed(outcome, time.monotonic() - started, stats.a_to_b, stats.b_to_a)

    async def _connect_endpoint(
        self, relay: ProtocolRelay, route: ServiceRoute, port_name: str, cluster: str
    ) -> Choice | Outcome:
        loop = asyncio.get_running_loop()
        outcome = Outcome.NO_HEALTHY_DESTINATION
        tried: frozenset[Target] = frozenset()
        for _ in range(self.config.connect_attempts):
            try:
                choice = self.balancer.pick(route, pinned_cluster=cluster, exclude=tried)
            except RoutingError as err:
                log.warning(
                    "ingress has no endpoint",
                    extra={"service": str(route.service), "detail": str(err)},
                )
                return Outcome.NO_HEALTHY_DESTINATION
            endpoint = choice.endpoint
            assert endpoint is not None  # pinned to the local cluster
            port = endpoint.ports.get(port_name)
            if port is None:
                return Outcome.NO_HEALTHY_DESTINATION
            self.balancer.begin(choice)
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    await loop.create_connection(lambda: relay.b, endpoint.address, port)
            except (OSError, TimeoutError) as exc:
                self.balancer.end(choice)
                self.balancer.report_failure(choice, FailureKind.CONNECT)
                tried |= {choice.target}
                outcome = (
                    Outcome.CONNECT_TIMEOUT
                    if isinstance(exc, TimeoutError)
                    else Outcome.CONNECT_ERROR
                )
                log.warning(
                    "ingress endpoint connect failed",
                    extra={
                        "service": str(route.service),
                        "endpoint": f"{endpoint.address}:{port}",
                        "error": repr(exc),
                    },
                )
                continue
            self.balancer.report_success(choice)
            return choice
        return outcome


def _host(peer: str) -> str:
    """The address in a peer label ("ip:port", "[v6]:port", "ip:port stream N")."""
    return split_host_port(peer.partition(" ")[0])[0]


def _route_name(
    server_name: str, table: RoutingTable
) -> tuple[ServiceRoute, str] | FederationSni | ProbeSni | TunnelSni | _Refusal:
    """What a server name (a ClientHello's, or a tunnel stream's target) reaches here."""
    try:
        sni = parse_sni(server_name, table.trust_domain)
    except SniError as err:
        return _Refusal("unknown_sni", str(err))
    if sni.cluster != table.cluster:
        return _Refusal("unknown_sni", f"{server_name} names cluster {sni.cluster}")
    if isinstance(sni, FederationSni | ProbeSni | TunnelSni):
        return sni
    assert isinstance(sni, ServiceSni)
    route = table.get(sni.service)
    if route is None:
        return _Refusal("unknown_sni", f"no service {sni.service}")
    if not route.exported:
        return _Refusal("not_exported", f"{sni.service} is not exported")
    if sni.port not in route.ports:
        return _Refusal("unknown_sni", f"{sni.service} has no port named {sni.port}")
    local = route.destination(table.cluster)
    if local is None or not local.local:
        return _Refusal("unknown_sni", f"{sni.service} has no endpoints in {table.cluster}")
    return route, sni.port


async def _peek_client_hello(sock: socket.socket) -> ClientHello | Rejected:
    """Wait for a whole ClientHello without consuming it from the socket."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    seen = -1
    try:
        for _ in range(MAX_PEEKS):
            ready: asyncio.Future[None] = loop.create_future()

            def wake(fut: asyncio.Future[None] = ready) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            try:
                data = sock.recv(PEEK_LIMIT, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError as exc:
                return Rejected(RejectReason.CLOSED, f"read failed: {exc!r}")
            if len(data) == seen or not data:
                # Readable without new bytes: the peer closed (or broke) mid-ClientHello.
                return Rejected(RejectReason.CLOSED, "closed before a complete ClientHello")
            seen = len(data)
            result = parse_client_hello(data)
            if result is not NEED_MORE:
                assert isinstance(result, ClientHello | Rejected)
                return result
            if len(data) >= PEEK_LIMIT:
                return Rejected(RejectReason.TOO_LARGE, "ClientHello larger than the limit")
            # Readable again only once more bytes than these are queued.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(data) + 1)
        return Rejected(RejectReason.TRICKLE, f"ClientHello came in over {MAX_PEEKS} reads")
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
