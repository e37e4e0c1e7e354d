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

import enum
import struct

from gateway.errors import ProtocolError

__all__ = [
    "HEADER",
    "MAX_REASON",
    "MAX_TARGET",
    "FrameDecoder",
    "FrameType",
    "MuxProtocolError",
    "RecvWindow",
    "SendWindow",
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
