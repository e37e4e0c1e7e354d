"""Keep-alive HTTP/1.1 connections from the egress to destinations, for the L7 shell.

An `UpstreamConn` is an asyncio Protocol on a plain TCP connection (local endpoint), on a
stream of a multiplexed tunnel to a remote ingress (`tunnel.client.TunnelClient`), or on a
gateway connection of its own to that ingress (`tlsclient.dial_gateway`, with resumption).
It only passes bytes and ends to its owner (`shell._Client`, which feeds them to its engine):
what they mean is the engine's business. Between requests it waits in the `UpstreamPool`,
which drops it when it closes or speaks unasked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

from gateway.closing import abort_transport, close_transport
from gateway.errors import ConnectFailed
from gateway.l7.engine import UpstreamKey
from gateway.metrics import Outcome
from gateway.tlsclient import ClientContexts, dial_gateway
from gateway.tunnel.client import TunnelClient

__all__ = ["Owner", "UpstreamConn", "UpstreamKey", "UpstreamPool"]


class Owner(Protocol):
    """Who an upstream connection in use reports to (the client connection it serves)."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_eof(self) -> bool: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_writable(self, writable: bool) -> None: ...


class UpstreamConn(asyncio.Protocol):
    __slots__ = (
        "generation", "idle_since", "key", "lost", "on_idle_lost", "owner", "paused",
        "transport",
    )  # fmt: skip

    def __init__(self, key: UpstreamKey, generation: int = 0) -> None:
        self.key = key
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.owner: Owner | None = None
        self.paused = False
        self.lost = False
        self.idle_since = 0.0
        self.on_idle_lost: Callable[[UpstreamConn], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:  # nothing was asked: the stream is out of step, drop it
            self.abort()
            return
        owner.upstream_data(data)

    def eof_received(self) -> bool:
        owner = self.owner
        return owner.upstream_eof() if owner is not None else False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.upstream_lost(exc)
        elif self.on_idle_lost is not None:
            self.on_idle_lost(self)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writable(False)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writable(True)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            abort_transport(self.transport)

    def close(self) -> None:
        """Close after flushing; bytes that still come are answered by `abort`."""
        if self.transport is not None:
            close_transport(self.transport)

    @property
    def alive(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()


class UpstreamPool:
    """Idle keep-alive connections per destination (most recently used first)."""

    def __init__(
        self,
        contexts: ClientContexts,
        connect_timeout: float,
        handshake_timeout: float,
        keepalive_timeout: float,
        max_idle_per_key: int = 256,
        tunnels: TunnelClient | None = None,
    ) -> None:
        self.contexts = contexts
        self.tunnels = tunnels
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_idle_per_key = max_idle_per_key
        self._idle: dict[UpstreamKey, collections.deque[UpstreamConn]] = {}
        self._closed = False
        self.dials = 0
        self.reuses = 0

    def take(self, key: UpstreamKey) -> UpstreamConn | None:
        """An idle connection to `key`, or None."""
        dq = self._idle.get(key)
        if not dq:
            return None
        now = time.monotonic()
        generation = self.contexts.credentials.generation
        while dq:
            conn = dq.pop()
            conn.on_idle_lost = None
            if (
                conn.alive
                and now - conn.idle_since < self.keepalive_timeout
                and (key.gateway is None or conn.generation == generation)
            ):
                self.reuses += 1
                return conn
            conn.abort()
        return None

    async def dial(self, key: UpstreamKey) -> UpstreamConn:
        """A new connection to `key` (raises ConnectFailed)."""
        loop = asyncio.get_running_loop()
        self.dials += 1
        if key.gateway is not None and self.tunnels is not None:
            assert key.sni is not None and key.cluster is not None and key.trust_domain
            stream = await self.tunnels.open(key.gateway, key.cluster, key.trust_domain, key.sni)
            conn = UpstreamConn(key, stream.connection.generation)
            stream.set_protocol(conn)
            conn.connection_made(stream)
            return conn
        if key.gateway is not None:
            assert key.sni is not None and key.cluster is not None
            gw = await dial_gateway(
                self.contexts, key.gateway, key.sni, key.cluster,
                self.connect_timeout, self.handshake_timeout,
            )  # fmt: skip
            conn = UpstreamConn(key, gw.generation)
            gw.protocol.on_lost = None
            gw.transport.set_protocol(conn)
            conn.connection_made(gw.transport)
            if not gw.alive:
                conn.lost = True
                raise ConnectFailed(f"{key.gateway}: closed right after the handshake")
            return conn
        conn = UpstreamConn(key)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: conn, key.host, key.port)
        except TimeoutError as exc:
            msg = f"{key.host}:{key.port}: timed out"
            raise ConnectFailed(msg, Outcome.CONNECT_TIMEOUT) from exc
        except OSError as exc:
            raise ConnectFailed(f"{key.host}:{key.port}: {exc!r}", Outcome.CONNECT_ERROR) from exc
        return conn

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        """The exchange on `conn` is over: keep it for the next request, or close it."""
        conn.owner = None
        if not reusable or self._closed or not conn.alive:
            conn.close()  # after what is buffered (an upgraded connection's last bytes)
            return
        conn.resume_reading()
        dq = self._idle.get(conn.key)
        if dq is None:
            dq = self._idle[conn.key] = collections.deque()
        conn.idle_since = time.monotonic()
        conn.on_idle_lost = self._lost
        dq.append(conn)
        if len(dq) > self.max_idle_per_key:
            old = dq.popleft()
            old.on_idle_lost = None
            old.abort()

    def _lost(self, conn: UpstreamConn) -> None:
        dq = self._idle.get(conn.key)
        if dq is not None:
            with contextlib.suppress(ValueError):
                dq.remove(conn)

    def sweep(self) -> None:
        """Close idle connections past the keep-alive timeout or made with old credentials."""
        now = time.monotonic()
        generation = self.contexts.credentials.generation
        for key, dq in list(self._idle.items()):
            kept: collections.deque[UpstreamConn] = collections.deque()
            for conn in dq:
                stale = key.gateway is not None and conn.generation != generation
                if conn.alive and not stale and now - conn.idle_since < self.keepalive_timeout:
                    kept.append(conn)
                else:
                    conn.on_idle_lost = None
                    conn.abort()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    def drop_gateway(self, gateway: str) -> None:
        for key in [k for k in self._idle if k.gateway == gateway]:
            for conn in self._idle.pop(key):
                conn.on_idle_lost = None
                conn.abort()

    def idle_count(self) -> int:
        return sum(len(dq) for dq in self._idle.values())

    def close(self) -> None:
        self._closed = True
        for dq in self._idle.values():
            for conn in dq:
                conn.on_idle_lost = None
                conn.abort()
        self._idle.clear()
