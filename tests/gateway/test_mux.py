"""The tunnel's sans-IO frame codec and stream windows (`gateway.proto.mux`), without sockets."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ProtocolError
from gateway.proto.mux import (
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    MAX_REASON,
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

pytestmark = pytest.mark.timeout(60)

Frame = tuple[int, int, bytes]

# One frame of every type, with payloads of the sizes each type allows.
SAMPLE: list[Frame] = [
    (FrameType.OPEN, 1, b"tcp.reviews.default.west.mesh.test"),
    (FrameType.ACCEPT, 1, b""),
    (FrameType.DATA, 1, b"hello"),
    (FrameType.DATA, 3, b""),
    (FrameType.DATA, 5, bytes(range(256)) * 3),
    (FrameType.FIN, 1, b""),
    (FrameType.RESET, 3, reset_payload("not_exported", "secret is not exported")),
    (FrameType.WINDOW, 5, window_payload(65536)),
    (FrameType.PING, 0, b"12345678"),
    (FrameType.PONG, 0, b"87654321"),
    (FrameType.GOAWAY, 0, b"draining"),
    (FrameType.OPEN, (1 << 31) - 1, b"x" * MAX_TARGET),
    (FrameType.RESET, 0xFFFFFFFF, b"r" * MAX_REASON),
]


def wire(frames: list[Frame]) -> bytes:
    return b"".join(encode(FrameType(k), s, p) for k, s, p in frames)


def header(kind: int, stream: int, length: int) -> bytes:
    return HEADER.pack(kind, stream, length)


def merged(frames: list[Frame]) -> list[Frame]:
    """DATA payloads joined per run of one stream: the decoder hands DATA bytes on as they
    arrive, so a frame split over chunks comes out in pieces (a stream is a byte stream)."""
    out: list[Frame] = []
    for kind, stream, payload in frames:
        if kind == FrameType.DATA and out and out[-1][0] == FrameType.DATA and out[-1][1] == stream:
            out[-1] = (kind, stream, out[-1][2] + payload)
        else:
            out.append((kind, stream, payload))
    return out


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


# --- encode / decode ----------------------------------------------------------------------------


def test_header_layout() -> None:
    assert HEADER.size == 9
    frame = encode(FrameType.DATA, 0x01020304, b"abc")
    assert frame == b"\x03\x01\x02\x03\x04\x00\x00\x00\x03abc"


@pytest.mark.parametrize("frame", SAMPLE, ids=lambda f: f"{FrameType(f[0]).name}-{len(f[2])}")
def test_round_trip_each_frame(frame: Frame) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(wire([frame])) == [frame]
    assert decoder.buffered == 0


def test_round_trip_all_in_one_feed() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(wire(SAMPLE)) == SAMPLE
    assert decoder.buffered == 0


def test_split_at_every_boundary_gives_the_same_frames() -> None:
    data = wire(SAMPLE)
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        assert merged(feed_all(decoder, [data[:cut], data[cut:]])) == merged(SAMPLE), cut
        assert decoder.buffered == 0


def test_split_at_every_pair_of_boundaries_of_a_short_stream() -> None:
    frames: list[Frame] = [
        (FrameType.DATA, 1, b"abcdefgh"),
        (FrameType.FIN, 1, b""),
        (FrameType.WINDOW, 3, window_payload(7)),
        (FrameType.PING, 0, b"pingpong"),
    ]
    data = wire(frames)
    for i, j in itertools.combinations(range(len(data) + 1), 2):
        decoder = FrameDecoder()
        assert merged(feed_all(decoder, [data[:i], data[i:j], data[j:]])) == frames, (i, j)


def test_byte_by_byte() -> None:
    data = wire(SAMPLE)
    largest = max(len(p) for k, _, p in SAMPLE if k != FrameType.DATA)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i : i + 1]))
        # DATA bytes are never held back; at most a header or a control payload is.
        assert decoder.buffered < HEADER.size + largest
    assert merged(out) == merged(SAMPLE)
    assert decoder.buffered == 0


def test_empty_feeds_change_nothing() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    frame = encode(FrameType.DATA, 1, b"xyz")
    assert decoder.feed(frame[:4]) == []
    assert decoder.feed(b"") == []
    assert decoder.buffered == 4
    assert decoder.feed(frame[4:]) == [(FrameType.DATA, 1, b"xyz")]
    assert decoder.feed(b"") == []


def test_large_data_frame_in_16k_pieces_comes_out_as_it_arrives() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: the largest payload by default
    assert len(payload) == DEFAULT_MAX_PAYLOAD
    data = encode(FrameType.DATA, 7, payload) + encode(FrameType.FIN, 7)
    decoder = FrameDecoder()
    step = 16384
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    got = b""
    for piece in pieces[:-1]:
        out = decoder.feed(piece)
        assert [(k, s) for k, s, _ in out] == [(FrameType.DATA, 7)]  # no waiting for the rest
        got += out[0][2]
        assert decoder.buffered == 0
    # The last piece holds the payload's end and the whole FIN frame.
    *rest, fin = decoder.feed(pieces[-1])
    assert fin == (FrameType.FIN, 7, b"")
    assert got + b"".join(p for _, _, p in rest) == payload
    assert decoder.buffered == 0


def test_a_chunk_that_is_all_payload_is_passed_on_uncopied() -> None:
    payload = b"p" * 50_000
    frame = encode(FrameType.DATA, 1, payload)
    decoder = FrameDecoder()
    assert decoder.feed(frame[:9]) == []
    body = frame[9:]
    ((_, _, out),) = decoder.feed(body)
    assert out is body


def test_frames_after_a_partial_frame_in_the_same_feed() -> None:
    a = encode(FrameType.DATA, 1, b"a" * 100)
    b = encode(FrameType.DATA, 3, b"b" * 10)
    c = encode(FrameType.FIN, 1)
    decoder = FrameDecoder()
    assert decoder.feed(a[:50]) == [(3, 1, b"a" * 41)]  # the payload bytes so far
    assert decoder.feed(a[50:] + b + c[:3]) == [(3, 1, b"a" * 59), (3, 3, b"b" * 10)]
    assert decoder.buffered == 3
    assert decoder.feed(c[3:]) == [(4, 1, b"")]


def test_window_and_reset_payloads() -> None:
    for n in (1, 1024, (1 << 31) - 1, (1 << 32) - 1):
        assert parse_window(window_payload(n)) == n
    assert reset_payload("closed") == b"closed"
    assert parse_reset(reset_payload("closed")) == ("closed", "")
    assert parse_reset(reset_payload("not_exported", "a: b")) == ("not_exported", "a: b")
    assert parse_reset(b"") == ("reset", "")
    assert parse_reset(b"\xff\xfe: x")[1] == "x"  # tolerant of bad UTF-8
    long = reset_payload("r", "d" * 2000)
    assert len(long) == MAX_REASON
    assert FrameDecoder().feed(encode(FrameType.RESET, 1, long)) == [(5, 1, long)]
    # Cut inside a multi-byte character: still a valid frame, decoded with a replacement.
    cut = reset_payload("r", "é" * 600)
    assert len(cut) == MAX_REASON
    assert parse_reset(cut)[0] == "r"


# --- protocol errors --------------------------------------------------------------------------


def assert_refused_on_header(head: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
    """The header alone is refused, whether it arrives whole or in pieces: the decoder never
    waits for (or buffers) the payload of a frame it cannot accept."""
    with pytest.raises(MuxProtocolError):
        FrameDecoder(max_payload).feed(head)
    decoder = FrameDecoder(max_payload)
    assert decoder.feed(head[:5]) == []
    with pytest.raises(MuxProtocolError):
        decoder.feed(head[5:])
    # Behind a good frame in the same feed.
    with pytest.raises(MuxProtocolError):
        FrameDecoder(max_payload).feed(encode(FrameType.DATA, 1, b"ok") + head)


@pytest.mark.parametrize("code", [0, 10, 11, 0x7F, 0xFF])
def test_unknown_type(code: int) -> None:
    assert_refused_on_header(header(code, 1, 0))
    with pytest.raises(MuxProtocolError, match=f"unknown frame type {code}"):
        FrameDecoder().feed(header(code, 0, 4) + b"abcd")


@pytest.mark.parametrize(
    ("kind", "stream", "size"),
    [
        (FrameType.ACCEPT, 1, 0),
        (FrameType.FIN, 1, 0),
        (FrameType.WINDOW, 1, 4),
        (FrameType.PING, 0, 8),
        (FrameType.PONG, 0, 8),
    ],
)
def test_fixed_size_frames_with_a_wrong_length(kind: FrameType, stream: int, size: int) -> None:
    assert FrameDecoder().feed(header(kind, stream, size) + b"\0" * size) == [
        (kind, stream, b"\0" * size)
    ]
    for wrong in {0, 1, size - 1, size + 1, 4096, 0xFFFFFFFF} - {size, -1}:
        assert_refused_on_header(header(kind, stream, wrong))


@pytest.mark.parametrize(
    ("kind", "stream", "limit"),
    [
        (FrameType.OPEN, 1, MAX_TARGET),
        (FrameType.RESET, 1, MAX_REASON),
        (FrameType.GOAWAY, 0, MAX_REASON),
    ],
)
def test_variable_frames_over_their_limit(kind: FrameType, stream: int, limit: int) -> None:
    ok = encode(kind, stream, b"a" * limit)
    assert FrameDecoder().feed(ok) == [(kind, stream, b"a" * limit)]
    for over in (limit + 1, DEFAULT_MAX_PAYLOAD, 0xFFFFFFFF):
        assert_refused_on_header(header(kind, stream, over))


def test_data_over_max_payload() -> None:
    assert FrameDecoder(1000).feed(encode(FrameType.DATA, 1, b"d" * 1000)) == [(3, 1, b"d" * 1000)]
    for over in (1001, 1 << 20, 0xFFFFFFFF):
        assert_refused_on_header(header(FrameType.DATA, 1, over), max_payload=1000)
    assert_refused_on_header(header(FrameType.DATA, 1, DEFAULT_MAX_PAYLOAD + 1))


def test_max_payload_bounds_control_frames_too() -> None:
    """A decoder never holds more than one header and `max_payload` bytes, even when that is
    below a control frame's own cap (OPEN 253, RESET and GOAWAY 512 bytes)."""
    decoder = FrameDecoder(100)
    assert decoder.feed(encode(FrameType.OPEN, 1, b"o" * 100)) == [(1, 1, b"o" * 100)]
    assert decoder.feed(encode(FrameType.PING, 0, b"p" * 8)) == [(7, 0, b"p" * 8)]
    for kind, stream in ((FrameType.OPEN, 1), (FrameType.RESET, 1), (FrameType.GOAWAY, 0)):
        assert_refused_on_header(header(kind, stream, 101), max_payload=100)
    assert_refused_on_header(header(FrameType.PING, 0, 8), max_payload=4)


