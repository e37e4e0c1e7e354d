"""The UDP fast path (dns.fastpath) against the full path, the global index built in steps,
and the directly-read UDP sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
from dns_helpers import query_bytes, route, sample_table
from dnslib import EDNS0, QTYPE, RR, A, DNSRecord
from hypothesis import HealthCheck, given, settings
from prometheus_client import REGISTRY
from test_dns_wire import fuzz_inputs

from dns.fastpath import plan_of
from dns.plugins.cache import CachePlugin
from dns.plugins.globalzone import SYNC_SERVICES, GlobalPlugin, build_index
from dns.transport import Mux
from dns.wire import parse_query, text_to_wire
from federation.routing import RoutingTable, TableHolder

pytestmark = pytest.mark.timeout(120)

FAST = """global {
    errors
    cache 30
    global
}
example.org {
    cache 30
    forward . 127.0.0.1:9
}
observed.global {
    log
    global
}
"""


def full(mux: Mux, data: bytes) -> bytes | None:
    out: list[bytes] = []
    mux.datagram(data, ("127.0.0.1", 5300), lambda r, a: out.append(r))
    return out[0] if out else None


def example_cache(mux: Mux) -> CachePlugin:
    """The cache of the example.org block (in front of its forwarder)."""
    cache = plan_of(mux.zones[text_to_wire("example.org.")])[0]
    assert isinstance(cache, CachePlugin)
    return cache


def edns_query(name: str, qtype: str = "A", size: int = 1232, do: bool = False) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.add_ar(EDNS0(udp_len=size, flags="do" if do else ""))
    return bytes(q.pack())


QUERIES = [
    query_bytes("reviews.default.global"),
    query_bytes("ReViEwS.DeFault.GLOBAL", msg_id=99),
    query_bytes("reviews.default.global", rd=False),
    query_bytes("reviews.default.west.global", 1),
    query_bytes("billing.payments.global", 28),
    query_bytes("reviews.default.global", 28),  # NODATA
    query_bytes("default.global"),  # empty non-terminal: NODATA
    query_bytes("_http._tcp.reviews.default.global", 33),
    query_bytes("reviews.default.global", 255),
    query_bytes("global", 6),
    edns_query("reviews.default.global"),
    edns_query("_grpc._tcp.reviews.default.east.global", "SRV", do=True),
    edns_query("reviews.default.global", "ANY", size=512),
]


async def test_fast_answers_equal_the_full_path(make_server) -> None:
    server = await make_server(FAST, listen="127.0.60.1:0")
    mux = server.mux()
    assert mux.fast.answer(QUERIES[0]) is None  # nothing asked yet: nothing stored
    for q in QUERIES:
        before = mux.fast.answer(q)  # known already if asked in another case or ID
        expected = full(mux, q)
        assert expected is not None and before in (None, expected)
        assert mux.fast.answer(q) == expected  # through the plan
        assert mux.fast.answer(q) == expected  # replayed
        again = bytes([q[0] ^ 0xFF, q[1]]) + q[2:]  # another ID
        assert mux.fast.answer(again) == again[:2] + expected[2:]


async def test_fast_path_leaves_the_rest_to_the_full_path(make_server) -> None:
    server = await make_server(FAST, listen="127.0.60.2:0")
    mux = server.mux()
    others = [
        query_bytes("nothere.default.global"),  # NXDOMAIN is not remembered
        query_bytes("reviews.default.global", 65),  # HTTPS: a type byte lower() would change
        query_bytes("reviews.observed.global"),  # a block with `log`: every query is seen
        edns_query("reviews.default.global")[:-3],  # OPT cut short: FORMERR
        query_bytes("reviews.default.global")[:-2],
        b"\x12\x34\x81\x00" + query_bytes("reviews.default.global")[4:],  # a response
        b"\x12\x34\x29\x00" + query_bytes("reviews.default.global")[4:],  # opcode UPDATE
    ]
    for q in others:
        full(mux, q)
        assert mux.fast.answer(q) is None, q
    ch = bytearray(query_bytes("reviews.default.global"))
    ch[-1] = 3  # class CH: REFUSED by the full path
    full(mux, bytes(ch))
    assert mux.fast.answer(bytes(ch)) is None


async def test_plans_follow_the_chain(make_server) -> None:
    server = await make_server(FAST, listen="127.0.60.3:0")
    plans = {
        zone: [p.name for p in plan_of(handler)] for zone, handler in server.mux().zones.items()
    }
    assert plans == {
        text_to_wire("global."): ["cache", "global"],  # errors is transparent
        text_to_wire("example.org."): ["cache"],  # forward must see its queries
        text_to_wire("observed.global."): [],  # log must see every query
    }


async def test_truncation_on_the_fast_path(make_server) -> None:
    server = await make_server(FAST, listen="127.0.60.4:0")
    mux = server.mux()
    cache = example_cache(mux)
    q = query_bytes("many.example.org")
    upstream = DNSRecord.parse(q).reply()
    for i in range(40):  # 40 A records do not fit 512 octets: TC, as the full path does
        upstream.add_answer(RR("many.example.org", QTYPE.A, rdata=A(f"10.0.0.{i}"), ttl=300))
    cache.store(parse_query(q), upstream.pack(), time.monotonic())
    expected = full(mux, q)
    assert expected is not None and expected[2] & 0x02
    assert mux.fast.answer(q) == expected
    big = edns_query("many.example.org", size=4096)
    expected = full(mux, big)
    assert expected is not None and not expected[2] & 0x02 and len(expected) > 512
    fast = mux.fast.answer(big)  # the same but for TTLs, should a second have passed
    assert fast is not None and fast[:12] == expected[:12] and len(fast) == len(expected)


async def test_a_new_table_is_never_replayed_stale(make_server, holder) -> None:
    server = await make_server(FAST, listen="127.0.60.5:0")
    mux = server.mux()
    q = query_bytes("ratings.default.global")
    old = full(mux, q)
    assert mux.fast.answer(q) == old
    holder.publish(RoutingTable.build(2, "east", "td", [route("ratings", "default", "240.1.1.1")]))
    assert mux.fast.answer(q) is None  # the replay's stamp is the old index
    new = full(mux, q)
    assert new != old and str(DNSRecord.parse(new).rr[0].rdata) == "240.1.1.1"
    assert mux.fast.answer(q) == new


def _sample(name: str, labels: dict[str, str]) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


async def test_cache_hits_on_the_fast_path_count_and_count_down(make_server) -> None:
    server = await make_server(FAST, listen="127.0.60.6:0")
    mux = server.mux()
    cache = example_cache(mux)
    q = query_bytes("www.example.org", msg_id=7)
    upstream = DNSRecord.parse(q).reply()
    upstream.add_answer(RR("www.example.org", QTYPE.A, rdata=A("10.9.9.9"), ttl=300))
    now = time.monotonic()
    cache.store(parse_query(q), upstream.pack(), now)
    entry = cache.success.entries[parse_query(q).key]
    hits = {"server": cache.server, "type": "success"}
    before = _sample("isthmus_dns_cache_hits_total", hits)

    mux.fast.clock = lambda: entry.stored + 12.5
    first = mux.fast.answer(q)
    assert first == entry.render_at(parse_query(q), entry.stored + 12.5)
    assert mux.fast.answer(q) == first  # replayed within the same second
    assert _sample("isthmus_dns_cache_hits_total", hits) == before + 2
    mux.fast.clock = lambda: entry.stored + 13.5
    later = mux.fast.answer(q)
    assert later is not None and DNSRecord.parse(later).rr[0].ttl == 300 - 13
    cache.success.drop(parse_query(q).key)
    assert mux.fast.answer(q) is None  # dropped: the forwarder would be asked
    mux.fast.clock = lambda: entry.stored + 400
    cache.store(parse_query(q), upstream.pack(), now)
    assert mux.fast.answer(q) is None  # expired: the full path drops it


async def test_cache_misses_in_front_of_global_are_counted_once(make_server) -> None:
    server = await make_server(FAST, listen="127.0.60.7:0")
    mux = server.mux()
    cache = next(p for p in server.plugins if isinstance(p, CachePlugin))
    misses = {"server": cache.server}
    q = query_bytes("reviews.default.global")
    before = _sample("isthmus_dns_cache_misses_total", misses)
    full(mux, q)
    mux.fast.answer(q)
    mux.fast.answer(q)
    assert _sample("isthmus_dns_cache_misses_total", misses) == before + 3


async def test_fuzz_fast_path_agrees_with_the_full_path(make_server) -> None:
    server = await make_server(FAST, listen="127.0.60.8:0")
    mux = server.mux()
    for q in QUERIES:
        full(mux, q)  # something to be found

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=fuzz_inputs)
    def run(data: bytes) -> None:
        expected = full(mux, data)
        fast = mux.fast.answer(data)
        assert fast is None or fast == expected

    run()


def _big_table(version: int, services: int) -> RoutingTable:
    return RoutingTable.build(
        version,
        "east",
        "td",
        [route(f"s{i}", "big", f"240.{i >> 16}.{i >> 8 & 255}.{i & 255}") for i in range(services)],
    )


async def test_large_tables_are_indexed_in_steps_and_the_newest_wins() -> None:
    holder = TableHolder()
    holder.publish(sample_table(1))
    plugin = GlobalPlugin("global.", 30, holder)
    await plugin.start()
    try:
        assert plugin.index.version == 1
        holder.publish(_big_table(2, SYNC_SERVICES + 1500))
        # Not indexed inside publish: the old index serves until the steps are done.
        assert plugin.index.version == 1
        ticks = 0
        while plugin.index.version != 2:
            await asyncio.sleep(0)
            ticks += 1
        assert ticks > 1  # the loop ran between steps
        assert plugin.index.answers(text_to_wire(f"s{SYNC_SERVICES}.big.global.")) is not None

        holder.publish(_big_table(3, SYNC_SERVICES + 1500))
        holder.publish(sample_table(4))  # small: indexed at once, before 3 finishes
        assert plugin.index.version == 4
        assert plugin._builder is not None
        await plugin._builder
        assert plugin.index.version == 4  # the older, larger table never replaces it
    finally:
        await plugin.stop()


def test_index_is_lazy_but_complete() -> None:
    zone = text_to_wire("global.")
    index = build_index(sample_table(), zone, 30)
    assert len(index.encoded) == 1  # only the apex is encoded up front
    for name in list(index.specs):
        index.answers(name)
    assert set(index.encoded) == set(index.specs)
    assert index.answers(text_to_wire("_tcp.reviews.default.west.global.")) == {}
    assert index.answers(text_to_wire("west.global.")) == {}
    assert index.answers(text_to_wire("nothere.global.")) is None


async def test_udp_socket_drains_a_burst(make_server) -> None:
    server = await make_server(FAST, listen="127.0.60.9:0")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(("127.0.60.9", server.port))
        burst = 200
        for i in range(burst):  # every one queued before the server reads any
            s.send(query_bytes("reviews.default.global", msg_id=i))
        s.send(b"\x00\x01")  # too short: dropped, the rest still served
        s.send(query_bytes("reviews.default.global", msg_id=burst)[:-1])  # FORMERR
        ids = set()
        rcodes = []
        deadline = loop.time() + 20
        while len(ids) < burst + 1 and loop.time() < deadline:
            data = await asyncio.wait_for(loop.sock_recv(s, 4096), 10)
            ids.add(struct.unpack(">H", data[:2])[0])
            rcodes.append(data[3] & 0x0F)
    assert ids == set(range(burst + 1))
    assert rcodes.count(1) == 1 and rcodes.count(0) == burst
