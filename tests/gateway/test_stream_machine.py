"""Playbooks for the tunnel stream's state machine (gateway/proto/mux.py: StreamMachine):
events in, commands out, an injected clock, no sockets and no timers.

Single-machine playbooks compare the exact commands. `Wire` joins an egress machine and an
ingress machine the way a tunnel does (each frame one sends reaches the other when the wire
is flushed, as in one event-loop turn) and plays their users: what those receive and are
told is what a protocol on a `MuxStream` would get. These cases were socket tests over
real TLS with wall-clock timeouts (tests/gateway/test_tunnel.py keeps end-to-end ones).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from gateway.errors import StreamReset
from gateway.proto.mux import (
    FrameType,
    MuxConfig,
    Op,
    StreamMachine,
    StreamState,
    TunnelShare,
    parse_reset,
    parse_window,
    reset_payload,
    window_payload,
)

SMALL = MuxConfig(window=4096, initial_window=4096, frame_size=1024, high_water=16384,
                  low_water=4096, fin_timeout=30.0)  # fmt: skip
FIN = (Op.FRAME, FrameType.FIN, b"")


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 7919 + n).randbytes(n)


# --- one machine, exact commands ------------------------------------------------------------


def test_close_sends_fin_tells_the_user_and_waits_for_the_peers_fin_until_a_deadline() -> None:
    clock = Clock()
    m = StreamMachine(1, SMALL, TunnelShare(), opening=False, clock=clock)
    assert m.attach() == []
    assert m.write(b"last words") == [(Op.DATA, b"last words")]
    assert m.close() == [FIN, (Op.LOST, None), (Op.DEADLINE, clock.now + SMALL.fin_timeout)]
    assert m.state is StreamState.FIN_WAIT and m.closing
    assert m.timer(clock.now + SMALL.fin_timeout - 1) == []
    clock.now += SMALL.fin_timeout
    reset = reset_payload("fin_timeout", "no FIN after close")
    assert m.timer(clock.now) == [(Op.FRAME, FrameType.RESET, reset), (Op.FORGET,)]
    assert m.state is StreamState.CLOSED
    assert m.timer(clock.now + 100) == [] and m.close() == [] and m.write(b"x") == []


def test_the_peers_fin_after_close_ends_the_stream_and_cancels_the_deadline() -> None:
    clock = Clock()
    m = StreamMachine(3, SMALL, TunnelShare(), opening=False, clock=clock)
    m.attach()
    assert m.close()[-1] == (Op.DEADLINE, clock.now + SMALL.fin_timeout)
    assert m.on_fin() == [(Op.FORGET,), (Op.DEADLINE, None)]
    assert m.state is StreamState.CLOSED


def test_half_close_states_follow_tcp() -> None:
    m = StreamMachine(1, SMALL, TunnelShare(), opening=True, clock=Clock())
    m.attach()
    assert m.state is StreamState.OPENING
    assert m.on_accept() == [(Op.ACCEPTED, None)]
    assert m.state is StreamState.OPEN
    assert m.on_fin() == [(Op.DELIVER_EOF,)]
    assert m.state is StreamState.CLOSE_WAIT and m.remote_fin and not m.local_fin
    assert m.write(b"still") == [(Op.DATA, b"still")]  # the other way still flows
    assert m.write_eof() == [FIN]
    assert m.state is StreamState.SHUT  # FIN both ways: waits for its user to close it
    assert m.close() == [(Op.LOST, None), (Op.FORGET,)]
    assert m.state is StreamState.CLOSED


def test_an_opener_hears_accept_refusal_or_its_own_close_once() -> None:
    refused = StreamMachine(1, SMALL, TunnelShare(), opening=True, clock=Clock())
    refused.attach()
    got = refused.on_reset("not_exported", "a is not exported")
    assert got[0][0] is Op.ACCEPTED and got[0][1].reason == "not_exported"
    assert got[1:3] == [(Op.FORGET,), (Op.LOST, got[0][1])]
    assert refused.on_accept() == []  # too late
    closed = StreamMachine(3, SMALL, TunnelShare(), opening=True, clock=Clock())
    closed.attach()
    got = closed.close()
    assert got[0][0] is Op.ACCEPTED and got[0][1].reason == "closed" and got[1] == FIN
    assert closed.on_accept() == []
    half = StreamMachine(5, SMALL, TunnelShare(), opening=True, clock=Clock())
    half.attach()
    assert half.write_eof() == [FIN]  # a FIN before the ACCEPT: open() still waits for it
    assert half.on_accept() == [(Op.ACCEPTED, None)]


def test_abort_is_a_reset_and_a_user_attached_after_the_end_hears_of_it() -> None:
    m = StreamMachine(1, SMALL, TunnelShare(), opening=False, clock=Clock())
    assert m.reset("aborted") == [(Op.FRAME, FrameType.RESET, reset_payload("aborted")),
                                  (Op.FORGET,)]  # fmt: skip
    assert m.attach() == [(Op.LOST, None)]  # the user came after: told now
    assert m.attach() == [] and m.reset("again") == []
    ended = StreamMachine(3, SMALL, TunnelShare(), opening=False, clock=Clock())
    ended.on_reset("reset", "endpoint reset the connection")
    (op, exc), *_ = ended.attach()
    assert op is Op.LOST and isinstance(exc, StreamReset) and exc.reason == "reset"


def test_bytes_after_close_are_answered_with_reset() -> None:
    m = StreamMachine(1, SMALL, TunnelShare(), opening=False, clock=Clock())
    m.attach()
    m.close()
    got = m.on_data(b"too late")
    assert got[0] == (Op.FRAME, FrameType.RESET, reset_payload("closed", "the stream was closed"))
    assert got[1] == (Op.FORGET,)  # no DELIVER: nothing goes to the user after close


def test_data_beyond_the_window_resets_the_stream_not_the_tunnel() -> None:
    m = StreamMachine(1, SMALL, TunnelShare(), opening=False, clock=Clock())
    m.attach()
    assert m.on_data(b"a" * 4096) == [(Op.DELIVER, b"a" * 4096)]  # exactly the window
    credit = m.delivered(4096)
    assert credit == [(Op.FRAME, FrameType.WINDOW, window_payload(4096))]  # all of it back
    got = m.on_data(b"b" * 4097)
    assert got[0][:2] == (Op.FRAME, FrameType.RESET)
    assert parse_reset(got[0][2])[0] == "flow_control"
    assert got[-1][0] is Op.LOST and got[-1][1].reason == "flow_control"


def test_writes_beyond_the_window_wait_and_pause_the_writer_at_high_water() -> None:
    config = MuxConfig(window=65536, initial_window=65536, frame_size=16384,
                       high_water=128 << 10, low_water=32 << 10)  # fmt: skip
    m = StreamMachine(1, config, TunnelShare(), opening=False, clock=Clock())
    m.attach()
    data = payload(300_000, 1)
    got = m.write(data)
    assert got[0] == (Op.DATA, data[:65536])  # one window goes out
    assert got[1:] == [(Op.PAUSE_WRITER,)]  # the rest waits: above high water
    assert m.pending_size == 300_000 - 65536
    assert m.write(b"more") == []  # a writer that ignores the pause is buffered, not dropped
    sent = 65536
    resumed = False
    while m.pending_size:
        got = m.on_window(65536)
        chunks = [c[1] for c in got if c[0] is Op.DATA]
        assert chunks and sum(map(len, chunks)) <= 65536
        assert b"".join(chunks) == (data + b"more")[sent : sent + sum(map(len, chunks))]
        sent += sum(map(len, chunks))
        if (Op.RESUME_WRITER,) in got:
            assert m.pending_size <= config.low_water and not resumed
            resumed = True
    assert resumed and sent == len(data) + 4


def test_the_tunnels_pause_pauses_every_writer() -> None:
    share = TunnelShare()
    a = StreamMachine(1, SMALL, share, opening=False, clock=Clock())
    b = StreamMachine(3, SMALL, share, opening=False, clock=Clock())
    a.attach()
    b.attach()
    share.write_paused = True
    assert a.update_pause() == [(Op.PAUSE_WRITER,)] and b.update_pause() == [(Op.PAUSE_WRITER,)]
    share.write_paused = False
    assert a.update_pause() == [(Op.RESUME_WRITER,)] and b.update_pause() == [(Op.RESUME_WRITER,)]


# --- two machines on a wire ------------------------------------------------------------------


@dataclass
class User:
    """What a protocol on the stream sees."""

    m: StreamMachine
    name: str
    data: bytearray = field(default_factory=bytearray)
    eof: bool = False
    keep_open: bool = True  # eof_received's answer
    pause_at: int | None = None  # pause reading once this many bytes came
    lost: list[Exception | None] = field(default_factory=list)
    accepted: list[Exception | None] = field(default_factory=list)
    forgotten: bool = False
    later: bool = False  # DELIVER_LATER asked
    pauses: int = 0
    resumes: int = 0
    deadline: float | None = None


class Wire:
    """An egress and an ingress stream on one tunnel, frames queued between them."""

    def __init__(self, config: MuxConfig = SMALL, share: TunnelShare | None = None) -> None:
        self.clock = Clock()
        self.config = config
        self.share = share or TunnelShare()  # the ingress side's tunnel
        self.egress = User(StreamMachine(1, config, TunnelShare(), True, self.clock), "egress")
        self.ingress = User(StreamMachine(1, config, self.share, False, self.clock), "ingress")
        self.queue: list[tuple[User, FrameType, bytes]] = []
        self.frames: list[tuple[str, FrameType, bytes]] = []
        for user in (self.egress, self.ingress):
            self.run(user, user.m.attach())

    def peer(self, user: User) -> User:
        return self.ingress if user is self.egress else self.egress

    def run(self, user: User, commands: list[tuple]) -> None:
        for cmd in commands:
            op = cmd[0]
            if op is Op.DATA or op is Op.FRAME:
                kind, body = (FrameType.DATA, cmd[1]) if op is Op.DATA else (cmd[1], cmd[2])
                self.frames.append((user.name, kind, body))
                self.queue.append((self.peer(user), kind, body))
            elif op is Op.DELIVER:
                assert not user.eof and not user.lost, "bytes after the end"
                user.data += cmd[1]
                if user.pause_at is not None and len(user.data) >= user.pause_at:
                    user.pause_at = None
                    self.run(user, user.m.pause_reading())
                self.run(user, user.m.delivered(len(cmd[1])))
            elif op is Op.DELIVER_EOF:
                user.eof = True
                self.run(user, user.m.eof_delivered(user.keep_open))
            elif op is Op.DELIVER_LATER:
                user.later = True
            elif op is Op.PAUSE_WRITER:
                user.pauses += 1
            elif op is Op.RESUME_WRITER:
                user.resumes += 1
            elif op is Op.LOST:
                assert not user.lost, "connection_lost twice"
                user.lost.append(cmd[1])
            elif op is Op.FORGET:
                user.forgotten = True
            elif op is Op.ACCEPTED:
                user.accepted.append(cmd[1])
            elif op is Op.DEADLINE:
                user.deadline = cmd[1]

    def flush(self) -> None:
        """Deliver queued frames (and held bytes asked for) until nothing moves."""
        while self.queue or self.egress.later or self.ingress.later:
            for user in (self.egress, self.ingress):
                if user.later:
                    user.later = False
                    while commands := user.m.deliver_next():
                        self.run(user, commands)
            queue, self.queue = self.queue, []
            for user, kind, body in queue:
                m = user.m
                if user.forgotten:
                    continue  # the connection dropped it: a real tunnel answers with RESET
                if kind is FrameType.DATA:
                    self.run(user, m.on_data(body))
                elif kind is FrameType.WINDOW:
                    self.run(user, m.on_window(parse_window(body)))
                elif kind is FrameType.FIN:
                    self.run(user, m.on_fin())
                elif kind is FrameType.RESET:
                    self.run(user, m.on_reset(*parse_reset(body)))
                elif kind is FrameType.ACCEPT:
                    self.run(user, m.on_accept())

    def do(self, user: User, commands: list[tuple]) -> None:
        self.run(user, commands)
        self.flush()

    def tick(self, seconds: float) -> None:
        self.clock.now += seconds
        for user in (self.egress, self.ingress):
            self.run(user, user.m.timer(self.clock.now))
        self.flush()

    def open(self) -> None:
        self.do(self.ingress, self.ingress.m.accept())
        assert self.egress.accepted == [None]


def test_fin_timeout_resets_a_peer_that_never_finishes() -> None:
    w = Wire()
    w.open()
    w.do(w.ingress, w.ingress.m.write(b"last words"))
    w.do(w.ingress, w.ingress.m.close())
    assert w.ingress.lost == [None]  # told at once
    assert w.egress.eof and bytes(w.egress.data) == b"last words"  # keeps its side open
    assert not w.ingress.forgotten and w.ingress.deadline == w.clock.now + SMALL.fin_timeout
    w.tick(SMALL.fin_timeout - 0.1)
    assert not w.ingress.forgotten
    w.tick(0.1)
    assert w.ingress.forgotten and w.egress.forgotten
    assert isinstance(w.egress.lost[0], StreamReset) and w.egress.lost[0].reason == "fin_timeout"


def test_half_close_server_first_client_keeps_sending() -> None:
    w = Wire()
    w.open()
    w.do(w.ingress, w.ingress.m.write(b"banner") + w.ingress.m.write_eof())
    assert w.egress.eof and bytes(w.egress.data) == b"banner"
    upload = payload(300_000, 3)
    for start in range(0, len(upload), 10_000):
        w.do(w.egress, w.egress.m.write(upload[start : start + 10_000]))
    w.do(w.egress, w.egress.m.write_eof())
    assert w.ingress.eof and bytes(w.ingress.data) == upload
    w.do(w.egress, w.egress.m.close())
    w.do(w.ingress, w.ingress.m.close())
    assert w.egress.lost == [None] and w.ingress.lost == [None]
    assert w.egress.forgotten and w.ingress.forgotten
    assert w.egress.deadline is None and w.ingress.deadline is None


def test_close_with_unsent_bytes_still_delivers_them_after_the_peers_fin() -> None:
    """close() sends FIN after the buffered bytes, like TCP, even when the peer's FIN comes
    first: the peer's FIN must not throw away bytes that wait for window."""
    w = Wire(MuxConfig(window=4096, initial_window=4096, frame_size=1024, high_water=1 << 20,
                       low_water=1 << 18))  # fmt: skip
    w.open()
    w.run(w.ingress, w.ingress.m.pause_reading())
    data = payload(200_000, 8)
    w.do(w.egress, w.egress.m.write(data) + w.egress.m.close())
    assert w.egress.m.pending_size > 0 and not w.egress.lost  # told after the flush, as asyncio
    w.do(w.ingress, w.ingress.m.write_eof())  # the peer's FIN arrives while ours still waits
    assert w.egress.m.remote_fin
    w.do(w.ingress, w.ingress.m.resume_reading())
    assert w.ingress.eof and bytes(w.ingress.data) == data
    assert w.egress.lost == [None] and w.egress.forgotten
    w.do(w.ingress, w.ingress.m.close())
    assert w.ingress.forgotten


def test_close_with_unsent_bytes_then_data_tells_the_protocol() -> None:
    """Bytes arriving after close() reset the stream; the closing side's protocol still gets
    its connection_lost (a relay waits for it) even though its FIN never went out."""
    w = Wire()
    w.open()
    w.run(w.ingress, w.ingress.m.pause_reading())
    w.do(w.egress, w.egress.m.write(payload(200_000, 9)) + w.egress.m.close())
    assert not w.egress.lost
    w.do(w.ingress, w.ingress.m.write(b"an answer nobody reads"))
    assert isinstance(w.egress.lost[0], StreamReset) and w.egress.lost[0].reason == "closed"
    assert isinstance(w.ingress.lost[0], StreamReset) and w.ingress.lost[0].reason == "closed"
    assert w.egress.forgotten and w.ingress.forgotten


def test_buffers_of_streams_that_do_not_read_are_bounded_per_tunnel() -> None:
    """Each stream may buffer up to its window while not reading, but together no more than
    `max_buffered`: the stream whose bytes would pass it is reset (flow_control)."""
    config = MuxConfig(window=64 << 10, initial_window=64 << 10, max_buffered=100 << 10)
    share = TunnelShare()
    a, b = Wire(config, share), Wire(config, share)  # two streams of one ingress tunnel
    for w in (a, b):
        w.open()
        w.ingress.pause_at = 1
        w.do(w.egress, w.egress.m.write(b"x"))
    first = payload(60 << 10, 1)
    a.do(a.egress, a.egress.m.write(first))  # held at the ingress: a is not reading
    assert share.buffered == len(first)
    b.do(b.egress, b.egress.m.write(payload(60 << 10, 2)))  # 120 KiB held: over the limit
    assert isinstance(b.egress.lost[0], StreamReset) and b.egress.lost[0].reason == "flow_control"
    assert share.buffered == len(first) <= config.max_buffered
    a.do(a.ingress, a.ingress.m.resume_reading())
    assert bytes(a.ingress.data) == b"x" + first and share.buffered == 0 and not a.egress.lost