@pytest.mark.parametrize("kind", [FrameType.PING, FrameType.PONG, FrameType.GOAWAY])
@pytest.mark.parametrize("stream", [1, 2, 0xFFFFFFFF])
def test_connection_frames_on_a_stream(kind: FrameType, stream: int) -> None:
    size = 0 if kind is FrameType.GOAWAY else 8
    assert_refused_on_header(header(kind, stream, size))


@pytest.mark.parametrize(
    "kind",
    [
        FrameType.OPEN,
        FrameType.ACCEPT,
        FrameType.DATA,
        FrameType.FIN,
        FrameType.RESET,
        FrameType.WINDOW,
    ],
)
def test_stream_frames_on_stream_zero(kind: FrameType) -> None:
    size = 4 if kind is FrameType.WINDOW else 0
    assert_refused_on_header(header(kind, 0, size))
    with pytest.raises(MuxProtocolError, match="stream 0"):
        FrameDecoder().feed(header(kind, 0, size) + b"\0" * size)


def test_error_is_a_protocol_error() -> None:
    assert issubclass(MuxProtocolError, ProtocolError)


# --- windows ------------------------------------------------------------------------------------


def test_send_window() -> None:
    w = SendWindow(1000)
    assert w.take(300) == 300
    assert w.take(1000) == 700
    assert w.credit == 0
    assert w.take(5) == 0
    w.grant(250)
    assert w.take(100) == 100
    assert w.credit == 150
    w.grant(1)
    assert w.credit == 151


