"""The tunnel's multiplexing protocol, sans-IO: frames, their decoder, and stream windows.

One mutual-TLS connection from an egress to a remote ingress carries many streams (the
reserved SNI `tunnel.<cluster>.<trust_domain>`), so a new client connection or HTTP keep-alive
stream to a remote service costs a frame instead of a TCP and TLS handshake, and the frames of
many streams share one TLS record and one system call per event-loop turn.

Every frame is a 9-byte header, then `length` payload bytes:

    type: u8 | stream: u32 | length: u32        (network byte order)

| type   | sent by | payload                     | meaning                                   |
|--------|---------|-----------------------------|-------------------------------------------|
| OPEN   | egress  | target SNI (ASCII)          | open stream `stream` to that service port |
| ACCEPT | ingress | empty                       | the ingress reached an endpoint           |
| DATA   | both    | bytes                       | stream bytes (counted against the window) |
| FIN    | both    | empty                       | no more bytes this way (half-close)       |
| RESET  | both    | `<reason>: <detail>` (UTF-8) | the stream is over, both ways             |
| WINDOW | both    | u32 increment               | the sender may send that many more bytes  |
| PING   | both    | 8 bytes                     | answered by PONG with the same payload    |
| PONG   | both    | 8 bytes                     |                                           |
| GOAWAY | both    | reason (UTF-8)              | no new streams on this connection         |

Streams are opened by the egress only, with odd, increasing ids. Flow control is per stream:
each side may have at most `window` unacknowledged DATA bytes in flight per stream, and the
receiver grants more (WINDOW) as it hands bytes on. The whole connection's buffering is so
bounded by streams x window, and a slow stream never blocks a fast one.
"""

from __future__ import annotations

import collections
import enum
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import ProtocolError, StreamReset

__all__ = [
    "HEADER",
    "MAX_REASON",
    "MAX_TARGET",
    "FrameDecoder",
    "FrameType",
    "MuxConfig",
    "MuxProtocolError",
    "Op",
    "RecvWindow",
    "SendWindow",
    "StreamMachine",
    "StreamState",
    "TunnelShare",
    "encode",
    "parse_reset",
    "reset_payload",
]

HEADER = struct.Struct("!BII")
MAX_TARGET = 253  # an SNI
MAX_REASON = 512
DEFAULT_MAX_PAYLOAD = 1 << 20


class FrameType(enum.IntEnum):
    OPEN = 1
    ACCEPT = 2
    DATA = 3
    FIN = 4
    RESET = 5
    WINDOW = 6
    PING = 7
    PONG = 8
    GOAWAY = 9


_FIXED_SIZE = {
    FrameType.ACCEPT: 0,
    FrameType.FIN: 0,
    FrameType.WINDOW: 4,
    FrameType.PING: 8,
    FrameType.PONG: 8,
}
_MAX_SIZE = {FrameType.OPEN: MAX_TARGET, FrameType.RESET: MAX_REASON, FrameType.GOAWAY: MAX_REASON}
_WINDOW = struct.Struct("!I")
_TYPES = frozenset(int(t) for t in FrameType)
_DATA = int(FrameType.DATA)


class MuxProtocolError(ProtocolError):
    """The peer broke the framing: the whole connection is unusable."""


def encode(kind: FrameType, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, len(payload)) + payload


def window_payload(increment: int) -> bytes:
    return _WINDOW.pack(increment)


def parse_window(payload: bytes) -> int:
    return int(_WINDOW.unpack(payload)[0])


def reset_payload(reason: str, detail: str = "") -> bytes:
    text = f"{reason}: {detail}" if detail else reason
    return text.encode("utf-8", "replace")[:MAX_REASON]


def parse_reset(payload: bytes) -> tuple[str, str]:
    """(reason, detail) of a RESET payload; tolerant of anything the peer sent."""
    text = payload.decode("utf-8", "replace")
    reason, _, detail = text.partition(": ")
    return reason or "reset", detail