def test_a_receiver_that_does_not_read_holds_one_window_and_the_writer_waits() -> None:
    config = MuxConfig(window=65536, initial_window=65536, frame_size=16384,
                       high_water=256 << 10, low_water=64 << 10)  # fmt: skip
    w = Wire(config)
    w.open()
    w.run(w.ingress, w.ingress.m.pause_reading())
    data = payload(1 << 20, 4)
    w.do(w.egress, w.egress.m.write(data))
    assert w.egress.pauses == 1  # above high water
    assert w.ingress.m.received == config.window and not w.ingress.data  # one window, held
    w.flush()
    assert w.ingress.m.received == config.window  # however long it waits
    w.do(w.ingress, w.ingress.m.resume_reading())
    w.do(w.egress, w.egress.m.write_eof())
    assert w.ingress.eof and bytes(w.ingress.data) == data and w.egress.resumes == 1


@pytest.mark.parametrize("reads", [True, False])
def test_windows_start_small_and_grow_while_the_stream_reads(reads: bool) -> None:
    """A stream starts with `initial_window` of credit; reading grows its window toward
    `window`; one that never reads holds only the initial one at the other end."""
    config = MuxConfig(window=1 << 20, initial_window=16 << 10, frame_size=16 << 10)
    w = Wire(config)
    w.open()
    if not reads:
        w.run(w.ingress, w.ingress.m.pause_reading())
    big = payload(4 << 20, 3)
    w.do(w.egress, w.egress.m.write(big))
    if reads:
        assert bytes(w.ingress.data) == big
        assert w.ingress.m.recv.window == config.window  # grown to the maximum
    else:
        assert w.ingress.m.received == config.initial_window and not w.ingress.data
        assert w.ingress.m.recv.window == config.initial_window


