"""Multiplexed tunnels, the I/O glue of `gateway.proto.mux`: many streams on one TLS connection.

`MuxConnection` is the asyncio Protocol of one established, verified mutual-TLS connection
between an egress (`server=False`, opens streams) and an ingress (`server=True`, accepts them).
`MuxStream` implements the asyncio Transport interface, so the code that relays or speaks
HTTP on a TCP or TLS transport (`l4.relay.ProtocolRelay`, `l7.upstream.UpstreamConn`) runs on a
stream unchanged: write, writelines, write_eof (FIN), close, abort (RESET), pause_reading and
resume_reading (flow-control credit), set_write_buffer_limits with pause_writing and
resume_writing toward the protocol.

Writes of every stream go into one list that is joined and written to the TLS transport once
per event-loop turn: the frames of many streams share TLS records and a system call. The TLS
transport's own back-pressure pauses every stream's writer.

A stream's state (flow control, half-close, close, reset, the FIN deadline after a close)
is its sans-IO `StreamMachine` (gateway/proto/mux.py); `MuxStream` only carries out what the
machine asks: frames to the connection, calls to the protocol, a timer for its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.closing import abort_transport, close_transport
from gateway.errors import StreamReset
from gateway.metrics import TUNNEL_SILENT
from gateway.proto.liveness import OpenProbe
from gateway.proto.mux import (
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    MAX_TARGET,
    FrameDecoder,
    FrameType,
    MuxConfig,
    MuxProtocolError,
    Op,
    StreamMachine,
    StreamState,
    TunnelShare,
    encode,
    parse_reset,
    parse_window,
    reset_payload,
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
_OP_DATA, _OP_FRAME, _OP_DELIVER = Op.DATA, Op.FRAME, Op.DELIVER

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
        self.share = TunnelShare()  # bytes held for streams not reading; our writes paused
        self._next_id = 1
        self._last_peer_id = 0
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self.transport: asyncio.Transport | None = None
        self.going_away = False  # GOAWAY sent or received: no new streams
        self.lost = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.idle_since = time.monotonic()
        self.last_received = self.idle_since
        self.opened = 0  # streams opened over the connection's life
        self._ping_handle: asyncio.TimerHandle | None = None
        # egress: unanswered OPENs probe the peer with a PING (gateway/proto/liveness.py)
        self._probe = None if server else OpenProbe(config.open_probe_after, config.probe_timeout)
        self._probe_handle: asyncio.TimerHandle | None = None
        self._early: list[bytes] | None = [] if server and on_open is None else None

    @property
    def buffered(self) -> int:
        """Bytes held for streams that are not reading."""
        return self.share.buffered

    @property
    def write_paused(self) -> bool:
        return self.share.write_paused

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
        self.last_received = now = time.monotonic()
        probe = self._probe
        if probe is not None and probe.ping_at is not None:
            self._probe_heard(now)
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
        self.share.write_paused = True
        for stream in list(self.streams.values()):
            stream._update_pause()

    def resume_writing(self) -> None:
        self.share.write_paused = False
        for stream in list(self.streams.values()):
            stream._update_pause()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.going_away = True
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        if self._probe_handle is not None:
            self._probe_handle.cancel()
            self._probe_handle = None
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
    def suspect(self) -> bool:
        """Egress: the peer answered neither an OPEN nor the PING after it (no new streams)."""
        return self._probe is not None and self._probe.suspect

    @property
    def usable(self) -> bool:
        """Open to new streams (egress side)."""
        return (
            not self.lost and not self.going_away and not self.suspect
            and self.transport is not None
            and not self.transport.is_closing() and self._next_id < _MAX_STREAM_ID
            and len(self.streams) < self.config.max_streams
        )  # fmt: skip

    def open(self, target: str) -> MuxStream:
        """Open a stream to `target` (an SNI); await `stream.accepted` before writing."""
        if self.server:
            raise RuntimeError("only the egress side opens streams")
        if not self.usable:
            if self.suspect and not self.lost:
                raise StreamReset("tunnel_silent", f"tunnel to {self.label} answers nothing")
            raise StreamReset("going_away", f"tunnel to {self.label} takes no new streams")
        # Checked here: the peer would take a bad OPEN for broken framing and drop every stream.
        name = target.encode("ascii")  # UnicodeEncodeError is a ValueError
        if len(name) > MAX_TARGET:
            raise ValueError(f"target of {len(name)} bytes, limit {MAX_TARGET}")
        sid = self._next_id
        self._next_id += 2
        stream = MuxStream(self, sid, target, opening=True)
        self.streams[sid] = stream
        self.opened += 1
        self._queue(encode(FrameType.OPEN, sid, name))
        probe = self._probe
        if probe is not None:
            due = probe.opened(sid, time.monotonic())
            if self._probe_handle is None:  # a pending check is due no later than this one
                self._probe_at(due)
        return stream

    def settled(self, sid: int) -> None:
        """Egress: stream `sid` got its ACCEPT or RESET (or ended): no longer a probe's cause."""
        if self._probe is not None:
            self._probe.settled(sid)

    def forget(self, stream: MuxStream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self.settled(stream.id)
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

    def _probe_at(self, when: float) -> None:
        delay = max(0.0, when - time.monotonic())
        self._probe_handle = self._loop.call_later(delay, self._probe_check)

    def _probe_check(self) -> None:
        self._probe_handle = None
        probe = self._probe
        if probe is None or self.lost:
            return
        now = time.monotonic()
        step = probe.check(now, self.last_received)
        if step.ping:
            self.send_frame(FrameType.PING, 0, os.urandom(8))
        silent = now - self.last_received
        if step.turned_suspect:
            TUNNEL_SILENT.inc()
            log.warning(
                "tunnel peer silent, opens failed fast",
                extra={"peer": self.label, "silent_s": round(silent, 1),
                       "opens_failed": len(step.fail)},
            )  # fmt: skip
        for sid in step.fail:
            stream = self.streams.get(sid)
            if stream is not None and stream.m.awaiting_accept:
                stream.reset("tunnel_silent", f"no frame from the peer for {silent:.1f}s")
        if step.wake is not None:
            self._probe_at(step.wake)

    def _probe_heard(self, now: float) -> None:
        assert self._probe is not None
        silent = self._probe.heard(now)
        if silent is not None:
            log.info("tunnel peer heard again, takes streams",
                     extra={"peer": self.label, "silent_s": round(silent, 1)})  # fmt: skip

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
    """One stream of a `MuxConnection`, with the asyncio Transport interface: glue between
    the user's protocol, the event loop and the stream's sans-IO `StreamMachine`."""

    def __init__(self, conn: MuxConnection, sid: int, target: str, opening: bool = False) -> None:
        super().__init__()
        self._conn = conn
        self.id = sid
        self.target = target
        self.m = StreamMachine(sid, conn.config, conn.share, opening, time.monotonic)
        # egress side, until ACCEPT or RESET
        self.accepted: asyncio.Future[None] | None = conn._loop.create_future() if opening else None
        self._protocol: asyncio.BaseProtocol | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<MuxStream {self.id} {self.target} {self.m.state.value} via {self._conn.label}>"

    @property
    def connection(self) -> MuxConnection:
        return self._conn

    @property
    def state(self) -> StreamState:
        return self.m.state

    @property
    def local_fin(self) -> bool:
        return self.m.local_fin

    @property
    def remote_fin(self) -> bool:
        return self.m.remote_fin

    @property
    def sent(self) -> int:
        return self.m.sent

    @property
    def received(self) -> int:
        return self.m.received

    # --- carrying out the machine's commands ------------------------------------------------

    def _run(self, commands: list[tuple]) -> None:
        conn = self._conn
        for cmd in commands:
            op = cmd[0]
            if op is _OP_DATA:
                conn.send_data(self.id, cmd[1])
            elif op is _OP_DELIVER:
                data = cmd[1]
                try:
                    self._protocol.data_received(data)  # type: ignore[union-attr]
                except Exception as exc:  # a protocol bug must not take the tunnel down
                    log.exception("stream protocol failed", extra={"stream": self.id})
                    self._run(self.m.fail("internal_error", repr(exc)))
                    return
                self._run(self.m.delivered(len(data)))
            elif op is _OP_FRAME:
                conn.send_frame(cmd[1], self.id, cmd[2])
            elif op is Op.DELIVER_EOF:
                try:
                    keep_open = self._protocol.eof_received()  # type: ignore[union-attr]
                except Exception as exc:
                    log.exception("stream protocol failed", extra={"stream": self.id})
                    self._run(self.m.fail("internal_error", repr(exc)))
                    return
                self._run(self.m.eof_delivered(bool(keep_open)))
            elif op is Op.DELIVER_LATER:
                conn._loop.call_soon(self._deliver_buffered)
            elif op is Op.PAUSE_WRITER:
                self._protocol.pause_writing()  # type: ignore[union-attr]
            elif op is Op.RESUME_WRITER:
                self._protocol.resume_writing()  # type: ignore[union-attr]
            elif op is Op.LOST:
                conn._loop.call_soon(self._protocol.connection_lost, cmd[1])  # type: ignore[union-attr]
            elif op is Op.FORGET:
                conn.forget(self)
            elif op is Op.ACCEPTED:
                conn.settled(self.id)
                fut = self.accepted
                if fut is not None and not fut.done():
                    if cmd[1] is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(cmd[1])
                        fut.exception()  # retrieved: the opener may be gone already
            elif op is Op.DEADLINE:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if cmd[1] is not None:
                    delay = max(0.0, cmd[1] - time.monotonic())
                    self._timer = conn._loop.call_later(delay, self._on_timer)

    def _deliver_buffered(self) -> None:
        while commands := self.m.deliver_next():
            self._run(commands)

    def _on_timer(self) -> None:
        self._timer = None
        self._run(self.m.timer(time.monotonic()))

    # --- Transport: protocol and extra info -----------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._run(self.m.attach())

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "mux_stream":
            return self.id
        transport = self._conn.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def is_closing(self) -> bool:
        return self.m.closing

    # --- Transport: reading ---------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self.m.read_paused and self.m.state is not StreamState.CLOSED

    def pause_reading(self) -> None:
        self.m.read_paused = True

    def resume_reading(self) -> None:
        self._run(self.m.resume_reading())

    # --- Transport: writing ---------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            data = bytes(data)
        if self.m.send_now(len(data)):  # the usual case, without a command list
            self._conn.send_data(self.id, data)  # type: ignore[arg-type]
            return
        self._run(self.m.write(data))  # type: ignore[arg-type]

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._run(self.m.write_eof())

    def get_write_buffer_size(self) -> int:
        return self.m.pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.m.low, self.m.high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._run(self.m.set_write_buffer_limits(high, low))

    # --- Transport: ending ----------------------------------------------------------------

    def close(self) -> None:
        """FIN after the buffered bytes; the protocol learns (connection_lost) once it is out."""
        self._run(self.m.close())

    def abort(self) -> None:
        self.reset("aborted")

    def reset(self, reason: str, detail: str = "") -> None:
        """End both directions now, telling the peer why."""
        self._run(self.m.reset(reason, detail))

    def accept(self) -> None:
        """Ingress side: the endpoint is connected; the egress may send."""
        self._run(self.m.accept())

    # --- frames from the connection -------------------------------------------------------

    def _on_data(self, payload: bytes) -> None:
        m = self.m
        if not m.receive_now(len(payload)):
            self._run(m.on_data(payload))
            return
        # The usual case, without a command list: straight to the protocol, then credit.
        try:
            self._protocol.data_received(payload)  # type: ignore[union-attr]
        except Exception as exc:  # a protocol bug must not take the tunnel down
            log.exception("stream protocol failed", extra={"stream": self.id})
            self._run(m.fail("internal_error", repr(exc)))
            return
        credit = m.delivered(len(payload))
        if credit:
            self._run(credit)

    def _on_fin(self) -> None:
        self._run(self.m.on_fin())

    def _on_window(self, increment: int) -> None:
        self._run(self.m.on_window(increment))

    def _on_accept(self) -> None:
        self._run(self.m.on_accept())

    def _on_reset(self, reason: str, detail: str) -> None:
        self._run(self.m.on_reset(reason, detail))

    def _update_pause(self) -> None:
        self._run(self.m.update_pause())

    def _on_connection_lost(self, exc: Exception | None) -> None:
        self._run(self.m.on_tunnel_lost(exc))