class FrameDecoder:
    """Cuts a byte stream into frames; raises MuxProtocolError on framing the peer broke.

    `feed` returns (type, stream, payload) triples. Header fields are checked before any of
    the payload is taken, so a bad length never makes us wait for (or hold) its bytes.

    DATA payloads are not reassembled: the bytes of a DATA frame that a chunk holds come out
    at once as a DATA triple of their own (a frame split over three chunks gives three), since
    a stream is a byte stream. Bulk bytes are so sliced out of the chunk at most once, and not
    at all when a chunk is all payload. Control frames come out whole."""

    __slots__ = ("_ctl", "_hdr", "_kind", "_left", "_sid", "max_payload")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._hdr = b""  # the start of a header that the next chunk completes
        self._kind = 0  # the frame whose payload is being read
        self._sid = 0
        self._left = 0  # its payload bytes still to come
        self._ctl: list[bytes] | None = None  # a control frame's payload so far

    @property
    def buffered(self) -> int:
        """Bytes held back until more arrive (a partial header or control payload)."""
        return len(self._hdr) + (sum(map(len, self._ctl)) if self._ctl else 0)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        frames: list[tuple[int, int, bytes]] = []
        pos = 0
        end = len(data)
        if self._hdr:
            need = HEADER.size - len(self._hdr)
            if end < need:
                self._hdr += data
                return frames
            header = self._hdr + data[:need]
            self._hdr = b""
            self._begin(header, 0, frames)
            pos = need
        while pos < end:
            left = self._left
            if left:
                n = min(left, end - pos)
                piece = data if n == end else data[pos : pos + n]
                pos += n
                self._left = left - n
                ctl = self._ctl
                if ctl is None:
                    frames.append((_DATA, self._sid, piece))
                else:
                    ctl.append(piece)
                    if not self._left:
                        frames.append((self._kind, self._sid, b"".join(ctl)))
                        self._ctl = None
            elif end - pos < HEADER.size:
                self._hdr = data[pos:]
                break
            else:
                self._begin(data, pos, frames)
                pos += HEADER.size
        return frames

    def _begin(self, buf: bytes, pos: int, frames: list[tuple[int, int, bytes]]) -> None:
        kind, stream, length = HEADER.unpack_from(buf, pos)
        if kind != _DATA or not stream or length > self.max_payload:
            self._check(kind, stream, length)
        if not length:
            frames.append((kind, stream, b""))
            return
        self._kind = kind
        self._sid = stream
        self._left = length
        self._ctl = None if kind == _DATA else []

    def _check(self, code: int, stream: int, length: int) -> None:
        if code not in _TYPES:
            raise MuxProtocolError(f"unknown frame type {code}")
        kind = FrameType(code)
        fixed = _FIXED_SIZE.get(kind)
        if fixed is not None and length != fixed:
            raise MuxProtocolError(f"{kind.name} frame of {length} bytes, expected {fixed}")
        # max_payload bounds every frame we hold, control frames too (it may be under their cap).
        limit = min(_MAX_SIZE.get(kind, self.max_payload), self.max_payload)
        if length > limit:
            raise MuxProtocolError(f"{kind.name} frame of {length} bytes, limit {limit}")
        conn_level = kind in (FrameType.PING, FrameType.PONG, FrameType.GOAWAY)
        if conn_level != (stream == 0):
            raise MuxProtocolError(
                f"{kind.name} frame on stream {stream}: expected "
                + ("stream 0" if conn_level else "a stream id > 0")
            )


class SendWindow:
    """How many DATA bytes we may still send on a stream."""

    __slots__ = ("credit",)

    def __init__(self, initial: int) -> None:
        self.credit = initial

    def take(self, wanted: int) -> int:
        n = min(wanted, self.credit)
        self.credit -= n
        return n

    def grant(self, increment: int) -> None:
        if increment <= 0 or self.credit + increment > 1 << 31:
            raise MuxProtocolError(f"window increment {increment} is out of range")
        self.credit += increment