def test_reset_reaches_the_other_side_with_its_reason_and_later_calls_do_nothing() -> None:
    w = Wire()
    w.open()
    w.do(w.egress, w.egress.m.write(b"some bytes"))
    w.do(w.egress, w.egress.m.reset("policy", "the caller gave up"))
    assert w.egress.lost == [None]  # the side that resets is told without an error
    exc = w.ingress.lost[0]
    assert isinstance(exc, StreamReset)
    assert (exc.reason, exc.detail) == ("policy", "the caller gave up")
    frames = len(w.frames)
    w.do(w.egress, w.egress.m.reset("again") + w.egress.m.close() + w.egress.m.write(b"x"))
    assert len(w.frames) == frames and w.egress.m.closing


def test_the_tunnel_lost_ends_every_stream_once() -> None:
    w = Wire()
    opener = StreamMachine(3, SMALL, TunnelShare(), opening=True, clock=w.clock)
    opener.attach()
    got = opener.on_tunnel_lost(ConnectionResetError())
    assert got[0][0] is Op.ACCEPTED and got[0][1].reason == "tunnel_lost"
    assert got[-1][0] is Op.LOST and got[-1][1].reason == "tunnel_lost"
    w.open()
    w.do(w.ingress, w.ingress.m.close())
    w.run(w.ingress, w.ingress.m.on_tunnel_lost(None))
    assert w.ingress.lost == [None] and w.ingress.deadline is None  # told once; no timer left


