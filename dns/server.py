"""DnsServer: a Corefile's server blocks on real sockets (UDP and TCP on each port).

    server = DnsServer(corefile, "127.0.0.1:0", holder)
    await server.start()
    server.port            # the bound port of the listen address
    await server.stop()

`tcp_limits` bounds the open TCP connections of each listener, in all and per source
(`dns.transport.TcpLimits`).

Blocks without a port in their zone key listen on the `listen` port; a block that names a
port gets its own listener on the same hosts. `listen` may hold several comma-separated
addresses (`127.0.0.1:53,[::1]:53`); with port 0 they all share the first bound port.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import dns.plugins  # noqa: F401  (registers the built-in plugins: before any chain is built)
from discovery.addresses import AddressError, split_host_port
from dns.corefile import ServerBlock, parse_corefile
from dns.defaults import RESOLV_CONF, default_corefile
from dns.errors import CorefileError
from dns.httpsvc import HttpEndpoints
from dns.plugin import Handler, Plugin, Setup, Writer, build_chain
from dns.transport import ListenError, Mux, TcpLimits, TcpServer, UdpServer, make_socket
from dns.wire import SERVFAIL, Request
from federation.routing import TableHolder

log = logging.getLogger(__name__)

BIND_ATTEMPTS = 20


def parse_listen(listen: str) -> list[tuple[str, int]]:
    """`HOST:PORT[,HOST:PORT...]`; IPv6 hosts in brackets; `:PORT` means all IPv4 addresses."""
    out = []
    for part in (p.strip() for p in listen.split(",")):
        try:
            host, port = split_host_port(part)
        except AddressError:
            raise ValueError(f"listen address {part!r} is not HOST:PORT") from None
        host = host or "0.0.0.0"
        ipaddress.ip_address(host)  # raises ValueError naming the bad address
        out.append((host, port))
    if not out:
        raise ValueError("no listen address")
    ports = {p for _, p in out}
    if len(ports) != 1:
        raise ValueError(f"listen addresses must share one port, got {sorted(ports)}")
    return out


class _NoPlugins:
    """A block with no answering plugin: every query fails (as CoreDNS's empty chain does)."""

    name = "none"

    def serve(self, req: Request, w: Writer) -> int:
        return SERVFAIL


@dataclass
class _Listener:
    port: int  # as configured (0: any)
    bound: int  # as bound
    sockets: list[socket.socket]
    mux: Mux | None = None
    udp: list[UdpServer] | None = None
    tcp: list[TcpServer] | None = None


class DnsServer:
    def __init__(
        self,
        corefile: str | None,
        listen: str,
        tables: TableHolder,
        *,
        serve_http: bool = True,
        bound_ports: Mapping[int, int] | None = None,
        source: str = "Corefile",
        base_dir: str | None = None,
        resolv_conf: str = RESOLV_CONF,
        tcp_limits: TcpLimits | None = None,
    ) -> None:
        self.addresses = parse_listen(listen)
        self.tcp_limits = tcp_limits or TcpLimits()
        self.hosts = tuple(h for h, _ in self.addresses)
        self.listen_port = self.addresses[0][1]
        self.tables = tables
        self.serve_http = serve_http
        self.bound_ports = dict(bound_ports or {})
        self.base_dir = base_dir
        if corefile is None:
            corefile = default_corefile(self.hosts, self.listen_port, resolv_conf)
            source = "default Corefile"
        self.corefile = corefile
        self.blocks = parse_corefile(corefile, source, base_dir=base_dir)
        self.http = HttpEndpoints() if serve_http else None
        self.plugins: list[Plugin] = []
        self._listeners: dict[int, _Listener] = {}
        self._started = False
        # Set every plugin up once now so a bad Corefile fails here, not at start().
        for block in self.blocks:
            build_chain(self._setup(block, "dns://validate", HttpEndpoints()))

    # -- information -------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port of the `listen` address (for blocks without their own port)."""
        return self._listeners[self.listen_port].bound

    @property
    def ports(self) -> dict[int, int]:
        """Configured port -> bound port, for every listener."""
        return {p: lst.bound for p, lst in self._listeners.items()}

    def mux(self, port: int | None = None) -> Mux:
        """The query router of a listener (by configured port); lets tests skip sockets."""
        mux = self._listeners[self.listen_port if port is None else port].mux
        if mux is None:
            raise RuntimeError("server not started")
        return mux

    def http_port(self, host: str, port: int) -> int:
        """The bound port of a health/ready/prometheus listener configured as HOST:PORT."""
        if self.http is None:
            raise KeyError("this server runs no HTTP listeners")
        return self.http.port(host, port)

    def ready(self) -> bool:
        return self._started and all(p.ready() for p in self.plugins)

    # -- lifecycle -----------------------------------------------------------------------
    def _setup(self, block: ServerBlock, label: str, http: HttpEndpoints | None) -> Setup:
        return Setup(
            block=block,
            server=label,
            tables=self.tables,
            listen_hosts=self.hosts,
            http=http,
            base_dir=self.base_dir,
            shared={"server": self},
        )

    def _block_ports(self, block: ServerBlock) -> set[int]:
        return {k.port if k.port is not None else self.listen_port for k in block.keys}

    async def start(self) -> None:
        if self._started:
            return
        try:
            for block in self.blocks:
                for port in self._block_ports(block):
                    if port not in self._listeners:
                        self._listeners[port] = self._bind(port)
            zones: dict[int, dict[bytes, Handler]] = {p: {} for p in self._listeners}
            for block in self.blocks:
                first_port = min(self._block_ports(block))
                label = f"dns://{self._label_host()}:{self._listeners[first_port].bound}"
                head, plugins = build_chain(self._setup(block, label, self.http))
                self.plugins.extend(plugins)
                for key in block.keys:
                    port = key.port if key.port is not None else self.listen_port
                    zones[port][key.wire] = head if head is not None else _NoPlugins()
            for plugin in self.plugins:
                await plugin.start()
            if self.http is not None:
                await self.http.start()
            for port, lst in self._listeners.items():
                lst.mux = Mux(zones[port], f"dns://{self._label_host()}:{lst.bound}")
                lst.udp, lst.tcp = [], []
                for sock in lst.sockets:
                    if sock.type == socket.SOCK_DGRAM:
                        udp = UdpServer(lst.mux, sock)
                        udp.start()
                        lst.udp.append(udp)
                    else:
                        tcp = TcpServer(lst.mux, self.tcp_limits)
                        tcp.server = await asyncio.start_server(tcp.handle, sock=sock)
                        lst.tcp.append(tcp)
        except BaseException:
            await self.stop()
            raise
        self._started = True
        log.info(
            "dns server started",
            extra={
                "listen": ",".join(
                    f"{h}:{lst.bound}" for h in self.hosts for lst in self._listeners.values()
                ),
                "zones": ",".join(k.zone for b in self.blocks for k in b.keys),
            },
        )

    def _label_host(self) -> str:
        host = self.hosts[0]
        return f"[{host}]" if ":" in host else host

    def _bind(self, port: int) -> _Listener:
        want = self.bound_ports.get(port, port)
        last: OSError | None = None
        for _ in range(BIND_ATTEMPTS if want == 0 else 1):
            socks: list[socket.socket] = []
            try:
                bound = want
                for host in self.hosts:
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        sock = make_socket(host, bound, kind)
                        socks.append(sock)
                        bound = sock.getsockname()[1]
                return _Listener(port, bound, socks)
            except OSError as e:
                for s in socks:
                    s.close()
                last = e
                if e.errno != errno.EADDRINUSE:
                    break
        raise ListenError(f"cannot listen on {self.hosts} port {want}: {last}") from last

    async def stop(self) -> None:
        for lst in self._listeners.values():
            for udp in lst.udp or ():
                udp.close()
            for tcp in lst.tcp or ():
                await tcp.close()
            for s in lst.sockets:
                s.close()
        self._listeners.clear()
        for plugin in self.plugins:
            try:
                await plugin.stop()
            except Exception:
                log.exception("dns plugin stop failed", extra={"plugin": plugin.name})
        self.plugins.clear()
        if self.http is not None:
            await self.http.stop()
        self._started = False

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


__all__ = ["CorefileError", "DnsServer", "parse_listen"]