@pytest.mark.parametrize("increment", [0, -1, -(1 << 31), (1 << 31) + 1, 1 << 40])
def test_send_window_increments_out_of_range(increment: int) -> None:
    w = SendWindow(1000)
    with pytest.raises(MuxProtocolError, match="out of range"):
        w.grant(increment)
    assert w.credit == 1000


def test_send_window_may_not_grow_past_2_31() -> None:
    w = SendWindow(1 << 20)
    w.grant((1 << 31) - (1 << 20))
    assert w.credit == 1 << 31
    with pytest.raises(MuxProtocolError):
        w.grant(1)
    assert w.credit == 1 << 31


def test_recv_window_batches_credit_at_a_quarter() -> None:
    r = RecvWindow(1000)
    assert r.threshold == 250
    r.receive(600)
    assert r.allowed == 400
    assert r.consume(100) == 0
    assert r.consume(100) == 0
    assert r.consume(49) == 0
    assert r.consume(1) == 250  # reached the threshold: all of it back at once
    assert (r.allowed, r.consumed) == (650, 0)
    assert r.consume(150) == 0
    r.receive(650)
    assert r.allowed == 0
    with pytest.raises(MuxProtocolError, match="window"):
        r.receive(1)
    assert r.consume(500) == 650
    assert r.allowed == 650


