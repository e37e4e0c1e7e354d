"""Multiplexed tunnels, the I/O shell of `gateway.proto.mux`: many streams on one TLS connection.

`MuxConnection` is the asyncio Protocol of one established, verified mutual-TLS connection
between an egress (`server=False`, opens streams) and an ingress (`server=True`, accepts them).
`MuxStream` implements the asyncio Transport interface, so the code that relays or speaks
HTTP on a TCP or TLS transport (`relay.ProtocolRelay`, `h1upstream.UpstreamConn`) runs on a
stream unchanged: write, writelines, write_eof (FIN), close, abort (RESET), pause_reading and
resume_reading (flow-control credit), set_write_buffer_limits with pause_writing and
resume_writing toward the protocol.

Writes of every stream go into one list that is joined and written to the TLS transport once
per event-loop turn: the frames of many streams share TLS records and a system call. The TLS
transport's own back-pressure pauses every stream's writer.

Close follows TCP: `close()` sends FIN after the buffered bytes (even if the peer's FIN comes
first), tells the protocol once the FIN is out (as asyncio transports do after their flush), and
forgets the stream when the peer's FIN comes (or after `fin_timeout`, with a RESET); bytes that
arrive after close are answered with RESET.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.closing import abort_transport, close_transport
from gateway.errors import StreamReset
from gateway.proto.mux import (
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    MAX_TARGET,
    FrameDecoder,
    FrameType,
    MuxProtocolError,
    RecvWindow,
    SendWindow,
    encode,
    parse_reset,
    parse_window,
    reset_payload,
    window_payload,
)

__all__ = ["MuxConfig", "MuxConnection", "MuxStream", "OpenHandler"]

log = logging.getLogger(__name__)

_OPEN, _ACCEPT, _DATA, _FIN, _RESET, _WINDOW, _PING, _PONG, _GOAWAY = (
    int(FrameType.OPEN), int(FrameType.ACCEPT), int(FrameType.DATA), int(FrameType.FIN),
    int(FrameType.RESET), int(FrameType.WINDOW), int(FrameType.PING), int(FrameType.PONG),
    int(FrameType.GOAWAY),
)  # fmt: skip
_pack = HEADER.pack
_MAX_STREAM_ID = (1 << 31) - 1
# Frames queued in one event-loop turn are written together, but never more than about this
# much at once: joining and encrypting several MiB in one go runs out of the CPU caches (bulk
# through one tunnel measured at half the speed of a plain TLS connection that way).
_FLUSH_AT = 256 << 10
_JOIN_BELOW = 16 << 10

OpenHandler = Callable[["MuxStream", str], None]

_LIVE: weakref.WeakSet[MuxConnection] = weakref.WeakSet()  # for the metrics below


class _TunnelCollector(Collector):
    """Tunnel connections and their streams, read from the live connections at scrape time
    (nothing is counted on the data path)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        conns = GaugeMetricFamily(
            "isthmus_tunnel_connections", "Multiplexed tunnel connections open now", labels=["side"]
        )
        streams = GaugeMetricFamily(
            "isthmus_tunnel_streams", "Streams open on multiplexed tunnels now", labels=["side"]
        )
        held = GaugeMetricFamily(
            "isthmus_tunnel_buffered_bytes",
            "Bytes held for tunnel streams that are not reading",
            labels=["side"],
        )
        for side in ("egress", "ingress"):
            live = [c for c in list(_LIVE) if not c.lost and c.server == (side == "ingress")]
            conns.add_metric([side], len(live))
            streams.add_metric([side], sum(len(c.streams) for c in live))
            held.add_metric([side], sum(c.buffered for c in live))
        yield from (conns, streams, held)

    def describe(self) -> list[GaugeMetricFamily]:
        return []


REGISTRY.register(_TunnelCollector())


