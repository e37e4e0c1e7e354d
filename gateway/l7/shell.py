"""The asyncio shell of the L7 engine: raw Protocols on the VIP listeners, driven by callbacks.

`_Client` is the Protocol of one client connection. It feeds every event to its `H1Engine`
(`gateway.l7.engine`) and carries out the commands that come back, in order: writes, opening
an upstream (an idle keep-alive connection from the `UpstreamPool` at once, else a dial in a
task), releasing it, closing, pausing. Deadlines are numbers: one ticker per egress compares
them with the clock a few times per timeout, so a request costs no timer, task or future.

Back-pressure is the shell's: a client that reads slowly pauses the upstream it is being
answered from, an upstream that takes a streamed request body slowly pauses the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable

from federation.routing import TableHolder
from gateway.balancer import Balancer
from gateway.closing import abort_transport, close_transport
from gateway.errors import UpstreamError
from gateway.l7.config import HttpConfig
from gateway.l7.engine import Cmd, Command, H1Engine, H1Proxy, Phase, UpstreamKey
from gateway.l7.upstream import UpstreamConn, UpstreamPool
from gateway.tlsclient import ClientContexts
from gateway.tunnel.client import TunnelClient

__all__ = ["H1Server", "H1Shell"]

log = logging.getLogger(__name__)

(
    WRITE_CLIENT, OPEN_UPSTREAM, WRITE_UPSTREAM, RELEASE_UPSTREAM, CLOSE_CLIENT, ARM_DEADLINE,
    PAUSE_CLIENT, RESUME_CLIENT, EOF_CLIENT, EOF_UPSTREAM,
) = tuple(Cmd)  # fmt: skip


class _Client(asyncio.Protocol):
    """One client connection on an L7 VIP listener."""

    __slots__ = (
        "deadline", "dial", "engine", "paused_by_engine", "paused_by_upstream", "server",
        "transport", "upstream",
    )  # fmt: skip

    def __init__(self, server: H1Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.engine: H1Engine | None = None
        self.upstream: UpstreamConn | None = None
        self.dial: asyncio.Task[UpstreamConn] | None = None
        self.deadline: float | None = None
        self.paused_by_engine = False
        self.paused_by_upstream = False

    # --- client transport events --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sockname = transport.get_extra_info("sockname")
        local = (sockname[0], sockname[1]) if sockname else None
        self.engine = H1Engine(self.server.shell.proxy, local)
        self.server.clients.add(self)
        self.run(self.engine.start())
        if self.server.closing:
            self.run(self.engine.drain())

    def data_received(self, data: bytes) -> None:
        self.run(self.engine.client_data(data))  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.run(self.engine.client_eof())  # type: ignore[union-attr]
        return True  # keep the write side open for the answer in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.clients.discard(self)
        self.deadline = None
        self.run(self.engine.client_lost())  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- upstream events (UpstreamConn's owner) -----------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self.run(self.engine.upstream_data(data))  # type: ignore[union-attr]

    def upstream_eof(self) -> bool:
        """True keeps the upstream's write side open (an upgraded connection half-closes)."""
        engine = self.engine
        assert engine is not None
        self.run(engine.upstream_eof())
        return engine.phase is Phase.TUNNEL

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        self.run(self.engine.upstream_lost(repr(exc) if exc else None))  # type: ignore[union-attr]

    def upstream_writable(self, writable: bool) -> None:
        self.paused_by_upstream = not writable
        self._reading()

    def tick(self, now: float) -> None:
        self.run(self.engine.timer(now))  # type: ignore[union-attr]

    # --- carrying out the engine's commands -----------------------------------------------

    def run(self, commands: list[Command]) -> None:
        i = 0
        while i < len(commands):
            cmd = commands[i]
            i += 1
            op = cmd[0]
            if op is WRITE_CLIENT:
                transport = self.transport
                if transport is not None and not transport.is_closing():
                    transport.write(cmd[1])
            elif op is WRITE_UPSTREAM:
                upstream = self.upstream
                if upstream is not None:
                    upstream.write(cmd[1])
            elif op is OPEN_UPSTREAM:
                conn = self.server.shell.upstreams.take(cmd[1])
                if conn is not None:
                    self._attach(conn)
                    commands += self.engine.upstream_connected()  # type: ignore[union-attr]
                else:
                    self._dial(cmd[1])
            elif op is RELEASE_UPSTREAM:
                self._release(cmd[1])
            elif op is ARM_DEADLINE:
                self.deadline = cmd[1]
            elif op is CLOSE_CLIENT:
                self.deadline = None
                transport = self.transport
                if transport is not None:
                    if cmd[1]:
                        abort_transport(transport)
                    else:
                        close_transport(transport)
            elif op is PAUSE_CLIENT:
                self.paused_by_engine = True
                self._reading()
            elif op is RESUME_CLIENT:
                self.paused_by_engine = False
                self._reading()
            elif op is EOF_CLIENT:
                transport = self.transport
                if transport is not None and not transport.is_closing():
                    if transport.can_write_eof():
                        transport.write_eof()
                    else:
                        close_transport(transport)
            elif op is EOF_UPSTREAM and self.upstream is not None:
                self.upstream.write_eof()

    def _reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.paused_by_engine or self.paused_by_upstream:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _attach(self, conn: UpstreamConn) -> None:
        conn.owner = self
        self.upstream = conn
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > 0:
            # The client reads slowly: so does this upstream until its buffer drains.
            high = transport.get_write_buffer_limits()[1]
            if transport.get_write_buffer_size() > high:
                conn.pause_reading()

    def _release(self, reusable: bool) -> None:
        dial, self.dial = self.dial, None
        if dial is not None and not dial.done():
            dial.cancel()
        conn, self.upstream = self.upstream, None
        if self.paused_by_upstream:
            self.paused_by_upstream = False
            self._reading()
        if conn is not None:
            self.server.shell.upstreams.release(conn, reusable)

    def _dial(self, key: UpstreamKey) -> None:
        task = asyncio.get_running_loop().create_task(self.server.shell.upstreams.dial(key))
        self.dial = task
        task.add_done_callback(self._dialled)

    def _dialled(self, task: asyncio.Task[UpstreamConn]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if self.dial is not task:  # given up meanwhile (timeout, client gone)
            if exc is None:
                task.result().abort()
            return
        self.dial = None
        engine = self.engine
        assert engine is not None
        if exc is not None:
            if not isinstance(exc, UpstreamError | OSError):
                log.error("http upstream dial failed", extra={"error": repr(exc)})
            self.run(engine.upstream_failed(str(exc) or repr(exc)))
            return
        conn = task.result()
        if not conn.alive:
            conn.abort()
            self.run(engine.upstream_failed("closed right after it was opened"))
            return
        self._attach(conn)
        self.run(engine.upstream_connected())


class H1Server:
    """Protocol factory of one L7 VIP listener, and its drain."""

    def __init__(self, shell: H1Shell) -> None:
        self.shell = shell
        self.clients: set[_Client] = set()
        self.closing = False

    def __call__(self) -> _Client:
        return _Client(self)

    def tick(self, now: float) -> None:
        for client in [c for c in self.clients if c.deadline is not None and c.deadline <= now]:
            try:
                client.tick(now)
            except Exception:  # one broken connection must not stop the others' deadlines
                log.exception("http deadline failed")
                if client.transport is not None:
                    abort_transport(client.transport)

    async def shutdown(self, timeout: float) -> None:
        """Idle connections close now; requests in flight get `timeout` seconds."""
        self.closing = True
        for client in list(self.clients):
            if client.engine is not None:
                client.run(client.engine.drain())
        deadline = time.monotonic() + timeout
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for client in list(self.clients):
            if client.transport is not None:
                abort_transport(client.transport)
        self.clients.clear()


class H1Shell:
    """The L7 proxy of one egress: the engines' shared state (`H1Proxy`), the upstream pool,
    the listeners' servers and the ticker that fires their deadlines."""

    def __init__(
        self,
        config: HttpConfig,
        tables: TableHolder,
        balancer: Balancer,
        contexts: ClientContexts,
        source_cluster: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
        tunnels: TunnelClient | None = None,
    ) -> None:
        self.config = config
        self.proxy = H1Proxy(config, tables, balancer, source_cluster, clock)
        self.upstreams = UpstreamPool(
            contexts,
            config.connect_timeout,
            config.handshake_timeout,
            config.keepalive_timeout,
            config.max_idle_per_key,
            tunnels=tunnels,
        )
        self._servers: weakref.WeakSet[H1Server] = weakref.WeakSet()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def retries(self) -> int:
        return self.proxy.retries

    def make_server(self) -> H1Server:
        """The protocol factory of one L7 listener (with `shutdown(timeout)` for its drain)."""
        server = H1Server(self)
        self._servers.add(server)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())
        return server

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        self.upstreams.close()

    def drop_gateway(self, gateway: str) -> None:
        """Close idle keep-alive connections to `gateway` (it failed a probe)."""
        self.upstreams.drop_gateway(gateway)

    async def _tick_loop(self) -> None:
        """Deadlines fire within a quarter of the shortest timeout (at most a second) after
        they pass; idle upstream connections are swept every few ticks."""
        cfg = self.config
        tick = min(1.0, cfg.retry.per_try_timeout / 4, cfg.client_keepalive_timeout / 4)
        sweep_every = max(0.5, min(cfg.client_keepalive_timeout, cfg.keepalive_timeout) / 4)
        clock = self.proxy.clock
        last_sweep = clock()
        while True:
            await asyncio.sleep(tick)
            now = clock()
            for server in list(self._servers):
                server.tick(now)
            if now - last_sweep >= sweep_every:
                last_sweep = now
                self.upstreams.sweep()