def test_recv_window_release_returns_what_is_below_a_batch() -> None:
    r = RecvWindow(1000)  # batches of 250
    r.receive(1000)
    assert r.consume(200) == 0
    assert (r.allowed, r.consumed) == (0, 200)
    with pytest.raises(MuxProtocolError):
        r.receive(1)
    assert r.release() == 200  # e.g. reading resumed: what is owed goes back now
    assert (r.allowed, r.consumed) == (200, 0)
    assert r.release() == 0
    # A consume that reaches a batch returns everything owed.
    r.receive(10)
    assert r.consume(5) == 0
    assert r.consume(300) == 305


def test_recv_window_receive_beyond_window() -> None:
    r = RecvWindow(1024)
    with pytest.raises(MuxProtocolError):
        r.receive(1025)
    assert r.allowed == 1024  # nothing counted by the refused receive
    r.receive(1024)


def test_recv_window_tiny_threshold() -> None:
    r = RecvWindow(3)
    assert r.threshold == 1
    r.receive(1)
    assert r.consume(1) == 1


def test_windows_conserve_bytes() -> None:
    """Sender and receiver agree: in flight + credit is always the window."""
    window = 4096
    send, recv = SendWindow(window), RecvWindow(window)
    for size in [1, 100, 1000, 4096, 3, 2000, 777] * 20:
        n = send.take(size)
        recv.receive(n)
        inc = recv.consume(n)
        if inc:
            send.grant(inc)
        assert send.credit + recv.consumed == window
        assert recv.allowed == send.credit


# --- property: arbitrary input ------------------------------------------------------------------


