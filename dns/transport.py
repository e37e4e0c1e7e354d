"""The asyncio shell: UDP and TCP listeners on one port, and the writers replies go through.

All protocol decisions are made elsewhere (dns.wire, dns.fastpath, the plugins); this module
only moves bytes, enforces the transport limits (UDP size and TC, TCP framing, idle timeouts,
connection caps in all and per source, pipelining caps, write backpressure) and never lets an
exception escape a callback.

UDP sockets are read directly (loop.add_reader) rather than through a datagram transport:
each readiness event drains up to UDP_BATCH queued datagrams, and each is answered by the
fast path when it can be (a stored answer: no Request, no chain) and by the Mux otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from discovery.addresses import source_of
from dns.errors import DnsError
from dns.fastpath import FastPath
from dns.metrics import MALFORMED, TCP_REFUSED
from dns.plugin import CLIENT_ERRORS, Handler, write_error
from dns.wire import REFUSED, SERVFAIL, QueryError, Request, parse_query, truncate

log = logging.getLogger(__name__)

TCP_IDLE_TIMEOUT = 10.0  # RFC 7766 suggests seconds, not minutes, for idle connections
TCP_MAX_CONNECTIONS = 1000
# One client (a stub resolver, or a host's forwarder) needs a few; a VM's local applications
# all come from one address, so this is also their total there.
TCP_MAX_CONNECTIONS_PER_SOURCE = 64
TCP_REFUSAL_LOG_INTERVAL = 10.0  # at most one refusal line per reason per this many seconds
TCP_MAX_PIPELINE = 64  # queries in flight per connection before we stop reading
TCP_MAX_WRITE_BUFFER = 1 << 20
UDP_BATCH = 256  # datagrams handled per readiness event before other callbacks get a turn
UDP_RECV_BUFFER = 65535  # the largest datagram; longer ones would be cut (and then FORMERR)


class ListenError(DnsError):
    pass


@dataclass(frozen=True, slots=True)
class TcpLimits:
    """Open TCP connections a listener keeps: in all, and from one source (an IPv4 address or
    an IPv6 /64). Over either, a connection is closed at accept, before a byte is read."""

    max_connections: int = TCP_MAX_CONNECTIONS
    max_connections_per_source: int = TCP_MAX_CONNECTIONS_PER_SOURCE

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_source < 1:
            raise ValueError(f"TCP connection limits must be at least 1: {self}")


class Mux:
    """Routes a query to the server block with the longest matching zone."""

    def __init__(self, zones: dict[bytes, Handler], server: str) -> None:
        self.zones = zones
        self.server = server
        self.root = zones.get(b"\x00")
        self.fast = FastPath(zones)
        self.malformed = {p: MALFORMED.labels(server, p) for p in ("udp", "tcp")}

    def serve(self, req: Request, w: UdpWriter | TcpWriter) -> None:
        q = req.qlower
        zones = self.zones
        handler = None
        for off in req.labels:
            handler = zones.get(q[off:])
            if handler is not None:
                req.zone = q[off:]
                break
        else:
            handler = self.root
        req.server = self.server
        if handler is None:
            write_error(req, w, REFUSED)
            return
        try:
            rc = handler.serve(req, w)
        except Exception:  # a plugin bug must cost one query, never the server
            log.exception(
                "dns plugin chain failed", extra={"server": self.server, "qname": req.name}
            )
            rc = SERVFAIL
        if rc in CLIENT_ERRORS:
            write_error(req, w, rc)

    def datagram(self, data: bytes, addr: tuple[str, int], sendto: SendTo) -> None:
        """Answer one datagram through `sendto(reply, addr)`; sans-IO apart from that call."""
        try:
            req = parse_query(data, "udp", addr)
        except QueryError as e:
            self.malformed["udp"].inc()
            if e.reply is not None:
                sendto(e.reply, addr)
            return
        self.serve(req, UdpWriter(sendto, addr, req))


SendTo = Callable[[bytes, Any], None]


class UdpWriter:
    __slots__ = ("addr", "req", "sendto")

    def __init__(self, sendto: SendTo, addr: object, req: Request) -> None:
        self.sendto = sendto
        self.addr = addr
        self.req = req

    def write(self, reply: bytes) -> None:
        if len(reply) > self.req.max_size:
            reply = truncate(reply, self.req)
        # A closed asyncio/uvloop transport drops the datagram (a late forward reply).
        self.sendto(reply, self.addr)


class UdpServer:
    """One bound non-blocking UDP socket, read on readiness until it is empty (or UDP_BATCH).

    Replies are sent at once with sendto; one the kernel will not take right now (socket
    buffer full: EAGAIN) is dropped, as a DNS server over UDP does, and the client retries.
    """

    def __init__(self, mux: Mux, sock: socket.socket) -> None:
        self.mux = mux
        self.sock = sock
        self._buf = bytearray(UDP_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        """Stop reading (the caller closes the socket; late forward replies are dropped)."""
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self._loop = None

    def sendto(self, reply: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(reply, addr)
        except OSError as e:  # EAGAIN (dropped), a closed socket (late reply), ICMP errors
            log.debug("dns udp send failed", extra={"client": str(addr), "error": str(e)})

    def _readable(self) -> None:
        recv = self.sock.recvfrom_into
        send = self.sock.sendto
        buf, view = self._buf, self._view
        fast = self.mux.fast.answer if self.mux.fast.enabled else None
        for _ in range(UDP_BATCH):
            try:
                n, addr = recv(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. a pending ICMP error; the socket itself is fine
                log.debug("dns udp receive failed", extra={"error": str(e)})
                continue
            data = bytes(view[:n])
            try:
                reply = fast(data) if fast is not None else None
                if reply is None:
                    self.mux.datagram(data, addr, self.sendto)
                else:
                    send(reply, addr)
            except OSError as e:
                log.debug("dns udp send failed", extra={"client": str(addr), "error": str(e)})
            except Exception:  # never let one datagram take the listener down
                log.exception("dns udp datagram failed", extra={"client": str(addr)})


class TcpWriter:
    __slots__ = ("conn", "req")

    def __init__(self, conn: TcpConnection, req: Request) -> None:
        self.conn = conn
        self.req = req

    def write(self, reply: bytes) -> None:
        self.conn.reply(reply)


class TcpConnection:
    """One client connection: length-prefixed queries, answered in whatever order they finish."""

    def __init__(self, mux: Mux, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.mux = mux
        self.reader = reader
        self.writer = writer
        self.inflight = 0
        self.drained = asyncio.Event()
        self.drained.set()
        peer = writer.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if isinstance(peer, tuple) else None

    def reply(self, data: bytes) -> None:
        self.inflight -= 1
        if self.inflight < TCP_MAX_PIPELINE:
            self.drained.set()
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > TCP_MAX_WRITE_BUFFER:
            transport.abort()  # the client does not read its answers: cut it off
            return
        self.writer.write(struct.pack(">H", len(data)) + data)

    async def run(self) -> None:
        while True:
            head = await asyncio.wait_for(self.reader.readexactly(2), TCP_IDLE_TIMEOUT)
            (length,) = struct.unpack(">H", head)
            data = await asyncio.wait_for(self.reader.readexactly(length), TCP_IDLE_TIMEOUT)
            try:
                req = parse_query(data, "tcp", self.peer)
            except QueryError as e:
                self.mux.malformed["tcp"].inc()
                if e.reply is None:
                    return  # not a query: the stream cannot be trusted any more
                self.inflight += 1
                self.reply(e.reply)
                continue
            self.inflight += 1
            self.mux.serve(req, TcpWriter(self, req))
            if self.inflight >= TCP_MAX_PIPELINE:
                self.drained.clear()
                await asyncio.wait_for(self.drained.wait(), TCP_IDLE_TIMEOUT)


class TcpServer:
    def __init__(self, mux: Mux, limits: TcpLimits | None = None) -> None:
        self.mux = mux
        self.limits = limits or TcpLimits()
        self.connections: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self._by_source: dict[str, int] = {}
        self._refused = {r: TCP_REFUSED.labels(mux.server, r) for r in ("source", "total")}
        self._refusals: dict[str, tuple[float, int]] = {}  # reason -> (last logged, since then)

    def held_by(self, host: str) -> int:
        return self._by_source.get(source_of(host), 0)

    def _admit(self, writer: asyncio.StreamWriter) -> str | None:
        """The source to count the connection against, or None when it was refused."""
        peer = writer.get_extra_info("peername")
        source = source_of(str(peer[0])) if isinstance(peer, tuple) else ""
        if len(self.connections) >= self.limits.max_connections:
            reason = "total"
        elif self._by_source.get(source, 0) >= self.limits.max_connections_per_source:
            reason = "source"
        else:
            self._by_source[source] = self._by_source.get(source, 0) + 1
            return source
        writer.transport.abort()
        self._refused[reason].inc()
        self._log_refusal(reason, source)
        return None

    def _log_refusal(self, reason: str, source: str) -> None:
        # A flood of refusals costs a line per interval, not a line each; the counter has all.
        now = time.monotonic()
        last, count = self._refusals.get(reason, (-TCP_REFUSAL_LOG_INTERVAL, 0))
        if now - last < TCP_REFUSAL_LOG_INTERVAL:
            self._refusals[reason] = (last, count + 1)
            return
        self._refusals[reason] = (now, 0)
        log.warning(
            "dns tcp connection refused",
            extra={
                "server": self.mux.server,
                "reason": reason,
                "source": source,
                "refused_since_last_line": count,
                "max_connections": self.limits.max_connections,
                "max_connections_per_source": self.limits.max_connections_per_source,
            },
        )

    def _release(self, source: str) -> None:
        held = self._by_source.get(source, 0) - 1
        if held > 0:
            self._by_source[source] = held
        else:
            self._by_source.pop(source, None)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = self._admit(writer)
        if source is None:
            return
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        conn = TcpConnection(self.mux, reader, writer)
        try:
            await conn.run()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("dns tcp connection failed", extra={"client": str(conn.peer)})
        finally:
            self.connections.discard(task)
            self._release(source)
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.gather(*self.connections, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


def make_socket(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    """A bound, reusable (SO_REUSEPORT: several workers share it) non-blocking socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("::", "::0"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
        sock.bind((host, port))
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock
