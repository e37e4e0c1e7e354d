"""One forwarding upstream: UDP with ID-matched replies on a shared socket, TCP per query,
and the failure count / health probing that lets `forward` fail over.

Replies are accepted only from the upstream's address (connected socket), with an ID we have
outstanding and the question we asked; anything else is ignored, so a spoofing or confused
peer can at most make a query time out.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct

from dns.errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout, WireError
from dns.metrics import (
    FORWARD_FAILURES,
    FORWARD_HEALTHCHECK_FAILURES,
    FORWARD_HEALTHY,
    FORWARD_REQUESTS,
    FORWARD_RESPONSES,
)
from dns.wire import TC, question_of, rcode_name

log = logging.getLogger(__name__)

MAX_PENDING = 30000  # outstanding IDs per socket; past this, guessing an ID gets too easy
PROBE = b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01"  # ". IN NS"


class _UdpChannel(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 12:
            return
        msg_id = (data[0] << 8) | data[1]
        entry = self.pending.get(msg_id)
        if entry is None:
            return
        question, fut = entry
        try:
            ok = question_of(data) == question
        except WireError:
            del self.pending[msg_id]
            if not fut.done():
                fut.set_exception(UpstreamProtocolError("unparseable reply"))
            return
        if ok:
            del self.pending[msg_id]
            if not fut.done():
                fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # On a connected socket this is ICMP "port unreachable": nobody is listening.
        self._fail_all(UpstreamError(f"upstream unreachable: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(UpstreamError("upstream socket closed"))

    def _fail_all(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        for _, fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)


class Upstream:
    def __init__(
        self,
        host: str,
        port: int,
        server: str,
        *,
        max_fails: int = 2,
        health_check: float = 0.5,
        force_tcp: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.server = server
        self.max_fails = max_fails
        self.health_check = health_check
        self.force_tcp = force_tcp
        self.fails = 0
        self.down = False
        self._channel: _UdpChannel | None = None
        self._opening: asyncio.Future[_UdpChannel] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._rng = random.SystemRandom()

    def bind_metrics(self) -> None:
        self._healthy = FORWARD_HEALTHY.labels(self.server, self.label)
        self._healthy.set(1)
        self._udp_requests = FORWARD_REQUESTS.labels(self.server, self.label, "udp")
        self._tcp_requests = FORWARD_REQUESTS.labels(self.server, self.label, "tcp")

    # -- exchanges ---------------------------------------------------------------------
    async def _udp(self) -> _UdpChannel:
        ch = self._channel
        if ch is not None and not ch.closed:
            return ch
        if self._opening is None:
            loop = asyncio.get_running_loop()
            self._opening = loop.create_future()
            try:
                _, proto = await loop.create_datagram_endpoint(
                    _UdpChannel, remote_addr=(self.host, self.port)
                )
                self._channel = proto
                self._opening.set_result(proto)
            except OSError as e:
                self._opening.set_exception(UpstreamError(f"cannot open UDP socket: {e}"))
                self._opening.exception()  # retrieved: do not warn when nobody else waits
            finally:
                opening, self._opening = self._opening, None
            return opening.result()
        return await asyncio.shield(self._opening)

    async def exchange_udp(self, query: bytes, timeout: float) -> bytes:
        ch = await self._udp()
        if len(ch.pending) >= MAX_PENDING:
            raise UpstreamError("too many outstanding queries on the UDP socket")
        msg_id = self._rng.getrandbits(16)
        while msg_id in ch.pending:
            msg_id = self._rng.getrandbits(16)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        ch.pending[msg_id] = (question_of(query), fut)
        self._udp_requests.inc()
        assert ch.transport is not None
        ch.transport.sendto(struct.pack(">H", msg_id) + query[2:])
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise UpstreamTimeout(f"no UDP reply within {timeout:.3g}s") from None
        finally:
            entry = ch.pending.get(msg_id)
            if entry is not None and entry[1] is fut:
                del ch.pending[msg_id]

    async def exchange_tcp(self, query: bytes, timeout: float) -> bytes:
        self._tcp_requests.inc()
        msg_id = self._rng.getrandbits(16)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    body = struct.pack(">H", msg_id) + query[2:]
                    writer.write(struct.pack(">H", len(body)) + body)
                    await writer.drain()
                    while True:
                        (length,) = struct.unpack(">H", await reader.readexactly(2))
                        reply = await reader.readexactly(length)
                        if len(reply) >= 12 and (reply[0] << 8 | reply[1]) == msg_id:
                            break  # anything else on this private connection is noise
                finally:
                    writer.transport.abort()
        except TimeoutError:
            raise UpstreamTimeout(f"no TCP reply within {timeout:.3g}s") from None
        except asyncio.IncompleteReadError:
            raise UpstreamProtocolError("TCP connection closed mid-reply") from None
        except OSError as e:
            raise UpstreamError(f"TCP: {e.strerror or e}") from None
        try:
            if question_of(reply) != question_of(query):
                raise UpstreamProtocolError("TCP reply for another question")
        except WireError:
            raise UpstreamProtocolError("unparseable TCP reply") from None
        return reply

    async def exchange(self, query: bytes, timeout: float, tcp: bool, prefer_udp: bool) -> bytes:
        """One attempt: UDP (retrying over TCP when truncated) or TCP; raises UpstreamError."""
        if tcp or self.force_tcp:
            reply = await self.exchange_tcp(query, timeout)
        else:
            reply = await self.exchange_udp(query, timeout)
            if reply[2] << 8 & TC and not prefer_udp:
                reply = await self.exchange_tcp(query, timeout)
                if reply[2] << 8 & TC:
                    raise UpstreamProtocolError("truncated even over TCP")
        FORWARD_RESPONSES.labels(self.server, self.label, rcode_name(reply[3] & 0x0F)).inc()
        return reply

    # -- health ------------------------------------------------------------------------
    def succeeded(self) -> None:
        self.fails = 0

    def failed(self, exc: UpstreamError) -> None:
        reason = type(exc).__name__
        FORWARD_FAILURES.labels(self.server, self.label, reason).inc()
        self.fails += 1
        log.warning(
            "dns upstream failed",
            extra={
                "server": self.server,
                "upstream": self.label,
                "fails": self.fails,
                "error": str(exc),
            },
        )
        if self.max_fails and self.fails >= self.max_fails and not self.down:
            self.down = True
            self._healthy.set(0)
            log.warning("dns upstream down", extra={"server": self.server, "upstream": self.label})
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        probes = FORWARD_HEALTHCHECK_FAILURES.labels(self.server, self.label)
        while self.down:
            await asyncio.sleep(self.health_check)
            try:
                await self.exchange(PROBE, max(self.health_check, 0.5), False, True)
            except UpstreamError:
                probes.inc()
                continue
            self.down = False
            self.fails = 0
            self._healthy.set(1)
            log.info("dns upstream up", extra={"server": self.server, "upstream": self.label})

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()
        self._channel = None