def _check_feeding(data: bytes, cuts: list[int], max_payload: int) -> list[Frame] | None:
    """Feed `data` cut at `cuts`: frames, or None after a MuxProtocolError. Never holds more
    than one largest frame."""
    decoder = FrameDecoder(max_payload)
    frames: list[Frame] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, stop in itertools.pairwise(bounds):
        try:
            frames.extend(decoder.feed(data[start:stop]))
        except MuxProtocolError:
            return None
        assert decoder.buffered < HEADER.size + max_payload
        assert decoder.buffered <= stop
    for kind, stream, payload in frames:
        assert kind in set(FrameType)
        assert len(payload) <= max_payload
        assert (stream == 0) == (kind in (FrameType.PING, FrameType.PONG, FrameType.GOAWAY))
    return frames


_frame = st.one_of(
    st.tuples(
        st.sampled_from([FrameType.DATA, FrameType.OPEN, FrameType.RESET]),
        st.integers(1, 0xFFFFFFFF),
        st.binary(max_size=200),
    ),
    st.tuples(st.sampled_from([FrameType.ACCEPT, FrameType.FIN]), st.integers(1, 99), st.just(b"")),
    st.tuples(st.just(FrameType.WINDOW), st.integers(1, 99), st.binary(min_size=4, max_size=4)),
    st.tuples(
        st.sampled_from([FrameType.PING, FrameType.PONG]),
        st.just(0),
        st.binary(min_size=8, max_size=8),
    ),
    st.tuples(st.just(FrameType.GOAWAY), st.just(0), st.binary(max_size=50)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=30),
    max_payload=st.integers(0, 2048),
)
def test_arbitrary_bytes_in_arbitrary_chunks(
    data: bytes, cuts: list[int], max_payload: int
) -> None:
    _check_feeding(data, cuts, max_payload)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(_frame, max_size=20),
    cuts=st.lists(st.integers(0, 5000), max_size=30),
    flips=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=3),
    max_payload=st.integers(0, 2048),
)
def test_valid_and_corrupted_frame_streams(
    frames: list[Frame],
    cuts: list[int],
    flips: list[tuple[int, int]],
    max_payload: int,
) -> None:
    data = wire(frames)
    if not flips and all(len(p) <= max_payload for _, _, p in frames):
        found = _check_feeding(data, cuts, max_payload)
        assert found is not None and merged(found) == merged(frames)
        return
    corrupted = bytearray(data)
    for pos, value in flips:
        if corrupted:
            corrupted[pos % len(corrupted)] = value
    _check_feeding(bytes(corrupted), cuts, max_payload)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 70_000), min_size=1, max_size=6), data=st.data())
def test_data_frames_of_any_size_in_any_pieces(lengths: list[int], data: st.DataObject) -> None:
    frames: list[Frame] = [
        (FrameType.DATA, 2 * i + 1, struct.pack("!I", i) * (n // 4)) for i, n in enumerate(lengths)
    ]
    stream = wire(frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    found = _check_feeding(stream, cuts, 70_000)
    assert found is not None and merged(found) == merged(frames)


def test_recv_window_grows_like_slow_start_up_to_its_maximum() -> None:
    w = RecvWindow(1024, 8192)
    w.receive(1024)
    assert w.consume(1024, grow=True) == 2048  # the bytes back plus the window again
    assert (w.window, w.allowed) == (2048, 2048)
    w.receive(2048)
    assert w.consume(2048, grow=True) == 4096
    w.receive(4096)
    assert w.consume(4096, grow=True) == 4096 + 4096
    assert w.window == 8192
    w.receive(8192)
    assert w.consume(8192, grow=True) == 8192  # at the maximum: only the bytes back
    w.receive(8192)
    assert w.consume(8192) == 8192 and w.window == 8192  # without grow: never grows
    with pytest.raises(MuxProtocolError):
        w.receive(8193)
