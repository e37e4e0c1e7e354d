"""Playbooks for the HTTP/1.1 engine (gateway/l7/engine.py): event sequences and the commands
each must give back, with an injected clock and no sockets.

The balancer, the retry budget and the routing table are the real (sans-IO) ones, seeded; a
step's expected commands are compared exactly, except where a step says which of two
targets it may open (`One(...)`).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from discovery.names import ServiceKey
from federation.routing import Destination, Endpoint, RoutingTable, ServiceRoute, TableHolder
from gateway.balancer import Balancer, OutlierPolicy
from gateway.l7.config import HttpConfig
from gateway.l7.engine import Cmd, H1Engine, H1Proxy, Phase, UpstreamKey, error_response
from gateway.retry import RetryPolicy

VIP = "127.240.0.1"
PORT = 80
K1 = UpstreamKey("10.0.0.1", 8080)
K2 = UpstreamKey("10.0.0.2", 8080)
W = Cmd.WRITE_CLIENT
OPEN = Cmd.OPEN_UPSTREAM
SEND = Cmd.WRITE_UPSTREAM
RELEASE = Cmd.RELEASE_UPSTREAM
CLOSE = Cmd.CLOSE_CLIENT
ARM = Cmd.ARM_DEADLINE
GET = b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
PER_TRY = 15.0
IDLE = 75.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class One:
    """Equal to any one of `options`; remembers which (a balancer pick between targets)."""

    def __init__(self, *options: object) -> None:
        self.options = options
        self.seen: object = None

    def __eq__(self, other: object) -> bool:
        if other in self.options:
            self.seen = other
            return True
        return False

    def __repr__(self) -> str:
        return f"One{self.options}"


@dataclass
class Bench:
    engine: H1Engine
    proxy: H1Proxy
    clock: Clock
    service: str
    log: list[tuple[str, object]] = field(default_factory=list)

    def step(self, event: str, *args: object, expect: list[tuple[object, ...]]) -> None:
        got = getattr(self.engine, event)(*args)
        assert got == expect, f"after {event}{args!r}:\n got    {got!r}\n wanted {expect!r}"

    def new_connection(self) -> H1Engine:
        self.engine = H1Engine(self.proxy, (VIP, PORT))
        return self.engine

    def requests(self, outcome: str, cluster: str = "east") -> float:
        """Requests counted; the gateway's own answers count under cluster "none" (the route
        was not pinned to a cluster)."""
        return REGISTRY.get_sample_value(
            "isthmus_requests_total",
            {"gateway": "egress", "source_cluster": "east", "destination_service": self.service,
             "destination_cluster": cluster, "outcome": outcome},
        ) or 0.0  # fmt: skip


_names = iter(range(10_000))


def bench(
    endpoints: int = 2, retry: RetryPolicy | None = None, budget: float = 10.0, **http: object
) -> Bench:
    """An engine on a fresh connection to a service with `endpoints` local endpoints."""
    name = f"svc{next(_names)}"
    eps = tuple(Endpoint(f"w{i + 1}", f"10.0.0.{i + 1}", {"http": 8080}) for i in range(endpoints))
    route = ServiceRoute(
        ServiceKey(name), ipaddress.ip_address(VIP), {"http": PORT},
        (Destination("east", True, healthy=len(eps), total=len(eps), endpoints=eps),),
    )  # fmt: skip
    table = RoutingTable.build(1, "east", "mesh.test", [route])
    clock = Clock()
    balancer = Balancer(OutlierPolicy(consecutive_failures=100), random.Random(1), clock)
    config = HttpConfig(retry=retry or RetryPolicy(per_try_timeout=PER_TRY),
                        budget_min_per_second=budget, **http)  # type: ignore[arg-type]  # fmt: skip
    proxy = H1Proxy(config, TableHolder(table), balancer, lambda: "east", clock)
    return Bench(H1Engine(proxy, (VIP, PORT)), proxy, clock, f"{name}.default")


def test_a_request_is_served_on_a_kept_upstream_and_counted() -> None:
    b = bench(endpoints=1)
    t = b.clock.now
    b.step("start", expect=[(ARM, t + IDLE)])
    b.step("client_data", GET, expect=[(OPEN, K1), (ARM, t + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, GET)])
    b.clock.now += 0.004
    b.step("upstream_data", OK, expect=[(W, OK), (RELEASE, True), (ARM, b.clock.now + IDLE)])
    assert b.engine.phase is Phase.IDLE
    assert b.requests("ok") == 1
    assert (
        b.proxy.balancer.outstanding(
            b.proxy.balancer.pick(
                b.proxy.tables.current.services[ServiceKey(b.service.split(".")[0])]
            ).target
        )
        == 0
    )


def test_hop_by_hop_and_isthmus_fields_are_stripped_both_ways() -> None:
    b = bench(endpoints=1)
    request = (b"GET / HTTP/1.1\r\nHost: s\r\nX-Isthmus-Cluster: west\r\nConnection: keep-alive, "
               b"X-Drop\r\nX-Drop: 1\r\nTE: trailers\r\nX-Keep: 1\r\n\r\n")  # fmt: skip
    b.step("client_data", request, expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, b"GET / HTTP/1.1\r\nHost: s\r\nX-Keep: 1\r\n\r\n")])
    response = (
        b"HTTP/1.1 200 OK\r\nKeep-Alive: 5\r\nContent-Length: 0\r\nX-Isthmus-Error: x\r\n\r\n"
    )
    b.step("upstream_data", response, expect=[
        (W, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Isthmus-Error: x\r\n\r\n"),
        (RELEASE, True), (ARM, b.clock.now + IDLE),
    ])  # fmt: skip


def test_pipelined_requests_are_served_in_order_and_heads_split_anywhere() -> None:
    b = bench(endpoints=1)
    second = b"HEAD /b HTTP/1.1\r\nHost: svc\r\n\r\n"
    b.step("client_data", GET + second[:7], expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("client_data", second[7:], expect=[])
    b.step("upstream_connected", expect=[(SEND, GET)])
    b.step("upstream_data", OK[:20], expect=[])
    b.step("upstream_data", OK[20:], expect=[
        (W, OK), (RELEASE, True), (ARM, b.clock.now + IDLE),
        (OPEN, K1), (ARM, b.clock.now + PER_TRY),
    ])  # fmt: skip
    b.step("upstream_connected", expect=[(SEND, second)])
    head_response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"  # no body: a HEAD
    b.step("upstream_data", head_response, expect=[
        (W, head_response), (RELEASE, True), (ARM, b.clock.now + IDLE),
    ])  # fmt: skip


def test_a_connect_failure_is_retried_on_the_other_target() -> None:
    b = bench()
    first = One(K1, K2)
    b.step("client_data", GET, expect=[(OPEN, first), (ARM, b.clock.now + PER_TRY)])
    other = K2 if first.seen == K1 else K1
    b.clock.now += 1
    b.step("upstream_failed", "refused", expect=[(OPEN, other), (ARM, b.clock.now + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, GET)])
    b.step("upstream_data", OK, expect=[(W, OK), (RELEASE, True), (ARM, b.clock.now + IDLE)])
    assert b.proxy.retries == 1 and b.requests("ok") == 1


def test_a_retriable_5xx_is_tried_elsewhere_and_a_post_is_not() -> None:
    b = bench()
    b.step("client_data", GET, expect=[(OPEN, One(K1, K2)), (ARM, b.clock.now + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, GET)])
    unavailable = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
    b.step(
        "upstream_data",
        unavailable,
        expect=[(RELEASE, False), (OPEN, One(K1, K2)), (ARM, b.clock.now + PER_TRY)],
    )
    b.step("upstream_connected", expect=[(SEND, GET)])
    b.step("upstream_data", OK, expect=[(W, OK), (RELEASE, True), (ARM, b.clock.now + IDLE)])

    post = b"POST /p HTTP/1.1\r\nHost: s\r\nContent-Length: 1\r\n\r\nx"
    b.step("client_data", post, expect=[(OPEN, One(K1, K2)), (ARM, b.clock.now + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, post)])
    b.step("upstream_data", unavailable, expect=[
        (RELEASE, False), (W, error_response(503, "upstream answered 503")),
        (ARM, b.clock.now + IDLE),
    ])  # fmt: skip
    assert b.requests("5xx", "none") == 1 and b.proxy.retries == 1


def test_per_try_deadlines_and_the_last_failure_is_the_answer() -> None:
    b = bench(retry=RetryPolicy(attempts=2, per_try_timeout=PER_TRY))
    t = b.clock.now
    b.step("client_data", GET, expect=[(OPEN, One(K1, K2)), (ARM, t + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, GET)])
    b.step("timer", t + PER_TRY - 0.1, expect=[])  # not yet
    b.clock.now = t + PER_TRY
    b.step(
        "timer",
        b.clock.now,
        expect=[(RELEASE, False), (OPEN, One(K1, K2)), (ARM, b.clock.now + PER_TRY)],
    )
    b.step("upstream_connected", expect=[(SEND, GET)])
    b.step("upstream_data", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart", expect=[])
    b.clock.now += PER_TRY  # a small body is read whole: still under the deadline
    b.step("timer", b.clock.now, expect=[
        (RELEASE, False), (W, error_response(504, "upstream timed out")), (ARM, b.clock.now + IDLE),
    ])  # fmt: skip


def test_an_empty_retry_budget_answers_the_first_failure() -> None:
    b = bench(budget=0.0)
    b.step("client_data", GET, expect=[(OPEN, One(K1, K2)), (ARM, b.clock.now + PER_TRY)])
    b.step("upstream_failed", "refused", expect=[
        (W, error_response(502, "upstream failed: refused")), (ARM, b.clock.now + IDLE),
    ])  # fmt: skip
    assert b.proxy.retries == 0 and b.requests("connect_error", "none") == 1


def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded() -> None:
    b = bench(endpoints=1)
    head = b"PUT /x HTTP/1.1\r\nHost: s\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    b.step("client_data", head, expect=[
        (W, b"HTTP/1.1 100 Continue\r\n\r\n"), (ARM, b.clock.now + IDLE),
    ])  # fmt: skip
    b.step("client_data", b"ab", expect=[(ARM, b.clock.now + IDLE)])
    b.step("client_data", b"cde", expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step(
        "upstream_connected",
        expect=[(SEND, b"PUT /x HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\n\r\nabcde")],
    )


def test_a_chunked_request_body_streams_once_and_is_never_retried() -> None:
    b = bench()
    head = b"PUT /u HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
    b.step(
        "client_data",
        head + b"3\r\nabc",
        expect=[(OPEN, One(K1, K2)), (ARM, b.clock.now + PER_TRY)],
    )
    b.step("client_data", b"\r\n", expect=[])  # held until the upstream is there
    b.step("upstream_connected", expect=[(SEND, head), (SEND, b"3\r\nabc\r\n"), (ARM, None)])
    b.clock.now += 10 * PER_TRY  # a slow upload: no per-try deadline while the body comes
    b.step("client_data", b"0\r\n\r\nGET", expect=[
        (SEND, b"0\r\n\r\n"), (ARM, b.clock.now + PER_TRY),  # the body is over: wait for the answer
    ])  # fmt: skip
    b.step("upstream_lost", "reset", expect=[
        (RELEASE, False), (W, error_response(502, "reset", close=True)), (CLOSE, False),
    ])  # fmt: skip
    assert b.proxy.retries == 0


def test_a_large_body_streams_and_an_early_answer_closes_the_connection() -> None:
    b = bench(endpoints=1, retry=RetryPolicy(max_buffered_body=4))
    head = b"POST /big HTTP/1.1\r\nHost: s\r\nContent-Length: 10\r\n\r\n"
    b.step("client_data", head + b"01234", expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, head), (SEND, b"01234"), (ARM, None)])
    too_large = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"
    b.step("upstream_data", too_large, expect=[
        (W, b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        (ARM, None), (RELEASE, False), (CLOSE, False),
    ])  # fmt: skip


def test_a_client_that_closes_inside_a_streamed_body_ends_the_request_without_blame() -> None:
    b = bench(endpoints=1, retry=RetryPolicy(max_buffered_body=4))
    head = b"POST /big HTTP/1.1\r\nHost: s\r\nContent-Length: 10\r\n\r\n"
    b.step("client_data", head + b"012", expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("client_eof", expect=[])  # the upstream is not there yet: decided once it is
    b.step("upstream_connected", expect=[(SEND, head), (SEND, b"012"), (RELEASE, False),
                                         (CLOSE, True)])  # fmt: skip
    assert b.requests("reset") == 1


def test_http10_is_served_then_closed() -> None:
    b = bench(endpoints=1)
    request = b"GET / HTTP/1.0\r\n\r\n"
    b.step("client_data", request, expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, request)])
    b.step("upstream_data", b"HTTP/1.0 200 OK\r\n\r\nuntil close", expect=[
        (W, b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n"), (ARM, None),
        (W, b"until close"),
    ])  # fmt: skip
    b.step("upstream_eof", expect=[(RELEASE, False), (CLOSE, False)])


def test_an_upgrade_is_forwarded_and_relayed_as_bytes_after_101() -> None:
    b = bench(endpoints=1)
    request = b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    b.step("client_data", request, expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step(
        "upstream_connected",
        expect=[
            (
                SEND,
                b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            )
        ],
    )
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    b.step(
        "upstream_data", switching + b"\x81\x00", expect=[(W, switching + b"\x81\x00"), (ARM, None)]
    )
    assert b.engine.phase is Phase.TUNNEL
    b.step("client_data", b"\x82\x01x", expect=[(SEND, b"\x82\x01x")])
    b.step("upstream_data", b"\x82\x01y", expect=[(W, b"\x82\x01y")])
    b.step("client_eof", expect=[(Cmd.EOF_UPSTREAM,)])
    b.step("upstream_data", b"last", expect=[(W, b"last")])
    b.step("upstream_eof", expect=[(Cmd.EOF_CLIENT,), (RELEASE, False), (CLOSE, False)])
    assert b.requests("ok") == 1


@pytest.mark.parametrize(
    ("raw", "status"),
    [(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 501), (b"\x16\x03\x01\x00\x05hi\r\n\r\n", 400),
     (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400)],
)  # fmt: skip
def test_what_cannot_be_forwarded_is_refused_and_closed(raw: bytes, status: int) -> None:
    b = bench()
    got = b.engine.client_data(raw)
    assert got[-1] == (CLOSE, False) and len(got) == 2
    assert got[0][0] is W and got[0][1].startswith(b"HTTP/1.1 %d " % status)
    assert b"x-isthmus-error: " in got[0][1] and b.engine.phase is Phase.CLOSED


def test_idle_clients_and_stalled_heads_are_closed_at_the_keepalive_timeout() -> None:
    b = bench()
    t = b.clock.now
    b.step("start", expect=[(ARM, t + IDLE)])
    b.step("client_data", b"GET / HT", expect=[])
    b.step("timer", t + IDLE - 1, expect=[])
    b.step("timer", t + IDLE, expect=[(CLOSE, False)])


def test_a_response_that_breaks_after_its_head_went_out_cuts_the_client() -> None:
    b = bench(endpoints=1, inline_body=4)
    b.step("client_data", GET, expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, GET)])
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    b.step("upstream_data", head + b"01234", expect=[(W, head), (ARM, None), (W, b"01234")])
    b.step("upstream_lost", "reset", expect=[(RELEASE, False), (CLOSE, True)])
    assert b.requests("reset") == 1


def test_a_small_body_that_breaks_is_still_retried() -> None:
    b = bench()
    b.step("client_data", GET, expect=[(OPEN, One(K1, K2)), (ARM, b.clock.now + PER_TRY)])
    b.step("upstream_connected", expect=[(SEND, GET)])
    b.step("upstream_data", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123", expect=[])
    b.step("upstream_lost", None, expect=[(RELEASE, False), (OPEN, One(K1, K2)),
                                          (ARM, b.clock.now + PER_TRY)])  # fmt: skip


def test_client_eof_after_a_request_answers_then_closes_and_drain_closes_idle() -> None:
    b = bench(endpoints=1)
    b.step("client_data", GET, expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("client_eof", expect=[])
    b.step("upstream_connected", expect=[(SEND, GET)])
    b.step("upstream_data", OK, expect=[
        (W, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"),
        (RELEASE, True), (CLOSE, False),
    ])  # fmt: skip
    b.new_connection()
    b.step("drain", expect=[(CLOSE, False)])
    b.new_connection()
    b.step("client_data", GET, expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("drain", expect=[])
    b.step("upstream_connected", expect=[(SEND, GET)])
    b.step("upstream_data", OK, expect=[
        (W, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"),
        (RELEASE, True), (CLOSE, False),
    ])  # fmt: skip


def test_a_client_that_goes_away_releases_its_upstream_and_the_balancer() -> None:
    b = bench(endpoints=1)
    b.step("client_data", GET, expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("client_lost", expect=[(RELEASE, False)])
    b.step("upstream_connected", expect=[(RELEASE, False)])  # a dial that finished late
    balancer = b.proxy.balancer
    assert all(balancer.outstanding(t) == 0 for t in list(balancer._outstanding))


def test_a_connection_to_an_unknown_address_gets_404() -> None:
    b = bench()
    b.engine = H1Engine(b.proxy, ("127.240.0.99", PORT))
    b.step("client_data", GET, expect=[
        (W, error_response(404, "no service on this address", close=True)), (CLOSE, False),
    ])  # fmt: skip


def test_pipelined_bytes_beyond_the_read_limit_pause_the_client() -> None:
    b = bench(endpoints=1, read_limit=256)
    b.step("client_data", GET, expect=[(OPEN, K1), (ARM, b.clock.now + PER_TRY)])
    b.step("client_data", GET * 10, expect=[(Cmd.PAUSE_CLIENT,)])
    b.step("upstream_connected", expect=[(SEND, GET)])
    got = b.engine.upstream_data(OK)
    assert got[:3] == [(W, OK), (RELEASE, True), (ARM, b.clock.now + IDLE)]
    assert got[3:] == [(OPEN, K1), (ARM, b.clock.now + PER_TRY)]
    resumed = 0
    for _ in range(9):  # the pause lifts once the buffer is under the limit again
        b.engine.upstream_connected()
        resumed += b.engine.upstream_data(OK).count((Cmd.RESUME_CLIENT,))
    assert resumed == 1
