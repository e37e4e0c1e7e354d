"""The egress gateway: listeners on every service VIP and port (DESIGN §2 steps 2-4).

Listeners follow the routing table: on every published snapshot the egress opens listeners for
new `VIP:port`s, closes the ones no longer wanted (their connections get `drain` seconds to
finish) and keeps the rest. Each listener is L4 or L7 by its port name (`vips.port_mode`).

An L4 connection learns its service from its local address (`table.by_vip`), then up to
`connect_attempts` times: pick a destination (pinned for a cluster VIP), connect, and relay.
- A local endpoint: a plain TCP connection and a zero-copy splice relay.
- A remote cluster: a stream on a multiplexed mutual-TLS tunnel to its ingress
  (`tunnelclient.TunnelClient`, `multiplex: true`, the default), or a TLS connection of its
  own with the service SNI taken from a warm pool (`l4.pool.WarmPool`, `multiplex: false`);
  relayed with asyncio Protocols.
A failed connect is reported to the balancer (outlier detection) and the next attempt avoids
the targets already tried. An L7 listener is served by the HTTP/1.1 engine (`l7.shell`).

Listeners are file descriptors: the egress opens at most `max_listeners` of them (by default a
quarter of the open-file limit, `budget.listener_budget`); what the table wants beyond that is
left out, logged once per change, counted in `isthmus_egress_listeners_skipped` and shown in
`GET /v1/status`, so no catalog content can take the process's descriptors.

Remote gateways are probed (`probe.GatewayProber`), so a dead ingress leaves the balancer's
choices before clients hit it. VIP listeners bind with IP_FREEBIND: a VIP range routed to the
node (`ip route add local <vip_cidr> dev lo`) needs no address on an interface, and the
listeners start even before the route exists.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from federation.routing import IPAddress, RoutingTable, TableHolder
from federation.trust.credentials import TlsCredentials
from gateway.balancer import Balancer, Choice, FailureKind, Target
from gateway.budget import BUDGET, LISTENERS, SKIPPED, listener_budget
from gateway.errors import ConnectFailed, RoutingError
from gateway.l4.pool import PoolConfig, WarmPool
from gateway.l4.relay import ProtocolRelay, RelayConfig, RelayOutcome, SpliceRelay, splice_supported
from gateway.l7.config import HttpConfig
from gateway.l7.shell import H1Server, H1Shell
from gateway.listen import listening_socket
from gateway.metrics import GatewayKind, Outcome, ejection_listener, flow, record_rejection
from gateway.probe import GatewayProber, ProbeConfig
from gateway.proto.sni import service_sni
from gateway.tlsclient import ClientContexts
from gateway.tunnel.client import TunnelClient
from gateway.tunnel.transport import MuxConfig
from gateway.vips import ListenerSpec, Mode, Resolved, fit_budget, resolve, wanted_listeners

__all__ = ["Egress", "EgressConfig"]

log = logging.getLogger(__name__)

_RELAY_OUTCOMES = {
    RelayOutcome.CLOSED: Outcome.OK,
    RelayOutcome.IDLE_TIMEOUT: Outcome.IDLE_TIMEOUT,
    RelayOutcome.RESET: Outcome.RESET,
    RelayOutcome.ABORTED: Outcome.DRAINED,
}


@dataclass(frozen=True, slots=True)
class EgressConfig:
    vip_cidr: str = "127.240.0.0/16"
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    connect_attempts: int = 3  # L4: destinations tried per connection
    max_connections: int = 10_000  # L4 connections open at once
    backlog: int = 1024
    reuse_port: bool = False  # worker processes share every VIP listener
    free_bind: bool = True
    http_at_l7: bool = True  # HTTP port names go through the L7 proxy
    drain: float = 5.0  # seconds a removed listener's connections get to finish
    buffer_size: int = 1 << 20  # SO_RCVBUF/SO_SNDBUF of upstream sockets; 0 = kernel default
    multiplex: bool = True  # remote clusters through multiplexed tunnels (else one TLS each)
    max_listeners: int | None = None  # VIP listeners at most; None: a quarter of RLIMIT_NOFILE
    mux: MuxConfig = field(default_factory=MuxConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    def __post_init__(self) -> None:
        ipaddress.ip_network(self.vip_cidr)  # raises ValueError naming the bad value
        if self.connect_attempts < 1 or self.max_connections < 1:
            raise ValueError("connect_attempts and max_connections must be >= 1")
        if self.max_listeners is not None and self.max_listeners < 1:
            raise ValueError("max_listeners must be >= 1")


@dataclass(eq=False)
class _Listener:
    spec: ListenerSpec
    sock: socket.socket
    accept_task: asyncio.Task[None] | None = None
    server: asyncio.AbstractServer | None = None  # L7
    http: H1Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Egress:
    def __init__(
        self,
        config: EgressConfig,
        tables: TableHolder,
        credentials: TlsCredentials,
        balancer: Balancer | None = None,
        source_cluster: str | None = None,
    ) -> None:
        self.config = config
        self._tables = tables
        self._cidr = ipaddress.ip_network(config.vip_cidr)
        self._source = source_cluster
        self.balancer = balancer or Balancer(on_eject=ejection_listener(self.source_cluster))
        self.contexts = ClientContexts(credentials)
        self.pool = WarmPool(config.pool, self.contexts)
        self.tunnels = TunnelClient(
            config.mux, self.contexts, config.connect_timeout, config.handshake_timeout
        )
        self.prober = GatewayProber(
            config.probe, self.contexts, self.balancer, on_change=self._probe_changed
        )
        self.http = H1Shell(
            config.http,
            tables,
            self.balancer,
            self.contexts,
            lambda: self.source_cluster,
            tunnels=self.tunnels if config.multiplex else None,
        )
        self._listeners: dict[tuple[IPAddress, int], _Listener] = {}
        self.budget = listener_budget(config.max_listeners)
        self.skipped: list[ListenerSpec] = []  # wanted by the table, left out by the budget
        self._retiring: set[asyncio.Task[None]] = set()
        self._relays: set[ProtocolRelay | SpliceRelay] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._connections = 0
        self._started = False
        self._closing = False

    @property
    def source_cluster(self) -> str:
        return self._source or self._tables.current.cluster

    @property
    def listeners(self) -> dict[tuple[IPAddress, int], Mode]:
        return {k: v.spec.mode for k, v in self._listeners.items()}

    @property
    def connections(self) -> int:
        return self._connections

    def report(self) -> dict[str, int]:
        """The listener budget as `GET /v1/status` shows it."""
        return {
            "budget": self.budget,
            "open": len(self._listeners),
            "skipped": len(self.skipped),
        }

    async def start(self) -> None:
        """Open the listeners of the current table and follow every later one."""
        self._started = True
        self.pool.start()
        self.tunnels.start()
        self._unsubscribe = self._tables.subscribe(self._on_table)
        await self.sync(self._tables.current)

    async def close(self, drain: float = 0.0) -> None:
        """Stop accepting; give open connections and requests `drain` seconds, then close."""
        self._closing = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        listeners = list(self._listeners.values())
        self._listeners.clear()
        await self.prober.close()
        await asyncio.gather(*(self._retire(lst, drain) for lst in listeners))
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.http.close()
        await self.pool.close()
        await self.tunnels.close()

    # --- listeners follow the table ------------------------------------------------------

    def _on_table(self, table: RoutingTable) -> None:
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self.sync(table))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def sync(self, table: RoutingTable) -> None:
        """Make the listeners match `table` (tables may arrive faster than this runs: it always
        works from the newest)."""
        table = self._tables.current if table.version < self._tables.current.version else table
        wanted, problems = wanted_listeners(table, self._cidr, self.config.http_at_l7)
        for problem in problems:
            log.warning("egress cannot listen", extra={"problem": problem})
        wanted, skipped = fit_budget(
            wanted, {k: lst.spec for k, lst in self._listeners.items()}, self.budget
        )
        for key in [k for k, lst in self._listeners.items() if wanted.get(k) != lst.spec]:
            lst = self._listeners.pop(key)
            task = asyncio.create_task(self._retire(lst, self.config.drain))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        failed: list[tuple[str, str]] = []
        for key, spec in wanted.items():
            if key not in self._listeners:
                try:
                    self._listeners[key] = await self._open(spec)
                except OSError as exc:
                    failed.append((spec.address, repr(exc)))
        if failed:  # one line, however many: a busy range must not flood the log
            log.error(
                "egress listen failed",
                extra={"count": len(failed), "address": failed[0][0], "error": failed[0][1],
                       "addresses": [a for a, _ in failed[:10]]},
            )
        self._report_budget(skipped)
        self.balancer.retain(Balancer.targets_of(list(table.services.values())))
        gateways = {
            g for r in table.services.values() for d in r.destinations if not d.local
            for g in d.gateways
        }  # fmt: skip
        self.pool.retain(gateways)
        self.tunnels.retain(gateways)
        self.prober.update(table)

    def _report_budget(self, skipped: list[ListenerSpec]) -> None:
        cluster = self.source_cluster
        if len(skipped) != len(self.skipped):
            if skipped:
                log.warning(
                    "egress listener budget exhausted",
                    extra={"budget": self.budget, "open": len(self._listeners),
                           "skipped": len(skipped), "first_skipped": skipped[0].address,
                           "key": "egress.max_listeners"},
                )
            else:
                log.info("egress listener budget: every wanted listener is open",
                         extra={"budget": self.budget, "open": len(self._listeners)})
        self.skipped = skipped
        BUDGET.labels(cluster).set(self.budget)
        LISTENERS.labels(cluster).set(len(self._listeners))
        SKIPPED.labels(cluster).set(len(skipped))

    async def _open(self, spec: ListenerSpec) -> _Listener:
        sock = listening_socket(
            str(spec.vip), spec.port, self.config.backlog,
            reuse_port=self.config.reuse_port, free_bind=self.config.free_bind,
        )
        lst = _Listener(spec, sock)
        if spec.mode is Mode.HTTP:
            lst.http = self.http.make_server()
            lst.server = await asyncio.get_running_loop().create_server(
                lst.http, sock=sock, backlog=self.config.backlog
            )
        else:
            lst.accept_task = asyncio.create_task(self._accept_loop(lst))
        log.info("egress listening", extra={"address": spec.address, "mode": spec.mode.value})
        return lst

    async def _retire(self, lst: _Listener, drain: float) -> None:
        """Stop accepting on `lst`; its connections get `drain` seconds, then are closed."""
        if lst.accept_task is not None:
            lst.accept_task.cancel()
            await asyncio.gather(lst.accept_task, return_exceptions=True)
        if lst.server is not None:
            lst.server.close()
            assert lst.http is not None
            await lst.http.shutdown(drain)  # idle keep-alives close now, requests may finish
        lst.sock.close()
        if lst.tasks:
            if drain > 0:
                await asyncio.wait(set(lst.tasks), timeout=drain)
            for task in list(lst.tasks):
                task.cancel()
            await asyncio.gather(*lst.tasks, return_exceptions=True)
        log.info("egress listener closed", extra={"address": lst.spec.address})

    # --- L4 connections ---------------------------------------------------------------------

    async def _accept_loop(self, lst: _Listener) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lst.sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("egress accept failed", extra={"error": repr(exc)})
                await asyncio.sleep(0.1)
                continue
            if self._connections >= self.config.max_connections:
                record_rejection(GatewayKind.EGRESS, self.source_cluster, "connection_limit")
                sock.close()
                continue
            task = asyncio.create_task(self._serve(sock, lst.spec))
            lst.tasks.add(task)
            task.add_done_callback(lst.tasks.discard)

    async def _serve(self, client: socket.socket, spec: ListenerSpec) -> None:
        started = time.monotonic()
        self._connections += 1
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            table = self._tables.current
            target = resolve(table, str(spec.vip), spec.port)
            if target is None:
                record_rejection(GatewayKind.EGRESS, self.source_cluster, "unknown_vip")
                client.close()
                return
            await self._route(client, target, table, started)
        finally:
            self._connections -= 1

    async def _route(
        self, client: socket.socket, target: Resolved, table: RoutingTable, started: float
    ) -> None:
        service = str(target.service)
        tried: frozenset[Target] = frozenset()
        outcome = Outcome.NO_HEALTHY_DESTINATION
        cluster = target.pinned_cluster or "none"
        for _ in range(self.config.connect_attempts):
            try:
                choice = self.balancer.pick(target.route, target.pinned_cluster, exclude=tried)
            except RoutingError as err:
                log.warning("egress has no destination",
                            extra={"service": service, "detail": str(err)})  # fmt: skip
                outcome = Outcome.NO_HEALTHY_DESTINATION
                break
            tried |= {choice.target}
            cluster = choice.cluster
            self.balancer.begin(choice)
            try:
                relay = await self._connect(client, choice, target.port_name, table)
            except ConnectFailed as err:
                self.balancer.end(choice)
                self.balancer.report_failure(choice, FailureKind.CONNECT)
                outcome = Outcome(err.outcome)
                log.warning(
                    "egress connect failed",
                    extra={"service": service, "cluster": choice.cluster,
                           "target": choice.target.ident, "error": str(err)},
                )  # fmt: skip
                continue
            except BaseException:
                self.balancer.end(choice)
                client.close()
                raise
            self.balancer.report_success(choice)
            await self._relay(relay, choice, started)
            return
        client.close()
        flow(GatewayKind.EGRESS, self.source_cluster, service, cluster).connection_failed(
            outcome, time.monotonic() - started
        )

    async def _connect(
        self, client: socket.socket, choice: Choice, port_name: str, table: RoutingTable
    ) -> ProtocolRelay | SpliceRelay:
        """Connect to the chosen target and build the relay (not started yet)."""
        loop = asyncio.get_running_loop()
        relay_cfg = self.config.relay
        if choice.endpoint is not None:
            ep = choice.endpoint
            port = ep.ports.get(port_name)
            if port is None:
                raise ConnectFailed(f"{ep.workload_id} has no port {port_name}")
            upstream = await self._connect_tcp(ep.address, port)
            if relay_cfg.splice and splice_supported():
                return SpliceRelay(client, upstream, relay_cfg, loop)
            relay = ProtocolRelay(relay_cfg, loop)
            try:
                await loop.connect_accepted_socket(lambda: relay.b, upstream)
            except OSError as exc:
                upstream.close()
                raise ConnectFailed(repr(exc)) from exc
            await loop.connect_accepted_socket(lambda: relay.a, client)
            return relay
        gateway = choice.gateway
        assert gateway is not None
        sni = service_sni(port_name, choice.route.service, choice.cluster, table.trust_domain)
        relay = ProtocolRelay(relay_cfg, loop)
        upstream: asyncio.Transport
        if self.config.multiplex:
            upstream = await self.tunnels.open(gateway, choice.cluster, table.trust_domain, sni)
        else:
            upstream = (await self.pool.acquire(gateway, sni, choice.cluster)).transport
        upstream.set_protocol(relay.b)
        relay.b.attach(upstream)
        if self.config.multiplex:
            # A stream's unsent bytes drain in credit-sized bursts: with the relay's 1 MiB /
            # 256 KiB marks the client was paused across bursts and bulk moved at 0.75x
            # HAProxy; with marks at half and an eighth of the window, at 0.88x
            # (bench/gateway_bench.py). At most half a window waits per connection.
            window = self.config.mux.window
            upstream.set_write_buffer_limits(high=window // 2, low=window // 8)
        try:
            await loop.connect_accepted_socket(lambda: relay.a, client)
        except BaseException:
            upstream.abort()
            raise
        return relay

    async def _connect_tcp(self, host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.buffer_size:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.buffer_size)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.buffer_size)
            async with asyncio.timeout(self.config.connect_timeout):
                await loop.sock_connect(sock, (host, port))
        except TimeoutError as exc:
            sock.close()
            raise ConnectFailed(f"{host}:{port}: timed out", Outcome.CONNECT_TIMEOUT) from exc
        except OSError as exc:
            sock.close()
            raise ConnectFailed(f"{host}:{port}: {exc!r}", Outcome.CONNECT_ERROR) from exc
        except BaseException:
            sock.close()
            raise
        return sock

    async def _relay(
        self, relay: ProtocolRelay | SpliceRelay, choice: Choice, started: float
    ) -> None:
        service = str(choice.route.service)
        f = flow(GatewayKind.EGRESS, self.source_cluster, service, choice.cluster)
        f.connection_opened()
        self._relays.add(relay)
        try:
            relay.start()
            stats = await relay.wait()
        except asyncio.CancelledError:  # drained away by close() or a retired listener
            relay.abort()
            f.connection_closed(Outcome.DRAINED, time.monotonic() - started, 0, 0)
            raise
        finally:
            self._relays.discard(relay)
            self.balancer.end(choice)
        f.connection_closed(
            _RELAY_OUTCOMES[stats.outcome], time.monotonic() - started, stats.a_to_b, stats.b_to_a
        )

    # --- probes -----------------------------------------------------------------------------

    def _probe_changed(self, target: Target, down: bool) -> None:
        if down:
            self.pool.drop_gateway(target.ident)
            self.tunnels.drop_gateway(target.ident)
            self.http.drop_gateway(target.ident)
