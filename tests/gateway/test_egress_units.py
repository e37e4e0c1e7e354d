"""Sans-IO parts of the egress: retry budget and policy, probe streaks, VIP listeners and
resolution, header cleaning, probe SNI, balancer probe state."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.addresses import split_host_port
from discovery.names import ServiceKey
from federation.routing import Destination, Endpoint, RoutingTable, ServiceRoute
from gateway.balancer import Balancer, Target, TargetKind
from gateway.errors import NoHealthyDestination
from gateway.probe import ProbeConfig, ProbeState
from gateway.proto.h1 import parse_request_head, parse_response_head
from gateway.proto.sni import ProbeSni, parse_sni, probe_sni
from gateway.retry import RetryBudget, RetryPolicy
from gateway.vips import Mode, port_mode, resolve, wanted_listeners


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_budget_floor_and_percentage() -> None:
    clock = Clock()
    budget = RetryBudget(percent=0.2, min_per_second=1.0, ttl=10.0, clock=clock)
    # With no traffic the floor allows min_per_second x ttl retries.
    assert sum(budget.try_withdraw() for _ in range(20)) == 10
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_withdraw() for _ in range(100)) == 20
    assert not budget.try_withdraw()
    clock.now += 10.5  # the window slid past everything
    assert budget.balance() == pytest.approx(10.0)


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 3)), max_size=300))
def test_retry_budget_never_exceeds_its_bound(events: list[tuple[bool, float]]) -> None:
    clock = Clock()
    budget = RetryBudget(percent=0.2, min_per_second=0.5, ttl=5.0, clock=clock, buckets=5)
    log: list[tuple[float, str]] = []
    for is_request, dt in events:
        clock.now += dt
        if is_request:
            budget.record_request()
            log.append((clock.now, "req"))
        elif budget.try_withdraw():
            log.append((clock.now, "retry"))
        else:
            continue
        # The bound holds when a retry is granted (requests may age out of the window before
        # the retries they paid for do, so it is not checked at other times). The budget
        # counts whole 1 s buckets over the last 5: every retry of the last 4 s is in it, and
        # no request older than 6 s.
        retries = sum(1 for t, k in log if k == "retry" and t > clock.now - 4.0)
        requests = sum(1 for t, k in log if k == "req" and t > clock.now - 6.0)
        assert retries <= 0.2 * requests + 0.5 * 5.0 + 1e-9


def test_retry_policy() -> None:
    p = RetryPolicy()
    assert p.retriable_request("get", True) and p.retriable_request("PUT", True)
    assert not p.retriable_request("POST", True)
    assert not p.retriable_request("PUT", False)  # a streamed body cannot be sent again
    assert p.retriable_status(503) and not p.retriable_status(500)
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_probe_state_thresholds() -> None:
    s = ProbeState(ProbeConfig(unhealthy_threshold=2, healthy_threshold=2))
    assert s.observe(False) is None
    assert s.observe(True) is None  # a success resets the failure streak
    assert s.observe(False) is None
    assert s.observe(False) is True
    assert s.observe(False) is None  # already down
    assert s.observe(True) is None
    assert s.observe(True) is False


def test_probe_sni_round_trip() -> None:
    name = probe_sni("west", "mesh.test")
    assert name == "probe.west.mesh.test"
    assert parse_sni(name, "mesh.test") == ProbeSni("west", "mesh.test")


@pytest.mark.parametrize(
    ("name", "mode"),
    [("http", Mode.HTTP), ("http-api", Mode.HTTP), ("http2", Mode.L4), ("grpc-x", Mode.L4),
     ("tcp", Mode.L4), ("tls", Mode.L4), ("httpx", Mode.L4)],
)  # fmt: skip
def test_port_modes(name: str, mode: Mode) -> None:
    assert port_mode(name) is mode


def _table() -> RoutingTable:
    ep = Endpoint("w1", "10.0.0.1", {"http": 8080, "tcp": 9000})
    routes = [
        ServiceRoute(
            ServiceKey("a"),
            ipaddress.ip_address("127.240.0.1"),
            {"http": 80, "tcp": 9000},
            (Destination("east", True, healthy=1, endpoints=(ep,)),),
            cluster_vips={"east": ipaddress.ip_address("127.240.0.2")},
        ),
        ServiceRoute(
            ServiceKey("b"),
            ipaddress.ip_address("10.9.9.9"),
            {"tcp": 1},
            (Destination("east", True, healthy=1, endpoints=(ep,)),),
        ),
    ]
    return RoutingTable.build(1, "east", "mesh.test", routes)


def test_wanted_listeners_and_resolution() -> None:
    table = _table()
    wanted, problems = wanted_listeners(table, ipaddress.ip_network("127.240.0.0/16"))
    assert set(wanted) == {
        (ipaddress.ip_address("127.240.0.1"), 80),
        (ipaddress.ip_address("127.240.0.1"), 9000),
        (ipaddress.ip_address("127.240.0.2"), 80),
        (ipaddress.ip_address("127.240.0.2"), 9000),
    }
    assert wanted[(ipaddress.ip_address("127.240.0.1"), 80)].mode is Mode.HTTP
    assert len(problems) == 1 and "outside egress.vip_cidr" in problems[0]
    l4_only, _ = wanted_listeners(table, ipaddress.ip_network("127.240.0.0/16"), False)
    assert {s.mode for s in l4_only.values()} == {Mode.L4}
    r = resolve(table, "127.240.0.2", 80)
    assert r is not None and r.port_name == "http" and r.pinned_cluster == "east"
    r = resolve(table, "::ffff:127.240.0.1", 9000)
    assert r is not None and r.port_name == "tcp" and r.pinned_cluster is None
    assert resolve(table, "127.240.0.1", 81) is None
    assert resolve(table, "127.240.0.3", 80) is None
    assert resolve(table, "not an address", 80) is None


def test_header_cleaning() -> None:
    """What the engine forwards (the h1 parser's `forward` heads): no hop-by-hop field, none
    that Connection names, no x-isthmus-* in requests; responses keep our own headers."""
    raw = (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Foo\r\nX-Foo: 1\r\n"
        b"Keep-Alive: 5\r\nX-Isthmus-Route: west\r\nX-ISTHMUS-A: b\r\nAccept: x\r\n"
        b"Accept: y\r\nTE: trailers\r\nUpgrade: h2c\r\n\r\n"
    )
    head = parse_request_head(raw)
    assert head is not None
    assert head.forward == b"GET / HTTP/1.1\r\nHost: a\r\nAccept: x\r\nAccept: y\r\n\r\n"
    chunked = parse_request_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert chunked is not None  # a body is forwarded with the framing it came with
    assert chunked.forward == b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    resp = parse_response_head(
        b"HTTP/1.1 200 OK\r\nX-Isthmus-Error: e\r\nConnection: x\r\nContent-Length: 0\r\n\r\n",
        "GET",
    )
    assert resp is not None
    assert resp.forward == b"HTTP/1.1 200 OK\r\nX-Isthmus-Error: e\r\nContent-Length: 0\r\n\r\n"


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:15443") == ("127.0.0.1", 15443)
    assert split_host_port("[::1]:15443") == ("::1", 15443)
    for bad in ("nohost", "a:b", ""):
        with pytest.raises(ValueError):
            split_host_port(bad)


def test_balancer_probe_down_moves_traffic_and_panics_when_alone() -> None:
    import random

    route = ServiceRoute(
        ServiceKey("a"), ipaddress.ip_address("127.240.0.1"), {"tcp": 1},
        (Destination("west", False, healthy=2, gateways=("g1:1",)),
         Destination("north", False, priority=1, healthy=2, gateways=("g2:1",))),
    )  # fmt: skip
    b = Balancer(rng=random.Random(1))
    west = Target("west", TargetKind.GATEWAY, "g1:1")
    assert b.pick(route).cluster == "west"
    assert b.set_down(west, True) and not b.set_down(west, True)
    assert b.is_down(west) and b.is_ejected(west)
    assert {b.pick(route).cluster for _ in range(20)} == {"north"}
    b.set_down(Target("north", TargetKind.GATEWAY, "g2:1"), True)
    choice = b.pick(route)  # everything is down: panic rather than fail
    assert choice.panic
    b.retain(set())
    assert not b.is_down(west)
    empty = ServiceRoute(
        route.service, route.vip, route.ports,
        (Destination("west", False, healthy=0, gateways=("g1:1",)),),
    )  # fmt: skip
    with pytest.raises(NoHealthyDestination):
        b.pick(empty)  # no healthy capacity at all is not a panic case
