"""A real resolver on loopback queried with dig/kdig: answers, flags, sections, TC, TCP."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from dns_helpers import dig, flags, needs_dig, needs_kdig, sample_table, section, status

from dns.wire import HEADER_LEN

pytestmark = [needs_dig, pytest.mark.timeout(60)]

GLOBAL = "global {\n  errors\n  global\n  cache 30\n}\n"


async def test_vip_answer_is_authoritative_and_keeps_rd(make_server) -> None:
    server = await make_server(GLOBAL)
    out = await dig(server.port, "reviews.default.global")
    assert status(out) == "NOERROR"
    assert {"qr", "aa", "rd", "ra"} <= flags(out)
    assert section(out, "ANSWER") == ["reviews.default.global. 30 IN A 240.240.0.5"]
    out = await dig(server.port, "+norec", "reviews.default.global")
    assert "rd" not in flags(out)


async def test_query_name_case_is_preserved(make_server) -> None:
    server = await make_server(GLOBAL)
    out = await dig(server.port, "ReViEwS.DeFaUlT.GlObAl")
    assert ";ReViEwS.DeFaUlT.GlObAl.\t\tIN\tA" in out
    assert section(out, "ANSWER")[0].endswith("IN A 240.240.0.5")


async def test_aaaa_cluster_pinned_and_srv(make_server) -> None:
    server = await make_server(GLOBAL)
    out = await dig(server.port, "billing.payments.global", "AAAA")
    assert section(out, "ANSWER") == ["billing.payments.global. 30 IN AAAA fd00:240::7"]
    out = await dig(server.port, "reviews.default.west.global")
    assert section(out, "ANSWER") == ["reviews.default.west.global. 30 IN A 240.240.2.5"]
    out = await dig(server.port, "_grpc._tcp.reviews.default.global", "SRV")
    assert section(out, "ANSWER") == [
        "_grpc._tcp.reviews.default.global. 30 IN SRV 0 100 9090 reviews.default.global."
    ]
    assert section(out, "ADDITIONAL") == ["reviews.default.global. 30 IN A 240.240.0.5"]


async def test_nxdomain_and_nodata_carry_the_soa(make_server) -> None:
    server = await make_server(GLOBAL)
    soa = "global. 30 IN SOA global. hostmaster.global. 1 7200 1800 86400 30"
    out = await dig(server.port, "nosuch.default.global")
    assert status(out) == "NXDOMAIN"
    assert section(out, "ANSWER") == []
    assert section(out, "AUTHORITY") == [soa]
    # Existing name, other type; and an empty non-terminal: NODATA, never NXDOMAIN.
    for args in (
        ("ratings.default.global", "AAAA"),
        ("default.global",),
        ("payments.global",),
        ("_tcp.reviews.default.global", "SRV"),
    ):
        out = await dig(server.port, *args)
        assert status(out) == "NOERROR", args
        assert section(out, "ANSWER") == [], args
        assert section(out, "AUTHORITY") == [soa], args


async def test_apex_and_outside_zone(make_server) -> None:
    server = await make_server(GLOBAL)
    out = await dig(server.port, "global", "NS")
    assert section(out, "ANSWER") == ["global. 30 IN NS global."]
    out = await dig(server.port, "global", "A")
    # Listening on 127.0.0.1: the apex (the NS target) answers with that address.
    assert section(out, "ANSWER") == ["global. 30 IN A 127.0.0.1"]
    out = await dig(server.port, "example.com")
    assert status(out) == "REFUSED"


async def test_new_table_is_served_after_publish(make_server, holder) -> None:
    server = await make_server(GLOBAL)
    out = await dig(server.port, "late.default.global")
    assert status(out) == "NXDOMAIN"
    from dns_helpers import route

    from federation.routing import RoutingTable

    holder.publish(RoutingTable.build(2, "east", "td", [route("late", "default", "240.240.9.9")]))
    out = await dig(server.port, "late.default.global")
    assert section(out, "ANSWER") == ["late.default.global. 30 IN A 240.240.9.9"]
    out = await dig(server.port, "global", "SOA")
    assert " 2 7200 1800 86400 30" in section(out, "ANSWER")[0]  # serial = table version


def _hosts_corefile(n: int) -> str:
    lines = "\n".join(f"    10.1.{i // 250}.{i % 250 + 1} big.example.org" for i in range(n))
    return f"example.org {{\n  hosts {{\n{lines}\n  }}\n}}\n"


async def test_truncation_and_tcp_fallback(make_server) -> None:
    server = await make_server(_hosts_corefile(60))  # 60 A records: ~1 KB
    out = await dig(server.port, "+noedns", "+ignore", "big.example.org")
    assert "tc" in flags(out)
    assert section(out, "ANSWER") == []
    # dig retries over TCP by itself when it sees TC.
    out = await dig(server.port, "+noedns", "big.example.org")
    assert "tc" not in flags(out)
    assert len(section(out, "ANSWER")) == 60
    # A 4096-byte EDNS buffer fits it over UDP; a 512-byte one does not.
    out = await dig(server.port, "+bufsize=4096", "+ignore", "big.example.org")
    assert "tc" not in flags(out) and len(section(out, "ANSWER")) == 60
    out = await dig(server.port, "+bufsize=512", "+ignore", "big.example.org")
    assert "tc" in flags(out)
    assert "udp: 1232" in out  # OPT kept in the truncated reply
    out = await dig(server.port, "+tcp", "big.example.org")
    assert len(section(out, "ANSWER")) == 60


@needs_kdig
async def test_kdig_over_udp_and_tcp(make_server) -> None:
    from dns_helpers import KDIG

    server = await make_server(GLOBAL)
    for proto in ("+notcp", "+tcp"):
        out = await dig(server.port, proto, "reviews.default.global", tool=KDIG)
        assert "NOERROR" in out
        assert "240.240.0.5" in out


async def test_ipv6_listener(make_server) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = await make_server(GLOBAL, listen="127.0.0.1:0,[::1]:0")
    for addr in ("127.0.0.1", "::1"):
        out = await dig(server.port, "reviews.default.global", server=addr)
        assert section(out, "ANSWER") == ["reviews.default.global. 30 IN A 240.240.0.5"]
        out = await dig(server.port, "+tcp", "reviews.default.global", server=addr)
        assert section(out, "ANSWER") == ["reviews.default.global. 30 IN A 240.240.0.5"]


def _udp_exchange(port: int, payload: bytes, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


async def test_bad_input_gets_formerr_or_silence_and_server_lives(make_server) -> None:
    server = await make_server(GLOBAL)
    good = bytes.fromhex("abcd01000001000000000000") + b"\x07reviews\x07default\x06global\x00"
    good += struct.pack(">HH", 1, 1)
    cases = {
        b"\x00": None,  # shorter than a header: dropped
        good[:HEADER_LEN] + b"\x07rev": 1,  # truncated name: FORMERR
        good[:4] + b"\x00\x00" + good[6:]: 1,  # zero questions
        good[:4] + b"\x00\x02" + good[6:]: 1,  # two questions claimed, one present
        good[:HEADER_LEN] + b"\xc0\x0c" + good[-4:]: 1,  # compression loop in the question
        good[:HEADER_LEN] + b"\x40" + b"a" * 64 + b"\x00" + good[-4:]: 1,  # label > 63
        good[:HEADER_LEN] + (b"\x3f" + b"a" * 63) * 5 + b"\x00" + good[-4:]: 1,  # name > 255
        good[:2] + b"\x81\x00" + good[4:]: None,  # a response: never answered
        good[:2] + b"\x78\x00" + good[4:]: 4,  # opcode 15: NOTIMP
        good[: HEADER_LEN - 2] + b"\x00\x01" + good[HEADER_LEN:]: 1,  # OPT promised, missing
    }
    for payload, rcode in cases.items():
        reply = await asyncio.to_thread(
            _udp_exchange, server.port, payload, 0.5 if rcode is None else 2
        )
        if rcode is None:
            assert reply is None, payload
        else:
            assert reply is not None and reply[:2] == payload[:2], payload
            assert reply[3] & 0x0F == rcode, payload
    # Unknown class: answered, not crashed.
    chaos = good[:-2] + b"\x00\x03"
    reply = await asyncio.to_thread(_udp_exchange, server.port, chaos)
    assert reply is not None and reply[3] & 0x0F == 5
    out = await dig(server.port, "reviews.default.global")
    assert status(out) == "NOERROR"


async def test_edns_version_1_is_badvers(make_server) -> None:
    server = await make_server(GLOBAL)
    out = await dig(server.port, "+edns=1", "+noednsnegotiation", "reviews.default.global")
    assert status(out) == "BADVERS"


async def test_two_servers_in_one_process_keep_their_tables(make_server) -> None:
    from federation.routing import TableHolder

    other = TableHolder()
    other.publish(sample_table(1))
    a = await make_server(GLOBAL, listen="127.0.1.1:0")
    b = await make_server(GLOBAL, listen="127.0.2.1:0", tables=other)
    out_a = await dig(a.port, "reviews.default.global", server="127.0.1.1")
    out_b = await dig(b.port, "reviews.default.global", server="127.0.2.1")
    assert section(out_a, "ANSWER") == section(out_b, "ANSWER")
