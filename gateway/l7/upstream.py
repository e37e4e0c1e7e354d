"""Keep-alive HTTP/1.1 connections from the egress to destinations, for the L7 fast path.

An `UpstreamConn` is an asyncio Protocol on a plain TCP connection (local endpoint), on a
stream of a multiplexed tunnel to a remote ingress (`tunnel.client.TunnelClient`), or on a
gateway connection of its own to that ingress (`tlsclient.dial_gateway`, with resumption).
It carries one `Exchange` (request -> response) at a time; the response head is parsed with
`h1.parse_response_head` and the body's end found with `h1.BodyScanner`, so the connection can
go back to the `UpstreamPool` as soon as the response is complete. Body bytes are either
collected (small responses: the proxy may still retry) or written straight to the client's
transport as they arrive, with back-pressure both ways.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import NamedTuple, Protocol

from gateway.errors import ConnectFailed, UpstreamError
from gateway.metrics import Outcome
from gateway.proto.h1 import BodyKind, BodyScanner, H1Error, ResponseHead, parse_response_head
from gateway.tlsclient import ClientContexts, dial_gateway
from gateway.tunnel.client import TunnelClient

__all__ = ["Exchange", "UpstreamClosed", "UpstreamConn", "UpstreamKey", "UpstreamPool"]


class UpstreamClosed(UpstreamError):
    """The destination closed or broke the connection before the response was complete."""


class UpstreamKey(NamedTuple):  # a dict key on every request: hashed in C
    host: str
    port: int
    gateway: str | None = None  # "host:port" of a remote ingress (TLS), None for plain TCP
    sni: str | None = None
    cluster: str | None = None
    trust_domain: str | None = None


class Listener(Protocol):
    """Callbacks of an exchange driven without a task (`h1proxy` fast path)."""

    def on_head(self, ex: Exchange) -> None: ...
    def on_done(self, ex: Exchange, complete: bool) -> None: ...
    def on_fail(self, ex: Exchange, exc: Exception) -> None: ...


class Exchange:
    """One request and its response on an `UpstreamConn`.

    Awaited through `head_ready` / `collect` / `stream_to`, or, with a `listener`, driven by
    its callbacks (no futures, no task): `on_head` once the head is parsed, `on_done` when the
    body is complete (or cut short), `on_fail` when the response broke before its end."""

    __slots__ = (
        "_loop", "_parts", "_sink", "body_done", "buf", "conn", "extra", "finished", "head",
        "head_ready", "listener", "method", "received", "scanner",
    )  # fmt: skip

    def __init__(
        self,
        conn: UpstreamConn,
        method: str,
        loop: asyncio.AbstractEventLoop,
        listener: Listener | None = None,
    ) -> None:
        self.conn = conn
        self.method = method
        self._loop = loop
        self.listener = listener
        self.buf = bytearray()
        self.head: ResponseHead | None = None
        self.finished: bool | None = None  # True: body complete, False: cut short
        if listener is None:
            self.head_ready: asyncio.Future[ResponseHead] = loop.create_future()
            self.body_done: asyncio.Future[bool] = loop.create_future()  # True: complete
        self.scanner: BodyScanner | None = None
        self._parts: list[bytes] = []
        self._sink: asyncio.Transport | None = None
        self.received = 0  # body bytes
        self.extra = False  # bytes beyond the response: the connection cannot be reused

    # --- fed by the protocol --------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.head is None:
            # Usually the whole head (and body) is in this one chunk: parse it where it is.
            src: bytes | bytearray = data
            if self.buf:
                self.buf += data
                src = self.buf
            try:
                while True:
                    head = parse_response_head(src, self.method)
                    if head is None:
                        if src is data:
                            self.buf = bytearray(data)
                        return
                    if head.interim and head.status != 101:
                        if src is data:
                            src = self.buf = bytearray(data)
                        del self.buf[: head.size]  # 100 Continue, 103 Early Hints: skip
                        continue
                    break
            except H1Error as err:
                self.fail(err)
                return
            self.head = head
            rest = bytes(src[head.size :])
            if src is not data:
                self.buf = bytearray()
            self.scanner = BodyScanner(head.body, head.length)
            if head.status == 101:  # we never ask for an upgrade: do not reuse
                self.extra = True
            if self.listener is not None:
                self.listener.on_head(self)
                if self.finished is not None:  # the listener gave up on the exchange
                    return
            elif not self.head_ready.done():
                self.head_ready.set_result(head)
            if rest or self.scanner.done:
                self._body(rest)
            return
        self._body(data)

    def _body(self, data: bytes) -> None:
        scanner = self.scanner
        assert scanner is not None
        if scanner.done:
            if data:
                self.extra = True
            self._finish(True)
            return
        try:
            n = scanner.scan(data)
        except H1Error as err:
            self.fail(err)
            return
        if n < len(data):
            self.extra = True
            data = data[:n]
        if data:
            self.received += len(data)
            if self._sink is not None:
                self._sink.write(data)
            else:
                self._parts.append(data)
        if scanner.done:
            self._finish(True)

    @property
    def over(self) -> bool:
        if self.listener is not None:
            return self.finished is not None
        return self.body_done.done()

    def eof(self) -> None:
        scanner = self.scanner
        if scanner is not None and scanner.kind is BodyKind.UNTIL_CLOSE:
            scanner.done = True
            self.extra = True  # not reusable: the body ended with the connection
            self._finish(True)
        else:
            self.fail(UpstreamClosed("the destination closed before the response was complete"))

    def fail(self, exc: Exception) -> None:
        self.extra = True
        if self.listener is not None:
            if self.finished is None:
                self.finished = False
                self.listener.on_fail(self, exc)
            self.conn.abort()
            return
        if not self.head_ready.done():
            self.head_ready.set_exception(exc)
            self.head_ready.exception()  # retrieved: the proxy may be gone already
        if not self.body_done.done():
            self.body_done.set_result(False)
        self.conn.abort()

    def _finish(self, ok: bool) -> None:
        if self.listener is not None:
            if self.finished is None:
                self.finished = ok
                self.listener.on_done(self, ok)
            return
        if not self.body_done.done():
            self.body_done.set_result(ok)

    def abandon(self) -> None:
        """Listener mode: the proxy gives up on this response (e.g. a 5xx it will retry)."""
        self.extra = True
        if self.finished is None:
            self.finished = False

    def take_body(self) -> bytes:
        """The collected body (listener mode, once `on_done` said it is complete)."""
        parts, self._parts = self._parts, []
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def set_sink(self, sink: asyncio.Transport | None) -> None:
        """Write body bytes (those collected so far, then the rest) straight to `sink`."""
        if sink is not None and self._parts:
            sink.writelines(self._parts)
            self._parts = []
        self._sink = sink

    # --- used by the proxy ------------------------------------------------------------------

    async def collect(self) -> bytes:
        """The whole body (raises UpstreamClosed if it was cut short)."""
        if not await self.body_done:
            raise UpstreamClosed("the response body was cut short")
        parts, self._parts = self._parts, []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def stream_to(self, sink: asyncio.Transport) -> bool:
        """Write the body to `sink` as it arrives; True once complete, False if cut short."""
        if self._parts:
            sink.writelines(self._parts)
            self._parts = []
        self._sink = sink
        try:
            return await self.body_done
        finally:
            self._sink = None

    @property
    def reusable(self) -> bool:
        head = self.head
        if head is None or not head.keep_alive or self.extra:
            return False
        if self.listener is not None:
            return self.finished is True
        return self.body_done.done() and self.body_done.result()


class UpstreamConn(asyncio.Protocol):
    __slots__ = (
        "exchange", "generation", "idle_since", "key", "loop", "lost", "on_idle_lost", "paused",
        "transport",
    )  # fmt: skip

    def __init__(self, key: UpstreamKey, generation: int = 0) -> None:
        self.key = key
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.paused = False
        self.lost = False
        self.idle_since = 0.0
        self.on_idle_lost: collections.abc.Callable[[UpstreamConn], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:  # nothing was asked: the stream is out of step, drop it
            self.abort()
            return
        ex.feed(data)

    def eof_received(self) -> bool:
        ex = self.exchange
        if ex is not None:
            ex.eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        ex = self.exchange
        if ex is not None and not ex.over:
            if ex.scanner is not None and ex.scanner.kind is BodyKind.UNTIL_CLOSE and exc is None:
                ex.eof()
            else:
                ex.fail(UpstreamClosed(f"connection lost: {exc!r}" if exc else "connection lost"))
        elif ex is None and self.on_idle_lost is not None:
            self.on_idle_lost(self)

    def start(self, method: str, data: bytes, listener: Listener | None = None) -> Exchange:
        """Send one request (head and buffered body) and return its exchange."""
        assert self.transport is not None and self.exchange is None
        # The loop is looked up once per connection: asyncio.get_running_loop() costs a getpid()
        # system call per call in CPython 3.11, which on this machine kind is several us.
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        ex = self.exchange = Exchange(self, method, loop, listener)
        self.transport.write(data)
        return ex

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
            self.transport.abort()

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
            tunnel = await dial_gateway(
                self.contexts, key.gateway, key.sni, key.cluster,
                self.connect_timeout, self.handshake_timeout,
            )  # fmt: skip
            conn = UpstreamConn(key, tunnel.generation)
            tunnel.protocol.on_lost = None
            tunnel.transport.set_protocol(conn)
            conn.connection_made(tunnel.transport)
            if not tunnel.alive:
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
        conn.exchange = None
        if not reusable or self._closed or not conn.alive:
            conn.abort()
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