class RecvWindow:
    """DATA bytes the peer may still send on a stream, and the credit we owe it back.

    Bytes count as consumed when they were handed on; credit goes back in batches of
    `window // 4`, at most 256 KiB, so a stream of small messages costs no WINDOW frame per
    message, and a bulk stream's sender never waits for a big batch (with a 4 MiB window and
    1 MiB batches the sender ran out of credit every ~0.7 MiB and bulk moved at 0.6x a plain
    TLS connection; with 256 KiB batches, at 1.0x: bench/gateway_bench.py).

    The window starts at `window` and may grow to `max_window`: each batch of credit given
    while the caller says so (`grow`: the stream keeps reading and the connection holds little
    for streams that do not) also grows the window by up to its size, as TCP's slow start.
    A bulk stream reaches the maximum after a few batches; a stream that never reads fast
    keeps a small window, so many slow readers cannot make the other side buffer a large
    window each."""

    __slots__ = ("allowed", "consumed", "max_window", "threshold", "window")

    def __init__(self, window: int, max_window: int | None = None) -> None:
        self.window = window
        self.max_window = max(window, max_window or window)
        self.allowed = window
        self.consumed = 0
        self.threshold = max(1, min(window // 4, 256 << 10))

    def receive(self, n: int) -> None:
        if n > self.allowed:
            raise MuxProtocolError(f"{n} bytes sent with only {self.allowed} of window left")
        self.allowed -= n

    def consume(self, n: int, grow: bool = False) -> int:
        """Record `n` bytes handed on; return the increment to send now (0: not a whole batch
        yet; `release` sends the rest when reading resumes)."""
        self.consumed += n
        if self.consumed < self.threshold:
            return 0
        return self.release(grow)

    def release(self, grow: bool = False) -> int:
        """All consumed bytes back as credit now (e.g. reading resumed), plus the window's
        growth when `grow`."""
        n, self.consumed = self.consumed, 0
        if grow and self.window < self.max_window:
            extra = min(self.window, self.max_window - self.window)
            self.window += extra
            self.threshold = max(1, min(self.window // 4, 256 << 10))
            n += extra
        self.allowed += n
        return n


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
    # egress: an OPEN unanswered this long, with no frame from the peer since it went, sends a
    # PING; no frame back within probe_timeout and the connection's OPENs fail at once (a cut
    # link is noticed in ~1.5 s instead of open_timeout: gateway/proto/liveness.py).
    open_probe_after: float = 0.5
    probe_timeout: float = 1.0
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
                    self.fin_timeout, self.open_probe_after, self.probe_timeout)  # fmt: skip
        if min(timeouts) <= 0:
            raise ValueError("timeouts must be > 0")


# --- one stream, sans-IO ------------------------------------------------------------------------


class StreamState(enum.Enum):
    """Where a stream is in its life (the names follow TCP's)."""

    OPENING = "opening"  # egress: OPEN sent, no ACCEPT yet (bytes may already go out)
    OPEN = "open"  # bytes both ways
    FIN_WAIT = "fin_wait"  # our FIN is out; the peer may still send
    CLOSE_WAIT = "close_wait"  # the peer's FIN came; we may still send
    SHUT = "shut"  # FIN both ways; the stream waits for its user to close it
    CLOSED = "closed"  # over: closed both ways, reset, or its tunnel lost; forgotten


class Op(enum.Enum):
    """What a `StreamMachine` asks its shell to do; commands are tuples `(Op, *args)`."""

    FRAME = "frame"  # (FRAME, FrameType, payload): a control frame to the peer
    DATA = "data"  # (DATA, bytes): DATA frames to the peer (within the send window)
    DELIVER = "deliver"  # (DELIVER, bytes): to the user, then call `delivered(len)`
    DELIVER_EOF = "deliver_eof"  # (DELIVER_EOF,): the user's eof_received, then `eof_delivered`
    DELIVER_LATER = "deliver_later"  # (DELIVER_LATER,): call `deliver_next` from the loop soon
    PAUSE_WRITER = "pause_writer"  # the user's pause_writing
    RESUME_WRITER = "resume_writer"
    LOST = "lost"  # (LOST, exc | None): the user's connection_lost, once, from the loop
    FORGET = "forget"  # the connection drops the stream
    ACCEPTED = "accepted"  # (ACCEPTED, exc | None): the egress's open() resolves
    DEADLINE = "deadline"  # (DEADLINE, when | None): call `timer` once the clock is past


class TunnelShare:
    """What the streams of one tunnel share: the bytes held for streams that are not reading
    (bounded by `max_buffered` together), and whether the tunnel's own writes are paused."""

    __slots__ = ("buffered", "write_paused")

    def __init__(self) -> None:
        self.buffered = 0
        self.write_paused = False


_DATA_OP, _FRAME_OP, _DELIVER = Op.DATA, Op.FRAME, Op.DELIVER
_OPENING, _OPEN, _FIN_WAIT, _CLOSE_WAIT, _SHUT, _CLOSED = tuple(StreamState)


class StreamMachine:
    """One stream of a tunnel: flow control both ways, half-close, close and reset, as a
    state machine (`state`) that returns commands (`Op`) and a deadline for the FIN it waits
    for after a close; time comes from the injected clock.

    Close follows TCP: `close()` sends FIN after the bytes waiting for window (even if the
    peer's FIN came first), tells the user once the FIN is out, and is over when the peer's
    FIN comes (or at the deadline, with a RESET); bytes that arrive after close are answered
    with RESET. A stream that ends before it has a user tells the one attached later."""

    __slots__ = (
        "attached", "awaiting_accept", "clock", "closed_here", "config", "deadline",
        "deliver_scheduled", "eof_queued", "fin_queued", "high", "id", "lost_exc", "low",
        "notified", "pending", "pending_size", "rbuf", "rbuf_size", "read_paused", "received",
        "recv", "send", "sent", "share", "state", "writer_paused",
    )  # fmt: skip

    def __init__(
        self,
        sid: int,
        config: MuxConfig,
        share: TunnelShare,
        opening: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = sid
        self.config = config
        self.share = share
        self.clock = clock
        self.state = _OPENING if opening else _OPEN
        self.awaiting_accept = opening  # egress: open() waits for ACCEPT or RESET
        first = min(config.initial_window, config.window)
        self.send = SendWindow(first)
        self.recv = RecvWindow(first, config.window)
        self.pending: collections.deque[bytes] = collections.deque()  # waiting for window
        self.pending_size = 0
        self.high = config.high_water
        self.low = config.low_water
        self.writer_paused = False
        self.read_paused = False
        self.attached = False  # a user (protocol) is set
        self.rbuf: collections.deque[bytes] = collections.deque()  # for a user not reading
        self.rbuf_size = 0
        self.eof_queued = False  # the peer's FIN waits behind `rbuf`
        self.deliver_scheduled = False
        self.fin_queued = False  # our FIN waits behind `pending`
        self.closed_here = False  # close() was called
        self.notified = False
        self.lost_exc: Exception | None = None
        self.deadline: float | None = None
        self.sent = 0
        self.received = 0

    # --- queries ----------------------------------------------------------------------------

    @property
    def local_fin(self) -> bool:
        """We send no more: our FIN is out or queued."""
        return self.fin_queued or self.state in (_FIN_WAIT, _SHUT) or (
            self.state is _CLOSED
        )  # fmt: skip

    @property
    def remote_fin(self) -> bool:
        return self.state in (_CLOSE_WAIT, _SHUT)

    @property
    def closing(self) -> bool:
        return self.closed_here or self.state is _CLOSED

    def _can_deliver(self) -> bool:
        return self.attached and not self.read_paused and self.state is not _CLOSED

    # --- the user's side ------------------------------------------------------------------

    def attach(self) -> list[tuple]:
        """A user (protocol) is set. One that comes after the end hears of it now."""
        self.attached = True
        state = self.state
        if state is _CLOSED or (self.closed_here and not self.fin_queued):
            return self._notify(self.lost_exc)
        if self.rbuf or self.eof_queued:
            return self._schedule()
        return []

    def pause_reading(self) -> list[tuple]:
        self.read_paused = True
        return []

    def resume_reading(self) -> list[tuple]:
        if not self.read_paused:
            return []
        self.read_paused = False
        if self.rbuf or self.eof_queued:
            return self._schedule()
        if self.recv.consumed and self.state is not _CLOSED:
            return [(_FRAME_OP, FrameType.WINDOW, window_payload(self.recv.release()))]
        return []

    def send_now(self, n: int) -> bool:
        """The usual write, decided without a command list: True when all `n` bytes may go
        out at once (nothing waits before them and the window has room); they are counted
        as sent, and the caller sends them as DATA. False: call `write`."""
        if self.pending or self.fin_queued or self.send.credit < n or not n:
            return False
        state = self.state
        if state is not _OPEN and state is not _CLOSE_WAIT and state is not _OPENING:
            return False
        self.send.credit -= n
        self.sent += n
        return True

    def receive_now(self, n: int) -> bool:
        """The usual DATA frame, decided without a command list: True when its `n` bytes go
        straight to the user (who reads, with nothing held before them); they are counted,
        and the caller delivers them, then calls `delivered`. False: call `on_data`."""
        recv = self.recv
        if (
            self.closed_here or self.rbuf or not self.attached or self.read_paused
            or n > recv.allowed
        ):  # fmt: skip
            return False
        recv.allowed -= n
        self.received += n
        return True

    def write(self, data: bytes) -> list[tuple]:
        if self.local_fin:
            return []  # asyncio transports drop (and warn about) writes after close as well
        n = len(data)
        if not n:
            return []
        self.sent += n
        out: list[tuple] = []
        if not self.pending:
            take = self.send.take(n)
            if take == n:
                return [(_DATA_OP, data)]
            if take:
                out.append((_DATA_OP, data[:take]))
                data = data[take:]
        self.pending.append(data)
        self.pending_size += len(data)
        return out + self.update_pause()

    def write_eof(self) -> list[tuple]:
        if self.local_fin:
            return []
        if self.pending:
            self.fin_queued = True
            return []
        return self._send_fin()

    def set_write_buffer_limits(self, high: int, low: int) -> list[tuple]:
        self.high, self.low = high, low
        return self.update_pause()

    def update_pause(self) -> list[tuple]:
        """Pause or resume the user's writing (the stream's or the tunnel's buffers)."""
        if not self.attached or self.state is _CLOSED:
            return []
        if self.pending_size > self.high or self.share.write_paused:
            if not self.writer_paused:
                self.writer_paused = True
                return [(Op.PAUSE_WRITER,)]
        elif self.writer_paused and self.pending_size <= self.low:
            self.writer_paused = False
            return [(Op.RESUME_WRITER,)]
        return []

    def close(self) -> list[tuple]:
        """FIN after the buffered bytes; the user learns (LOST) once it is out."""
        if self.closed_here or self.state is _CLOSED:
            return []
        self.closed_here = True
        self._drop_rbuf()
        self.eof_queued = False
        out = self._refused(StreamReset("closed", "closed before it was accepted"))
        if not self.local_fin:
            out += self.write_eof()
        elif not self.fin_queued:
            out += self._after_close()
        return out

    def reset(self, reason: str, detail: str = "") -> list[tuple]:
        """End both directions now, telling the peer why."""
        if self.state is _CLOSED:
            return []
        out: list[tuple] = [(_FRAME_OP, FrameType.RESET, reset_payload(reason, detail))]
        out += self._refused(StreamReset(reason, detail))
        self.closed_here = True
        return out + self._finish() + self._notify(None)

    def accept(self) -> list[tuple]:
        """Ingress side: the endpoint is connected; the egress may send."""
        return [(_FRAME_OP, FrameType.ACCEPT, b"")]

    def delivered(self, n: int) -> list[tuple]:
        """The user took `n` bytes (after a DELIVER): credit for them, in batches.

        Credit comes even if the user paused while taking them: they left our buffers, and
        what comes next waits in `rbuf`, which the window bounds. Holding the credit as well
        left the sender idle for a pause's length each time (bulk: 707 credit stalls per GiB,
        0.77x HAProxy)."""
        if self.state is _CLOSED:
            return []
        share = self.share
        inc = self.recv.consume(n, grow=share.buffered < self.config.max_buffered // 2)
        return [(_FRAME_OP, FrameType.WINDOW, window_payload(inc))] if inc else []

    def eof_delivered(self, keep_open: bool) -> list[tuple]:
        return [] if keep_open else self.close()

    def deliver_next(self) -> list[tuple]:
        """One step of handing on what was held: a chunk, the EOF, or the credit for the
        rest; [] once nothing more can go (the user paused again, or all is out)."""
        self.deliver_scheduled = False
        if self.rbuf and self._can_deliver():
            data = self.rbuf.popleft()
            self.rbuf_size -= len(data)
            self.share.buffered -= len(data)
            return [(_DELIVER, data)]
        if not self.rbuf and self.eof_queued and self._can_deliver():
            self.eof_queued = False
            return [(Op.DELIVER_EOF,)]
        if not self.read_paused and self.recv.consumed and self.state is not _CLOSED:
            return [(_FRAME_OP, FrameType.WINDOW, window_payload(self.recv.release()))]
        return []

    def timer(self, now: float) -> list[tuple]:
        if self.deadline is None or now < self.deadline or self.state is _CLOSED:
            return []
        self.deadline = None
        return [(_FRAME_OP, FrameType.RESET, reset_payload("fin_timeout", "no FIN after close")),
                *self._finish()]  # fmt: skip

    # --- frames from the peer ---------------------------------------------------------------

    def on_data(self, payload: bytes) -> list[tuple]:
        if self.closed_here:  # TCP: bytes after close are answered with a reset
            out: list[tuple] = [(_FRAME_OP, FrameType.RESET,
                                 reset_payload("closed", "the stream was closed"))]  # fmt: skip
            # Told already if our FIN went out; if bytes still waited for window, they are lost.
            return out + self._finish() + self._notify(
                StreamReset("closed", "bytes arrived after close")
            )
        n = len(payload)
        try:
            self.recv.receive(n)
        except MuxProtocolError as err:
            return self.fail("flow_control", str(err))
        self.received += n
        if self.rbuf or not self.attached or self.read_paused:
            share = self.share
            if share.buffered + n > self.config.max_buffered:
                return self.fail("flow_control", "the tunnel's receive buffers are full")
            self.rbuf.append(payload)
            self.rbuf_size += n
            share.buffered += n
            return []
        return [(_DELIVER, payload)]

    def on_fin(self) -> list[tuple]:
        state = self.state
        if state is _CLOSED or self.remote_fin:
            return []
        self.state = _SHUT if state is _FIN_WAIT else _CLOSE_WAIT
        if self.closed_here:
            if not self.fin_queued:  # our FIN is out: both ways done
                return self._finish()
            return []  # our FIN waits behind buffered bytes; sending it finishes
        if self.rbuf or not self._can_deliver():
            self.eof_queued = True
            return []
        return [(Op.DELIVER_EOF,)]

    def on_window(self, increment: int) -> list[tuple]:
        """More credit (MuxProtocolError if out of range: the whole tunnel is broken)."""
        send = self.send
        send.grant(increment)
        out: list[tuple] = []
        pending = self.pending
        while pending and send.credit:
            chunk = pending[0]
            take = send.take(len(chunk))
            if take == len(chunk):
                pending.popleft()
            else:
                pending[0] = chunk[take:]
                chunk = chunk[:take]
            self.pending_size -= take
            out.append((_DATA_OP, chunk))
        if not pending and self.fin_queued:
            out += self._send_fin()
        return out + self.update_pause()

    def on_accept(self) -> list[tuple]:
        if not self.awaiting_accept:
            return []
        self.awaiting_accept = False
        if self.state is _OPENING:
            self.state = _OPEN
        return [(Op.ACCEPTED, None)]

    def on_reset(self, reason: str, detail: str) -> list[tuple]:
        exc = StreamReset(reason, detail)
        return self._refused(exc) + self._finish() + self._notify(exc)

    def fail(self, reason: str, detail: str) -> list[tuple]:
        """Our side gives up on the stream (flow control broken, the user failed)."""
        out: list[tuple] = [(_FRAME_OP, FrameType.RESET, reset_payload(reason, detail))]
        return out + self._finish() + self._notify(StreamReset(reason, detail))

    def on_tunnel_lost(self, exc: Exception | None) -> list[tuple]:
        """The tunnel is gone (the connection forgot every stream already)."""
        err = StreamReset("tunnel_lost", repr(exc) if exc else "the tunnel closed")
        out = self._refused(err)
        self.state = _CLOSED
        self._drop_rbuf()
        self.deadline = None
        return [*out, (Op.DEADLINE, None), *self._notify(err)]

    # --- internals ------------------------------------------------------------------------

    def _send_fin(self) -> list[tuple]:
        self.fin_queued = False
        state = self.state
        out: list[tuple] = [(_FRAME_OP, FrameType.FIN, b"")]
        if state is _CLOSE_WAIT:
            self.state = _SHUT
        elif state is not _SHUT:
            self.state = _FIN_WAIT  # (from OPENING too: a stream closed before its ACCEPT)
        if self.closed_here:
            out += self._after_close()
        return out

    def _after_close(self) -> list[tuple]:
        """Our FIN of a close() is out: tell the user; over once the peer's FIN is here."""
        out = self._notify(None)
        if self.state is _SHUT:
            return out + self._finish()
        self.deadline = self.clock() + self.config.fin_timeout
        return [*out, (Op.DEADLINE, self.deadline)]

    def _finish(self) -> list[tuple]:
        if self.state is _CLOSED:
            return []
        self.state = _CLOSED
        self._drop_rbuf()
        self.pending.clear()
        self.pending_size = 0
        out: list[tuple] = [(Op.FORGET,)]
        if self.deadline is not None:
            self.deadline = None
            out.append((Op.DEADLINE, None))
        return out

    def _drop_rbuf(self) -> None:
        self.rbuf.clear()
        self.share.buffered -= self.rbuf_size
        self.rbuf_size = 0

    def _refused(self, exc: StreamReset) -> list[tuple]:
        """The egress's open() fails with `exc`, if it still waits."""
        if not self.awaiting_accept:
            return []
        self.awaiting_accept = False
        return [(Op.ACCEPTED, exc)]

    def _schedule(self) -> list[tuple]:
        if self.deliver_scheduled:
            return []
        self.deliver_scheduled = True
        return [(Op.DELIVER_LATER,)]

    def _notify(self, exc: Exception | None) -> list[tuple]:
        """Tell the user the stream is over, once; a stream that ends before it has a user
        tells the one `attach` announces later."""
        if self.notified:
            return []
        self.lost_exc = exc
        if not self.attached:
            return []
        self.notified = True
        return [(Op.LOST, exc)]