@pytest.mark.parametrize(
    "setup",
    ["open", "paused", "pending", "closed_here", "fin_out", "peer_fin", "no_user", "no_credit"],
)
def test_the_shortcuts_decide_like_the_general_events(setup: str) -> None:
    """`send_now` / `receive_now` (the glue's way around a command list for the usual write
    and DATA frame) take exactly the cases where `write` / `on_data` would only send or
    deliver the bytes, and count them the same way."""

    def machine() -> StreamMachine:
        m = StreamMachine(1, SMALL, TunnelShare(), opening=False, clock=Clock())
        if setup != "no_user":
            m.attach()
        if setup == "paused":
            m.pause_reading()
        elif setup == "pending":
            m.write(b"p" * 5000)  # more than the window: some waits
        elif setup == "closed_here":
            m.close()
        elif setup == "fin_out":
            m.write_eof()
        elif setup == "peer_fin":
            m.on_fin()
        elif setup == "no_credit":
            m.write(b"c" * 4096)
        return m

    general, short = machine(), machine()
    expected = general.write(b"data")
    if short.send_now(4):
        assert expected == [(Op.DATA, b"data")]
    else:
        assert expected != [(Op.DATA, b"data")]
        assert short.write(b"data") == expected  # what the glue does then
    assert (short.sent, short.send.credit) == (general.sent, general.send.credit)
    general, short = machine(), machine()
    expected = general.on_data(b"in")
    if short.receive_now(2):
        assert expected == [(Op.DELIVER, b"in")]
    else:
        assert expected != [(Op.DELIVER, b"in")]
        assert short.on_data(b"in") == expected
    assert (short.received, short.recv.allowed) == (general.received, general.recv.allowed)