@dataclass(frozen=True, slots=True)
class MuxConfig:
    window: int = 8 << 20  # DATA bytes in flight per stream and direction, at most
    # ... and at first: a stream's window grows from this to `window` while it reads (both
    # ends must agree on both values: the sender starts with this much credit).
    initial_window: int = 256 << 10
    max_streams: int = 4096  # open streams per connection (the ingress refuses more)
    # Bytes a connection may hold for streams that are not reading (each up to `window`): a
    # stream that would push the total past this is reset (flow_control), so a peer cannot
    # make us buffer max_streams x window.
    max_buffered: int = 256 << 20
    frame_size: int = 256 << 10  # largest DATA frame we send
    high_water: int = 1 << 20  # a stream's unsent bytes above this pause its writer
    low_water: int = 256 << 10
    tls_high_water: int = 1 << 20  # the TLS transport's buffer above this pauses every stream
    connections: int = 2  # egress: connections kept per remote gateway
    open_timeout: float = 5.0  # egress: OPEN until ACCEPT (the ingress connects the endpoint)
    ping_interval: float = 15.0  # a PING after this long without a frame from the peer
    ping_timeout: float = 10.0  # ... and the connection is dropped if nothing comes back
    idle_close: float = 60.0  # egress: a connection without streams this long is closed
    fin_timeout: float = 30.0  # a closed stream waits this long for the peer's FIN

    def __post_init__(self) -> None:
        if not 1024 <= self.window <= 1 << 30:
            raise ValueError("window must be 1 KiB - 1 GiB")
        if self.initial_window < 1024:
            raise ValueError("initial_window must be >= 1 KiB")
        if not 1024 <= self.frame_size <= DEFAULT_MAX_PAYLOAD:
            raise ValueError(f"frame_size must be 1 KiB - {DEFAULT_MAX_PAYLOAD}")
        if not 0 <= self.low_water <= self.high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        if self.max_streams < 1 or self.connections < 1:
            raise ValueError("max_streams and connections must be >= 1")
        if self.max_buffered < self.window:
            raise ValueError("max_buffered must be >= window")
        timeouts = (self.open_timeout, self.ping_interval, self.ping_timeout, self.idle_close,
                    self.fin_timeout)  # fmt: skip
        if min(timeouts) <= 0:
            raise ValueError("timeouts must be > 0")


