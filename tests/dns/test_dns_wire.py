"""Wire parsing and the whole query path without sockets, plus fuzzing for bad input."""

from __future__ import annotations

import os
import struct

import pytest
from dns_helpers import query_bytes
from dnslib import EDNS0, QTYPE, RR, A, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dns.errors import WireError
from dns.wire import (
    FORMERR,
    MAX_UDP_SIZE,
    NOTIMP,
    PLAIN_UDP_SIZE,
    QueryError,
    name_to_text,
    parse_query,
    scan_message,
    text_to_wire,
    truncate,
)

GLOBAL = """global {
    errors
    prometheus
    log
    cache 30
    global
}
example.org {
    rewrite name exact alias.example.org. www.example.org. answer auto
    hosts {
        10.0.0.80 www.example.org
        2001:db8::80 www.example.org
    }
}
"""


def test_parse_query_reads_question_and_edns() -> None:
    q = DNSRecord.question("ReViews.default.global", "AAAA")
    q.add_ar(EDNS0(udp_len=4000, flags="do"))
    req = parse_query(q.pack(), "udp", ("127.0.0.1", 5000))
    assert req.name == "ReViews.default.global."
    assert req.qlower == text_to_wire("reviews.default.global")
    assert (req.qtype, req.qclass, req.edns, req.do, req.udp_size) == (28, 1, True, True, 4000)
    assert req.max_size == 4000
    big = DNSRecord.question("a.b")
    big.add_ar(EDNS0(udp_len=65000))
    assert parse_query(big.pack()).max_size == MAX_UDP_SIZE
    assert parse_query(DNSRecord.question("a.b").pack()).max_size == PLAIN_UDP_SIZE
    assert parse_query(DNSRecord.question("a.b").pack(), "tcp").max_size == 65535


@pytest.mark.parametrize(
    ("mutate", "rcode"),
    [
        (lambda b: b[:12], FORMERR),  # header only, qdcount 1
        (lambda b: b[:2] + b"\x28\x00" + b[4:], NOTIMP),  # opcode 5 (UPDATE)
        (lambda b: b[:6] + b"\x00\x01" + b[8:], FORMERR),  # an answer in a query
        (lambda b: b[:-1], FORMERR),  # class cut short
    ],
)
def test_malformed_queries_get_an_rcode(mutate, rcode: int) -> None:
    data = mutate(query_bytes("reviews.default.global"))
    with pytest.raises(QueryError) as info:
        parse_query(data)
    assert info.value.reply is not None
    assert info.value.reply[:2] == data[:2] and info.value.reply[3] & 0x0F == rcode


def test_truncate_keeps_question_and_opt() -> None:
    q = DNSRecord.question("big.example.org")
    q.add_ar(EDNS0(udp_len=1232))
    req = parse_query(q.pack())
    reply = q.reply()
    for i in range(100):
        reply.add_answer(RR("big.example.org", QTYPE.A, rdata=A(f"10.0.0.{i}"), ttl=60))
    cut = DNSRecord.parse(truncate(reply.pack(), req))
    assert cut.header.tc and not cut.rr and len(cut.ar) == 1
    assert str(cut.q.qname) == "big.example.org."


def test_names_round_trip() -> None:
    for name in ("a.b.", "x\\.y.example.", "sp\\032ace.example.", "."):
        assert name_to_text(text_to_wire(name), 0) == name
    with pytest.raises(ValueError):
        text_to_wire("a" * 64 + ".example")
    with pytest.raises(ValueError):
        text_to_wire(".".join(["abcdefghi"] * 30))


def test_scan_message_rejects_truncation() -> None:
    reply = DNSRecord.question("a.example").reply()
    reply.add_answer(RR("a.example", QTYPE.A, rdata=A("10.0.0.1"), ttl=60))
    data = reply.pack()
    scan_message(data)
    with pytest.raises(WireError):
        scan_message(data[:-3] if len(data) > 20 else b"\x00" * 5)


