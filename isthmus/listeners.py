"""Limits on the appliance's listeners (docs/security.md).

The HTTP listeners (operators' API, control, metrics) are aiohttp apps. aiohttp alone holds a
connection that never finishes its request head for as long as its keep-alive timeout (an hour
by default), takes any number of connections, and asyncio's TLS handshake timeout is a minute:
2,000 TLS connections with partial heads took every file descriptor of the process, and with
them the ingress, the egress and DNS. `LimitedSite` serves an aiohttp runner with:

- its own accept loop, so every connection takes a slot from `ConnectionSlots` before a byte is
  read: at most `max_connections_per_source` per source, at most `max_connections` in all, and
  never more than a share of the process's open-files limit;
- a TLS handshake timeout (`handshake_timeout`);
- a deadline for the first complete request head (`header_timeout`), measured from the end of
  the handshake; later requests on a keep-alive connection must arrive, whole, within the idle
  timeout (aiohttp's `keepalive_timeout`, set to `idle_timeout`, closes a connection that waits
  for a request head, partial or not, that long).

Refusals are counted in `isthmus_listener_rejections_total{listener,reason}` and logged a count
per reason per interval. `ingress_config` maps the `ingress:` section and `federation.peers` to
the ingress' own limits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.admission import ConnectionSlots, Full, RefusalLog, Slot, SlotLimits
from gateway.ingress import IngressConfig
from gateway.listen import listening_socket
from isthmus.config import ApiSection, Config, ControlSection, split_host_port
from isthmus.metrics import LISTENER_CONNECTIONS, LISTENER_REJECTIONS

__all__ = [
    "HttpLimits",
    "LimitedSite",
    "api_limits",
    "control_limits",
    "fd_budget",
    "ingress_config",
    "metrics_limits",
    "serve_app",
]

log = logging.getLogger(__name__)

# Of the open-files limit, what each HTTP listener may hold at most: together well under half,
# which leaves the rest to the ingress, the egress, DNS and the catalog.
FD_SHARES = {"control": 1 / 4, "api": 1 / 8, "metrics": 1 / 32}
MIN_BUDGET = 16


@dataclass(frozen=True, slots=True)
class HttpLimits:
    name: str  # the listener's label in logs and metrics
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    handshake_timeout: float = 10.0  # TLS only
    max_connections: int = 256
    max_connections_per_source: int = 64
    fd_share: float = 1 / 8


def api_limits(section: ApiSection) -> HttpLimits:
    return _limits("api", section)


def control_limits(section: ControlSection) -> HttpLimits:
    return _limits("control", section, handshake_timeout=section.handshake_timeout)


def metrics_limits() -> HttpLimits:
    """The metrics listener has no keys of its own: a scraper or two need little."""
    return HttpLimits("metrics", max_connections=64, max_connections_per_source=16,
                      fd_share=FD_SHARES["metrics"])  # fmt: skip


def _limits(name: str, section: ApiSection | ControlSection, **more: float) -> HttpLimits:
    return HttpLimits(
        name,
        header_timeout=section.header_timeout,
        idle_timeout=section.idle_timeout,
        max_connections=section.max_connections,
        max_connections_per_source=section.max_connections_per_source,
        fd_share=FD_SHARES[name],
        **more,  # type: ignore[arg-type]
    )


def fd_budget(share: float) -> int | None:
    """Connections a listener may hold for its share of the open-files limit (None: no limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(MIN_BUDGET, int(soft * share))


async def serve_app(
    app: web.Application,
    listen: str,
    limits: HttpLimits,
    *,
    ssl_context: ssl.SSLContext | None = None,
    shutdown_timeout: float = 10.0,
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve `app` on `listen` within `limits`: the runner (to clean up) and the bound address.
    Raises OSError when the address cannot be bound."""
    host, port = split_host_port(listen)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        handle_signals=False,
        keepalive_timeout=limits.idle_timeout,
    )
    await runner.setup()
    site = LimitedSite(runner, host, port, limits, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, site.address


class _Listening:
    """What aiohttp's runner expects of a started site's server: `sockets` and `close()`."""

    def __init__(self, sock: socket.socket, close: Callable[[], None]) -> None:
        self.sockets = [sock]
        self._close = close

    def close(self) -> None:
        self._close()


class LimitedSite(web.BaseSite):
    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: HttpLimits,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self.limits = limits
        budget = fd_budget(limits.fd_share)
        self.max_connections = min(limits.max_connections, budget or limits.max_connections)
        self.slots = ConnectionSlots(
            SlotLimits(total=self.max_connections, per_source=limits.max_connections_per_source)
        )
        self._refusals = RefusalLog(log, f"{limits.name} listener refused connection")
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.address[1]}"

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            return self._host, self._port
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def connections(self) -> int:
        return self.slots.held

    async def start(self) -> None:
        await super().start()
        sock = listening_socket(self._host, self._port, self._backlog)
        self._listener = sock
        self._server = _Listening(sock, self._close)  # type: ignore[assignment]
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        LISTENER_CONNECTIONS.labels(self.limits.name).set(0)
        log.info(
            "listener limits",
            extra={
                "listener": self.limits.name,
                "address": self.name,
                "max_connections": self.max_connections,
                "max_connections_per_source": self.limits.max_connections_per_source,
                "header_timeout": self.limits.header_timeout,
                "idle_timeout": self.limits.idle_timeout,
                **({"handshake_timeout": self.limits.handshake_timeout} if self._ssl_context
                   else {}),
            },
        )  # fmt: skip

    async def stop(self) -> None:
        await super().stop()  # closes the listener and the connections still in a handshake
        tasks = [t for t in (self._accept_task, *self._handshakes) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._refusals.flush()

    def _close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        for task in self._handshakes:
            task.cancel()
        if self._listener is not None:
            self._listener.close()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning(
                    "listener accept failed",
                    extra={"listener": self.limits.name, "error": repr(exc)},
                )
                await asyncio.sleep(0.1)
                continue
            host = addr[0]
            peer = f"{host}:{addr[1]}"
            slot = self.slots.acquire(host)
            if slot is Full.SOURCE:
                self._refuse("source_limit", peer, host, "this source holds its share")
                sock.close()
                continue
            if isinstance(slot, Full):
                self._refuse("connection_limit", peer, host, "too many connections")
                sock.close()
                continue
            self._count()
            task = loop.create_task(self._open(sock, slot, peer, host))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _open(self, sock: socket.socket, slot: Slot, peer: str, host: str) -> None:
        loop = asyncio.get_running_loop()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.slots.release(slot)
                self._count()

        server = self._runner.server
        assert server is not None
        protocol = _Limited(server(), release, self.limits.header_timeout, self._head_expired)
        protocol.peer, protocol.host = peer, host
        try:
            if self._ssl_context is None:
                await loop.connect_accepted_socket(lambda: protocol, sock)
            else:
                await loop.connect_accepted_socket(
                    lambda: protocol,
                    sock,
                    ssl=self._ssl_context,
                    ssl_handshake_timeout=self.limits.handshake_timeout,
                )
        except asyncio.CancelledError:
            sock.close()
            release()
            raise
        except (OSError, ssl.SSLError, EOFError, TimeoutError) as exc:
            timed_out = isinstance(exc, TimeoutError | ConnectionAbortedError)
            reason = "handshake_timeout" if timed_out else "handshake_failed"
            self._refuse(reason, peer, host, repr(exc))
            sock.close()
            release()

    def _head_expired(self, protocol: _Limited) -> None:
        self._refuse("header_timeout", protocol.peer, protocol.host, "no complete request head")

    def _refuse(self, reason: str, peer: str, host: str, detail: str) -> None:
        LISTENER_REJECTIONS.labels(self.limits.name, reason).inc()
        self._refusals.refused(reason, peer, detail, host)

    def _count(self) -> None:
        LISTENER_CONNECTIONS.labels(self.limits.name).set(self.slots.held)


class _Limited(asyncio.Protocol):
    """aiohttp's protocol for one connection, with its slot (released when the connection is
    lost) and a deadline for the first complete request head."""

    def __init__(
        self,
        inner: asyncio.Protocol,
        release: Callable[[], None],
        header_timeout: float,
        on_header_timeout: Callable[[_Limited], None],
    ) -> None:
        self._inner = inner
        self._release = release
        self._header_timeout = header_timeout
        self._on_header_timeout = on_header_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, to find a head's end split across reads
        self._transport: asyncio.BaseTransport | None = None
        self.peer = ""
        self.host = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._header_timeout, self._expired)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            # The blank line that ends a head: CRLF CRLF, or bare LF LF (which parsers accept).
            if b"\n\r\n" in seen or b"\n\n" in seen:
                self._timer.cancel()
                self._timer = None
                self._tail = b""
            else:
                self._tail = seen[-2:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release()
        self._inner.connection_lost(exc)

    def _expired(self) -> None:
        self._timer = None
        self._on_header_timeout(self)
        if self._transport is not None:
            self._transport.abort()


# --- the ingress -----------------------------------------------------------------------------


async def ingress_config(cfg: Config, resolve_timeout: float = 2.0) -> IngressConfig:
    """The ingress' limits from `ingress:`, with the federation's peers as known sources: their
    configured addresses (names resolved now) and `ingress.peer_sources`."""
    host, port = split_host_port(cfg.ingress.listen)
    sources = [*cfg.ingress.peer_sources, *await _peer_addresses(cfg, resolve_timeout)]
    i = cfg.ingress
    return IngressConfig(
        host=host,
        port=port,
        client_hello_timeout=i.client_hello_timeout,
        handshake_timeout=i.handshake_timeout,
        max_pending=i.max_pending,
        max_pending_per_source=i.max_pending_per_source,
        max_pending_per_peer=i.max_pending_per_peer,
        reserved_pending_share=i.reserved_pending_share,
        peer_sources=tuple(dict.fromkeys(sources)),
    )


async def _peer_addresses(cfg: Config, timeout: float) -> list[str]:
    """The addresses of `federation.peers` (a peer's egress on its gateway host dials from the
    same host as its ingress, unless NAT says otherwise: then `ingress.peer_sources`)."""
    loop = asyncio.get_running_loop()
    out: list[str] = []
    for peer in cfg.federation.peers:
        host = split_host_port(peer.address)[0]
        try:
            out.append(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass  # a name
        try:
            async with asyncio.timeout(timeout):
                infos: list[Any] = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            log.warning(
                "peer address not resolved: its gateway is known once it completes a handshake",
                extra={"cluster": peer.cluster, "address": peer.address, "error": repr(exc)},
            )
            continue
        out.extend(dict.fromkeys(str(info[4][0]) for info in infos))
    return out