class MuxConnection(asyncio.Protocol):
    """Both ends of a multiplexed tunnel; `server` is the ingress side."""

    def __init__(
        self,
        config: MuxConfig,
        *,
        server: bool,
        on_open: OpenHandler | None = None,
        generation: int = 0,
        label: str = "",
    ) -> None:
        self.config = config
        self.server = server
        self.generation = generation  # the credentials generation it was made with
        self.label = label  # for logs: the peer gateway or address
        self._on_open = on_open
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(DEFAULT_MAX_PAYLOAD)
        self.streams: dict[int, MuxStream] = {}
        self.buffered = 0  # bytes held for streams that are not reading
        self._next_id = 1
        self._last_peer_id = 0
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.going_away = False  # GOAWAY sent or received: no new streams
        self.lost = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.idle_since = time.monotonic()
        self.last_received = self.idle_since
        self.opened = 0  # streams opened over the connection's life
        self._ping_handle: asyncio.TimerHandle | None = None
        self._early: list[bytes] | None = [] if server and on_open is None else None

    def set_open_handler(self, on_open: OpenHandler) -> None:
        """Ingress: serve streams from now on (bytes that came before wait until here)."""
        self._on_open = on_open
        early, self._early = self._early, None
        if early:
            self.data_received(b"".join(early))

    # --- asyncio Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _LIVE.add(self)
        high = self.config.tls_high_water
        self.transport.set_write_buffer_limits(high=high, low=high // 4)  # type: ignore[union-attr]
        self._ping_handle = self._loop.call_later(self.config.ping_interval, self._keepalive)

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        if self._early is not None:  # the peer is not verified yet
            self._early.append(data)
            if sum(map(len, self._early)) > 1 << 20:
                self.abort()
            return
        try:
            frames = self._decoder.feed(data)
            for kind, sid, payload in frames:
                if kind == _DATA:
                    stream = self.streams.get(sid)
                    if stream is not None:
                        stream._on_data(payload)
                    else:
                        self._unknown_stream(sid)
                else:
                    self._control(kind, sid, payload)
        except MuxProtocolError as err:
            log.warning("tunnel protocol error", extra={"peer": self.label, "error": str(err)})
            self.abort()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream._update_pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream._update_pause()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.going_away = True
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        self._out.clear()
        self._out_size = 0
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            stream._on_connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- frames in ------------------------------------------------------------------------

    def _control(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == _WINDOW:
            stream = self.streams.get(sid)
            if stream is not None:
                stream._on_window(parse_window(payload))
        elif kind == _FIN:
            stream = self.streams.get(sid)
            if stream is not None:
                stream._on_fin()
        elif kind == _RESET:
            stream = self.streams.get(sid)
            if stream is not None:
                stream._on_reset(*parse_reset(payload))
        elif kind == _OPEN:
            self._on_open_frame(sid, payload)
        elif kind == _ACCEPT:
            if self.server:
                raise MuxProtocolError("ACCEPT sent to the ingress side")
            stream = self.streams.get(sid)
            if stream is not None:
                stream._on_accept()
        elif kind == _PING:
            self._queue(encode(FrameType.PONG, 0, payload))
        elif kind == _PONG:
            pass  # any frame counts as a sign of life (last_received)
        elif kind == _GOAWAY:
            self.going_away = True
            log.info(
                "tunnel going away",
                extra={"peer": self.label, "reason": payload.decode("utf-8", "replace")},
            )
            self._maybe_close_idle()

    def _on_open_frame(self, sid: int, payload: bytes) -> None:
        if not self.server:
            raise MuxProtocolError("OPEN sent to the egress side")
        if sid % 2 == 0 or sid <= self._last_peer_id:
            raise MuxProtocolError(f"stream id {sid} is not odd and increasing")
        self._last_peer_id = sid
        if self.going_away:
            self.send_reset(sid, "going_away", "the gateway is shutting down")
            return
        if len(self.streams) >= self.config.max_streams:
            self.send_reset(sid, "too_many_streams", f"limit {self.config.max_streams}")
            return
        try:
            target = payload.decode("ascii")
        except UnicodeDecodeError:
            self.send_reset(sid, "unknown_sni", "the target is not ASCII")
            return
        stream = MuxStream(self, sid, target)
        self.streams[sid] = stream
        self.opened += 1
        if self._on_open is None:
            stream.reset("refused", "this side accepts no streams")
            return
        self._on_open(stream, target)

    def _unknown_stream(self, sid: int) -> None:
        # Bytes for a stream we already forgot (closed or reset here): tell the sender to stop.
        if sid <= _MAX_STREAM_ID:
            self.send_reset(sid, "closed", "no such stream")

    # --- frames out -------------------------------------------------------------------------

    def _queue(self, frame: bytes) -> None:
        self._out.append(frame)
        self._out_size += len(frame)
        if self._out_size >= _FLUSH_AT:
            self._flush()  # bulk: write while the bytes are still in the CPU cache
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        self._out = []
        size, self._out_size = self._out_size, 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if len(out) == 1 or size < _JOIN_BELOW:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            return
        # Bulk: small frames are joined (they share TLS records), big payloads go as they are
        # (a copy of each would cost more than the record their header then takes alone).
        parts: list[bytes] = []
        small: list[bytes] = []
        for item in out:
            if len(item) < _JOIN_BELOW:
                small.append(item)
                continue
            if small:
                parts.append(small[0] if len(small) == 1 else b"".join(small))
                small = []
            parts.append(item)
        if small:
            parts.append(small[0] if len(small) == 1 else b"".join(small))
        transport.writelines(parts)

    def send_data(self, sid: int, data: bytes) -> None:
        size = self.config.frame_size
        if len(data) <= size:
            if len(data) <= 16384:
                self._queue(_pack(_DATA, sid, len(data)) + data)
            else:  # joined once with the rest of the turn's frames, not here too
                self._queue(_pack(_DATA, sid, len(data)))
                self._queue(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), size):
            chunk = view[start : start + size]
            self._queue(_pack(_DATA, sid, len(chunk)))
            self._queue(bytes(chunk))

    def send_frame(self, kind: FrameType, sid: int, payload: bytes = b"") -> None:
        self._queue(encode(kind, sid, payload))

    def send_reset(self, sid: int, reason: str, detail: str = "") -> None:
        self._queue(encode(FrameType.RESET, sid, reset_payload(reason, detail)))

    # --- streams ----------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open to new streams (egress side)."""
        return (
            not self.lost and not self.going_away and self.transport is not None
            and not self.transport.is_closing() and self._next_id < _MAX_STREAM_ID
            and len(self.streams) < self.config.max_streams
        )  # fmt: skip

    def open(self, target: str) -> MuxStream:
        """Open a stream to `target` (an SNI); await `stream.accepted` before writing."""
        if self.server:
            raise RuntimeError("only the egress side opens streams")
        if not self.usable:
            raise StreamReset("going_away", f"tunnel to {self.label} takes no new streams")
        # Checked here: the peer would take a bad OPEN for broken framing and drop every stream.
        name = target.encode("ascii")  # UnicodeEncodeError is a ValueError
        if len(name) > MAX_TARGET:
            raise ValueError(f"target of {len(name)} bytes, limit {MAX_TARGET}")
        sid = self._next_id
        self._next_id += 2
        stream = MuxStream(self, sid, target)
        stream.accepted = self._loop.create_future()
        self.streams[sid] = stream
        self.opened += 1
        self._queue(encode(FrameType.OPEN, sid, name))
        return stream

    def forget(self, stream: MuxStream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            if not self.streams:
                self.idle_since = time.monotonic()
                self._maybe_close_idle()

    def _maybe_close_idle(self) -> None:
        if self.going_away and not self.streams and self.transport is not None:
            self._flush()
            close_transport(self.transport)  # once: the peer may have closed it already

    # --- whole connection -------------------------------------------------------------------

    def goaway(self, reason: str = "draining") -> None:
        """No new streams; the connection closes once the open ones are done."""
        if self.going_away or self.lost:
            return
        self.going_away = True
        self.send_frame(FrameType.GOAWAY, 0, reset_payload(reason))
        self._maybe_close_idle()

    def close(self) -> None:
        self.goaway("closing")
        self._flush()
        if self.transport is not None:
            close_transport(self.transport)

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            abort_transport(self.transport)

    def _keepalive(self) -> None:
        self._ping_handle = None
        if self.lost:
            return
        cfg = self.config
        quiet = time.monotonic() - self.last_received
        if quiet > cfg.ping_interval + cfg.ping_timeout:
            log.warning(
                "tunnel peer silent, closing",
                extra={"peer": self.label, "silent_s": round(quiet, 1)},
            )
            self.abort()
            return
        if quiet >= cfg.ping_interval:
            self.send_frame(FrameType.PING, 0, os.urandom(8))
            delay = cfg.ping_timeout
        else:
            delay = cfg.ping_interval - quiet
        self._ping_handle = self._loop.call_later(max(delay, 0.05), self._keepalive)


class MuxStream(asyncio.Transport):
    """One stream of a `MuxConnection`, with the asyncio Transport interface."""

    def __init__(self, conn: MuxConnection, sid: int, target: str) -> None:
        super().__init__()
        self._conn = conn
        self.id = sid
        self.target = target
        self.accepted: asyncio.Future[None] | None = None  # egress side, until ACCEPT or RESET
        cfg = conn.config
        first = min(cfg.initial_window, cfg.window)
        self._send = SendWindow(first)
        self._recv = RecvWindow(first, cfg.window)
        self._protocol: asyncio.BaseProtocol | None = None
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_size = 0
        self._high = cfg.high_water
        self._low = cfg.low_water
        self._writer_paused = False
        self._read_paused = False
        self._rbuf: collections.deque[bytes] = collections.deque()
        self._rbuf_size = 0
        self._rfin = False  # FIN arrived behind buffered bytes
        self._deliver_scheduled = False
        self.local_fin = False  # FIN queued (after the pending bytes)
        self._fin_sent = False
        self.remote_fin = False
        self._closing = False
        self._done = False  # forgotten by the connection
        self._notified = False  # protocol.connection_lost called
        self._lost_exc: Exception | None = None
        self._fin_timer: asyncio.TimerHandle | None = None
        self.sent = 0
        self.received = 0

    def __repr__(self) -> str:
        return f"<MuxStream {self.id} {self.target} via {self._conn.label}>"

    @property
    def connection(self) -> MuxConnection:
        return self._conn

    # --- Transport: protocol and extra info -----------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        if self._done or (self._closing and self._fin_sent):
            # Reset, lost or closed before anyone listened: say so now, or the new protocol
            # (e.g. a relay) waits for an end that already happened.
            self._notify(self._lost_exc)
        elif self._rbuf or self._rfin:
            self._schedule_delivery()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "mux_stream":
            return self.id
        transport = self._conn.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def is_closing(self) -> bool:
        return self._closing or self._done

    # --- Transport: reading ---------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._read_paused and not self._done

    def pause_reading(self) -> None:
        self._read_paused = True

    def resume_reading(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        if self._rbuf or self._rfin:
            self._schedule_delivery()
        elif self._recv.consumed and not self._done:
            self._conn.send_frame(FrameType.WINDOW, self.id, window_payload(self._recv.release()))

    def _schedule_delivery(self) -> None:
        if not self._deliver_scheduled:
            self._deliver_scheduled = True
            self._conn._loop.call_soon(self._deliver_buffered)

    def _deliver_buffered(self) -> None:
        self._deliver_scheduled = False
        while self._rbuf and self._can_deliver():
            data = self._rbuf.popleft()
            self._rbuf_size -= len(data)
            self._conn.buffered -= len(data)
            self._deliver(data)
        if not self._rbuf and self._rfin and self._can_deliver():
            self._rfin = False
            self._deliver_eof()
        if not self._read_paused and self._recv.consumed and not self._done:
            self._conn.send_frame(FrameType.WINDOW, self.id, window_payload(self._recv.release()))

    def _can_deliver(self) -> bool:
        return self._protocol is not None and not self._read_paused and not self._done

    def _on_data(self, payload: bytes) -> None:
        if self._closing:  # TCP: bytes after close are answered with a reset
            self._conn.send_reset(self.id, "closed", "the stream was closed")
            self._finish()
            # Told already if our FIN went out; if bytes still waited for window, they are lost.
            self._notify(StreamReset("closed", "bytes arrived after close"))
            return
        n = len(payload)
        try:
            self._recv.receive(n)
        except MuxProtocolError as err:
            self._fail("flow_control", str(err))
            return
        self.received += n
        if self._rbuf or self._protocol is None or self._read_paused:
            conn = self._conn
            if conn.buffered + n > conn.config.max_buffered:
                self._fail("flow_control", "the tunnel's receive buffers are full")
                return
            self._rbuf.append(payload)
            self._rbuf_size += n
            conn.buffered += n
        else:
            self._deliver(payload)

    def _deliver(self, payload: bytes) -> None:
        try:
            self._protocol.data_received(payload)  # type: ignore[union-attr]
        except Exception as exc:  # a protocol bug must not take the tunnel down
            log.exception("stream protocol failed", extra={"stream": self.id})
            self._fail("internal_error", repr(exc))
            return
        # Credit for bytes handed on, even if the protocol paused while taking them: they left
        # our buffers, and what comes next waits in `_rbuf`, which the window bounds. Holding
        # the credit as well left the sender idle for a pause's length each time (bulk: 707
        # credit stalls per GiB, 0.77x HAProxy).
        conn = self._conn
        inc = self._recv.consume(len(payload), grow=conn.buffered < conn.config.max_buffered // 2)
        if inc and not self._done:
            self._conn.send_frame(FrameType.WINDOW, self.id, window_payload(inc))

    def _on_fin(self) -> None:
        self.remote_fin = True
        if self._closing:
            if self._fin_sent:  # else our FIN waits behind buffered bytes; sending it finishes
                self._finish()
            return
        if self._rbuf or not self._can_deliver():
            self._rfin = True
            return
        self._deliver_eof()

    def _deliver_eof(self) -> None:
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[union-attr]
        except Exception as exc:
            log.exception("stream protocol failed", extra={"stream": self.id})
            self._fail("internal_error", repr(exc))
            return
        if not keep_open:
            self.close()

    # --- Transport: writing ---------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.local_fin or self._done:
            return  # asyncio transports drop (and warn about) writes after close as well
        if type(data) is not bytes:
            data = bytes(data)
        n = len(data)
        if not n:
            return
        self.sent += n
        if not self._pending:
            take = self._send.take(n)
            if take == n:
                self._conn.send_data(self.id, data)  # type: ignore[arg-type]
                return
            if take:
                self._conn.send_data(self.id, data[:take])  # type: ignore[arg-type]
                data = data[take:]
        self._pending.append(data)  # type: ignore[arg-type]
        self._pending_size += len(data)
        self._update_pause()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.local_fin or self._done:
            return
        self.local_fin = True
        if not self._pending:
            self._send_fin()

    def _send_fin(self) -> None:
        self._fin_sent = True
        self._conn.send_frame(FrameType.FIN, self.id)
        if self._closing:
            self._after_close()

    def _on_window(self, increment: int) -> None:
        self._send.grant(increment)
        pending = self._pending
        while pending and self._send.credit:
            chunk = pending[0]
            take = self._send.take(len(chunk))
            if take == len(chunk):
                pending.popleft()
            else:
                pending[0] = chunk[take:]
                chunk = chunk[:take]
            self._pending_size -= take
            self._conn.send_data(self.id, chunk)
        if not pending and self.local_fin and not self._fin_sent:
            self._send_fin()
        self._update_pause()

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._update_pause()

    def _update_pause(self) -> None:
        protocol = self._protocol
        if protocol is None or self._done:
            return
        if self._pending_size > self._high or self._conn.write_paused:
            if not self._writer_paused:
                self._writer_paused = True
                protocol.pause_writing()
        elif self._writer_paused and self._pending_size <= self._low:
            self._writer_paused = False
            protocol.resume_writing()

    # --- Transport: ending ----------------------------------------------------------------

    def close(self) -> None:
        """FIN after the buffered bytes; the protocol learns (connection_lost) once it is out."""
        if self._closing or self._done:
            return
        self._closing = True
        self._drop_rbuf()
        self._rfin = False
        if not self.local_fin:
            self.write_eof()
        elif self._fin_sent:
            self._after_close()
        if self.accepted is not None and not self.accepted.done():
            self.accepted.set_exception(StreamReset("closed", "closed before it was accepted"))
            self.accepted.exception()

    def _after_close(self) -> None:
        self._notify(None)
        if self.remote_fin:
            self._finish()
        else:
            self._fin_timer = self._conn._loop.call_later(
                self._conn.config.fin_timeout, self._fin_timed_out
            )

    def _fin_timed_out(self) -> None:
        self._fin_timer = None
        if not self._done:
            self._conn.send_reset(self.id, "fin_timeout", "no FIN after close")
            self._finish()

    def abort(self) -> None:
        self.reset("aborted")

    def reset(self, reason: str, detail: str = "") -> None:
        """End both directions now, telling the peer why."""
        if self._done:
            return
        self._conn.send_reset(self.id, reason, detail)
        self._closing = True
        self._finish()
        if self.accepted is not None and not self.accepted.done():
            self.accepted.set_exception(StreamReset(reason, detail))
            self.accepted.exception()
        self._notify(None)

    def accept(self) -> None:
        """Ingress side: the endpoint is connected; the egress may send."""
        self._conn.send_frame(FrameType.ACCEPT, self.id)

    def _on_accept(self) -> None:
        if self.accepted is not None and not self.accepted.done():
            self.accepted.set_result(None)

    def _on_reset(self, reason: str, detail: str) -> None:
        self._finish()
        exc = StreamReset(reason, detail)
        if self.accepted is not None and not self.accepted.done():
            self.accepted.set_exception(exc)
            self.accepted.exception()
        self._notify(exc)

    def _fail(self, reason: str, detail: str) -> None:
        self._conn.send_reset(self.id, reason, detail)
        self._finish()
        self._notify(StreamReset(reason, detail))

    def _on_connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._drop_rbuf()
        self._cancel_timer()
        err = StreamReset("tunnel_lost", repr(exc) if exc else "the tunnel closed")
        if self.accepted is not None and not self.accepted.done():
            self.accepted.set_exception(err)
            self.accepted.exception()
        self._notify(err)

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._cancel_timer()
        self._drop_rbuf()
        self._pending.clear()
        self._pending_size = 0
        self._conn.forget(self)

    def _drop_rbuf(self) -> None:
        self._rbuf.clear()
        self._conn.buffered -= self._rbuf_size
        self._rbuf_size = 0

    def _cancel_timer(self) -> None:
        if self._fin_timer is not None:
            self._fin_timer.cancel()
            self._fin_timer = None

    def _notify(self, exc: Exception | None) -> None:
        """Tell the protocol the stream is over, once; a stream that ends before it has a
        protocol tells the one `set_protocol` attaches later."""
        if self._notified:
            return
        self._lost_exc = exc
        protocol = self._protocol
        if protocol is not None:
            self._notified = True
            self._conn._loop.call_soon(protocol.connection_lost, exc)