async def _pipeline(make_server):
    server = await make_server(GLOBAL, listen="127.0.20.1:0")
    mux = server.mux()
    replies: list[bytes] = []
    return mux, replies


async def test_whole_path_without_sockets(make_server) -> None:
    mux, replies = await _pipeline(make_server)
    send = lambda data, addr: replies.append(data)  # noqa: E731
    mux.datagram(query_bytes("reviews.default.global"), ("127.0.0.1", 1), send)
    mux.datagram(query_bytes("alias.example.org", 28), ("127.0.0.1", 1), send)
    a, alias = (DNSRecord.parse(r) for r in replies)
    assert str(a.rr[0].rdata) == "240.240.0.5"
    assert str(alias.q.qname) == "alias.example.org."
    assert [(str(r.rname), QTYPE[r.rtype], str(r.rdata)) for r in alias.rr] == [
        ("alias.example.org.", "AAAA", "2001:db8::80")
    ]


def _valid_queries() -> st.SearchStrategy[bytes]:
    names = st.sampled_from(
        [
            "reviews.default.global",
            "default.global",
            "global",
            "x.y.z.global",
            "_http._tcp.reviews.default.global",
            "www.example.org",
            "alias.example.org",
            "example.com",
            ".",
        ]
    )
    qtypes = st.sampled_from([1, 2, 6, 28, 33, 255, 252, 16, 65535])
    return st.builds(lambda n, t, i: query_bytes(n, t, i), names, qtypes, st.integers(0, 0xFFFF))


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    pos = st.integers(0, max(len(data) - 1, 0))
    return st.one_of(
        st.just(data),
        st.builds(lambda p, b: data[:p] + bytes([b]) + data[p + 1 :], pos, st.integers(0, 255)),
        st.builds(lambda p: data[:p], pos),
        st.builds(lambda p, junk: data[:p] + junk + data[p:], pos, st.binary(max_size=40)),
        st.builds(
            lambda c: data[:4] + struct.pack(">HHHH", *c) + data[12:],
            st.tuples(*[st.integers(0, 0xFFFF)] * 4),
        ),
    )


fuzz_inputs = st.one_of(st.binary(max_size=600), _valid_queries().flatmap(_mutations))


def _check_reply(data: bytes, reply: bytes) -> None:
    assert reply[:2] == data[:2]
    assert reply[2] & 0x80  # QR
    # Every reply is a well-formed message (walked by our own scanner: dnslib rejects the
    # non-ASCII label bytes that DNS allows and that the fuzzer echoes back).
    shape = scan_message(reply)
    assert shape.qend <= len(reply)
    if all(32 < c < 127 or c < 64 for c in reply[12 : shape.qend]):
        DNSRecord.parse(reply)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=fuzz_inputs)
def test_fuzz_parse_query_only_raises_query_error(data: bytes) -> None:
    try:
        req = parse_query(data)
    except QueryError as e:
        if e.reply is not None:
            _check_reply(data, e.reply)
        return
    assert req.qend <= len(data)


async def _fuzz_pipeline(make_server, examples: int) -> None:
    mux, replies = await _pipeline(make_server)

    @settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(data=fuzz_inputs)
    def run(data: bytes) -> None:
        replies.clear()
        mux.datagram(data, ("127.0.0.1", 53), lambda r, a: replies.append(r))
        for r in replies:
            _check_reply(data, r)
        assert len(replies) <= 1

    run()


async def test_fuzz_whole_path(make_server) -> None:
    await _fuzz_pipeline(make_server, 1000)


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_fuzz_whole_path_long(make_server) -> None:
    """The long run documented in docs/dns.md (ISTHMUS_DNS_FUZZ_EXAMPLES, default 200,000)."""
    await _fuzz_pipeline(make_server, int(os.environ.get("ISTHMUS_DNS_FUZZ_EXAMPLES", "200000")))
