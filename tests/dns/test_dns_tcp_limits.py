"""The resolver's TCP listener shares its connections by source: one address holding as many
connections as it can open never keeps another address's TCP queries out."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import struct
from collections.abc import Iterator

import dnslib
import pytest
from dns_helpers import dig, needs_dig, section

pytestmark = [needs_dig, pytest.mark.timeout(60)]

GLOBAL = "global {\n  errors\n  global\n}\n"
ANSWER = ["reviews.default.global. 30 IN A 240.240.0.5"]
HOLDER = "127.0.0.2"  # the source that holds connections
OTHERS = ("127.0.0.3", "127.0.9.9")  # other local sources (all of 127/8 is loopback)
# More than the listener's total before the per-source cap existed (1,000).
HOLD = 1010


@pytest.fixture
def open_files() -> Iterator[None]:
    """Room for HOLD connections at both ends in this process (soft limit up to the hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * HOLD + 256
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _query(name: str = "reviews.default.global") -> bytes:
    wire = dnslib.DNSRecord.question(name).pack()
    return struct.pack(">H", len(wire)) + wire


async def _connect(source: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.bind((source, 0))
        await loop.sock_connect(s, ("127.0.0.1", port))
    except BaseException:
        s.close()
        raise
    return s


async def _exchange(s: socket.socket, timeout: float = 3.0) -> bytes | None:
    """One query on a held connection: the reply's message, or None when the server closed
    (or reset) the connection."""
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(s, _query())
        head = await asyncio.wait_for(loop.sock_recv(s, 2), timeout)
        if len(head) < 2:
            return None
        (length,) = struct.unpack(">H", head)
        data = b""
        while len(data) < length:
            chunk = await asyncio.wait_for(loop.sock_recv(s, length - len(data)), timeout)
            if not chunk:
                return None
            data += chunk
        return data
    except (ConnectionError, BrokenPipeError):
        return None


def _still_open(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True  # nothing to read, not closed
    except OSError:
        return False  # reset


async def test_one_source_holding_connections_does_not_keep_others_out(
    make_server, open_files: None
) -> None:
    server = await make_server(GLOBAL)
    held: list[socket.socket] = []
    try:
        for _ in range(HOLD):
            held.append(await _connect(HOLDER, server.port))
        # The server takes connections in order: once the last one has been dealt with (an
        # answer or a close), so have all the others.
        await _exchange(held[-1])
        for source in OTHERS:
            out = await dig(server.port, "+tcp", "-b", source, "reviews.default.global")
            assert section(out, "ANSWER") == ANSWER, (source, out)
        # The holder keeps what it may hold, and those connections are served.
        from dns.transport import TcpLimits

        cap = TcpLimits().max_connections_per_source
        still = [s for s in held if _still_open(s)]
        assert len(still) == cap, (len(still), cap)
        reply = await _exchange(still[0])
        assert reply is not None and dnslib.DNSRecord.parse(reply).rr, reply
    finally:
        for s in held:
            s.close()


async def test_the_total_and_per_source_caps_are_configurable(make_server) -> None:
    from dns.transport import TcpLimits

    server = await make_server(
        GLOBAL, tcp_limits=TcpLimits(max_connections=5, max_connections_per_source=2)
    )
    held: dict[str, list[socket.socket]] = {}
    try:
        # three sources of three connections each: two each are kept, up to five in all
        for i, source in enumerate(("127.0.1.1", "127.0.1.2", "127.0.1.3")):
            held[source] = [await _connect(source, server.port) for _ in range(3)]
            await _exchange(held[source][-1])  # dealt with (refused: over the source's cap)
            await asyncio.sleep(0)
            kept = [s for s in held[source] if _still_open(s)]
            assert len(kept) == (2 if i < 2 else 1), (source, len(kept))
        # the total is reached: a new source is refused too, until a connection closes
        refused = await _connect("127.0.1.4", server.port)
        held["127.0.1.4"] = [refused]
        assert await _exchange(refused) is None
        first = held["127.0.1.1"][0]
        first.close()
        held["127.0.1.1"].remove(first)
        for _ in range(50):  # the server notices the close on its next read
            out = await dig(server.port, "+tcp", "-b", "127.0.1.4", "reviews.default.global")
            if section(out, "ANSWER") == ANSWER:
                break
            await asyncio.sleep(0.1)
        assert section(out, "ANSWER") == ANSWER, out
    finally:
        for socks in held.values():
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()
