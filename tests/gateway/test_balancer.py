"""The balancer: weights, priority tiers, failover, pins, P2C, outlier ejection and panic.

Statistical properties use seeded generators (hypothesis derandomized), so they are exact
reproductions, not flaky samples; bounds are in percentage points of the share.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.names import ServiceKey
from federation.routing import Destination, Endpoint, ServiceRoute
from gateway.balancer import Balancer, Choice, FailureKind, OutlierPolicy, Target, TargetKind
from gateway.errors import NoDestination, NoHealthyDestination, RoutingError

PICKS = 2000
TOLERANCE = 0.05


class FakeClock:
    """Deterministic time for ejection back-offs."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoints(cluster: str, n: int, weights: list[int] | None = None) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(
            f"{cluster}-{i}",
            f"127.10.0.{i + 1}",
            {"http": 8080},
            weight=(weights[i] if weights else 1),
        )
        for i in range(n)
    )


def local(cluster: str = "east", n: int = 3, **kw: object) -> Destination:
    eps = kw.pop("endpoints", None) or endpoints(cluster, n)
    healthy = sum(1 for e in eps if e.healthy)  # type: ignore[union-attr]
    kw.setdefault("healthy", healthy)
    return Destination(cluster, True, endpoints=eps, total=len(eps), **kw)  # type: ignore[arg-type]


def remote(cluster: str, gateways: int = 1, healthy: int = 2, **kw: object) -> Destination:
    gws = tuple(f"127.20.{len(cluster)}.{i + 1}:15443" for i in range(gateways))
    return Destination(cluster, False, healthy=healthy, total=healthy, gateways=gws, **kw)  # type: ignore[arg-type]


def route(*dests: Destination, failover: bool = True) -> ServiceRoute:
    return ServiceRoute(
        ServiceKey("reviews"),
        ipaddress.ip_address("127.240.0.1"),
        {"http": 9080},
        tuple(dests),
        failover=failover,
    )


def shares(balancer: Balancer, r: ServiceRoute, n: int = PICKS, **kw: object) -> dict[str, float]:
    counts = Counter(balancer.pick(r, **kw).cluster for _ in range(n))  # type: ignore[arg-type]
    return {c: counts[c] / n for c in counts}


def fail(balancer: Balancer, choice: Choice, times: int) -> bool:
    return any([balancer.report_failure(choice, FailureKind.CONNECT) for _ in range(times)])


# --- weights and failover -----------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 100), min_size=2, max_size=4), st.integers(0, 2**32))
def test_weights_are_followed(weights: list[int], seed: int) -> None:
    names = ["east", "west", "north", "south"][: len(weights)]
    dests = [local(names[0], weight=weights[0])]
    dests += [remote(n, weight=w) for n, w in zip(names[1:], weights[1:], strict=True)]
    got = shares(Balancer(rng=random.Random(seed)), route(*dests))
    total = sum(weights)
    for name, w in zip(names, weights, strict=True):
        assert abs(got.get(name, 0.0) - w / total) <= TOLERANCE, (name, got)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 100), min_size=3, max_size=3), st.integers(0, 2**32))
def test_failover_redistributes_the_share_of_a_dead_cluster(weights: list[int], seed: int) -> None:
    r = route(
        local("east", weight=weights[0]),
        remote("west", weight=weights[1], healthy=0),  # no healthy capacity
        remote("north", weight=weights[2]),
    )
    got = shares(Balancer(rng=random.Random(seed)), r)
    assert "west" not in got
    expected_east = weights[0] / (weights[0] + weights[2])
    assert abs(got["east"] - expected_east) <= TOLERANCE


def test_without_failover_requests_to_a_dead_cluster_fail() -> None:
    r = route(local("east", weight=20), remote("west", weight=80, healthy=0), failover=False)
    balancer = Balancer(rng=random.Random(7))
    ok = failed = 0
    for _ in range(PICKS):
        try:
            choice = balancer.pick(r)
        except NoHealthyDestination as e:
            assert e.cluster == "west"
            failed += 1
        else:
            assert choice.cluster == "east"
            ok += 1
    assert abs(failed / PICKS - 0.8) <= TOLERANCE


def test_zero_weight_clusters_are_a_last_resort_with_failover() -> None:
    r = route(
        local("east", weight=0),
        remote("west", weight=100, healthy=0),
        remote("north", weight=0, priority=1),
    )
    assert set(shares(Balancer(rng=random.Random(1)), r, n=200)) == {"east"}
    r_all_dead = route(remote("west", weight=100, healthy=0))
    with pytest.raises(NoHealthyDestination):
        Balancer().pick(r_all_dead)


def test_zero_weight_gets_nothing_while_weighted_clusters_live() -> None:
    r = route(local("east", weight=0), remote("west", weight=5))
    assert shares(Balancer(rng=random.Random(3)), r, n=500) == {"west": 1.0}


# --- priority tiers (no policy) -----------------------------------------------------------


def test_local_tier_first_then_failover_by_priority() -> None:
    balancer = Balancer(rng=random.Random(11))
    r = route(local("east"), remote("west", priority=1), remote("north", priority=2))
    assert shares(balancer, r, n=300) == {"east": 1.0}
    sick = tuple(Endpoint(f"e{i}", "127.10.0.1", {"http": 1}, healthy=False) for i in range(3))
    dead_local = local("east", endpoints=sick)
    r = route(dead_local, remote("west", priority=1), remote("north", priority=2))
    assert shares(balancer, r, n=300) == {"west": 1.0}
    r = route(dead_local, remote("west", priority=1, healthy=0), remote("north", priority=2))
    assert shares(balancer, r, n=300) == {"north": 1.0}


def test_tier_members_share_by_healthy_capacity() -> None:
    r = route(
        local("east", healthy=0, endpoints=()),
        remote("west", priority=1, healthy=1),
        remote("north", priority=1, healthy=3),
    )
    got = shares(Balancer(rng=random.Random(5)), r)
    assert abs(got["north"] - 0.75) <= TOLERANCE


def test_no_destinations_at_all() -> None:
    with pytest.raises(NoDestination):
        Balancer().pick(route())
    with pytest.raises(RoutingError):
        Balancer().pick(route(remote("west", healthy=0)))


# --- pins (cluster VIPs) ------------------------------------------------------------------


def test_pin_goes_only_to_that_cluster() -> None:
    r = route(local("east", weight=90), remote("west", weight=10))
    assert shares(Balancer(rng=random.Random(2)), r, n=300, pinned_cluster="west") == {"west": 1.0}
    with pytest.raises(NoDestination):
        Balancer().pick(r, pinned_cluster="south")
    dead = route(local("east"), remote("west", healthy=0))
    with pytest.raises(NoHealthyDestination):
        Balancer().pick(dead, pinned_cluster="west")


def test_pin_to_an_ejected_cluster_panics_instead_of_failing() -> None:
    clock = FakeClock()
    balancer = Balancer(OutlierPolicy(consecutive_failures=1), random.Random(1), clock)
    r = route(local("east"), remote("west"))
    choice = balancer.pick(r, pinned_cluster="west")
    assert fail(balancer, choice, 1)
    again = balancer.pick(r, pinned_cluster="west")
    assert again.cluster == "west"
    assert again.panic


# --- endpoints: weights, health, power of two choices -------------------------------------


def test_only_healthy_weighted_endpoints_are_used() -> None:
    eps = (
        Endpoint("a", "127.10.0.1", {"http": 1}),
        Endpoint("b", "127.10.0.2", {"http": 1}, healthy=False),
        Endpoint("c", "127.10.0.3", {"http": 1}, weight=0),
    )
    balancer = Balancer(rng=random.Random(9))
    r = route(local("east", endpoints=eps))
    picked = {balancer.pick(r).endpoint.workload_id for _ in range(300)}  # type: ignore[union-attr]
    assert picked == {"a"}


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 10), min_size=2, max_size=5), st.integers(0, 2**32))
def test_idle_endpoints_follow_endpoint_weights(weights: list[int], seed: int) -> None:
    r = route(local("east", endpoints=endpoints("east", len(weights), weights)))
    balancer = Balancer(rng=random.Random(seed))
    counts = Counter(balancer.pick(r).target.ident for _ in range(PICKS))
    for i, w in enumerate(weights):
        assert abs(counts[f"east-{i}"] / PICKS - w / sum(weights)) <= TOLERANCE


def test_p2c_avoids_the_busy_endpoint() -> None:
    r = route(local("east", n=2))
    balancer = Balancer(rng=random.Random(4))
    busy = Target("east", TargetKind.ENDPOINT, "east-0")
    while (busy_choice := balancer.pick(r)).target != busy:
        pass
    for _ in range(10):
        balancer.begin(busy_choice)
    assert balancer.outstanding(busy) == 10
    counts = Counter(balancer.pick(r).target.ident for _ in range(PICKS))
    # The busy one wins only when both samples land on it: 1/4 of the time.
    assert abs(counts["east-0"] / PICKS - 0.25) <= TOLERANCE
    for _ in range(10):
        balancer.end(busy_choice)
    assert balancer.outstanding(busy) == 0
    counts = Counter(balancer.pick(r).target.ident for _ in range(PICKS))
    assert abs(counts["east-0"] / PICKS - 0.5) <= TOLERANCE


def test_outstanding_requests_spread_evenly_under_load() -> None:
    r = route(local("east", n=4))
    balancer = Balancer(rng=random.Random(8))
    for _ in range(400):  # requests that never finish: P2C keeps the counts close
        balancer.begin(balancer.pick(r))
    targets = [Target("east", TargetKind.ENDPOINT, f"east-{i}") for i in range(4)]
    counts = [balancer.outstanding(t) for t in targets]
    assert sum(counts) == 400
    assert max(counts) - min(counts) <= 10


def test_same_seed_same_decisions() -> None:
    r = route(local("east", weight=1), remote("west", gateways=3, weight=1))
    a, b = Balancer(rng=random.Random(42)), Balancer(rng=random.Random(42))
    assert [a.pick(r).target for _ in range(200)] == [b.pick(r).target for _ in range(200)]


# --- outlier detection --------------------------------------------------------------------


def test_consecutive_failures_eject_with_growing_back_off() -> None:
    clock = FakeClock()
    policy = OutlierPolicy(consecutive_failures=3, base_ejection=10, max_ejection=25)
    ejections: list[tuple[Target, float]] = []
    balancer = Balancer(
        policy, random.Random(1), clock, lambda c, d: ejections.append((c.target, d))
    )
    r = route(local("east", n=3))
    victim = balancer.pick(r)
    assert not fail(balancer, victim, 2)
    balancer.report_success(victim)  # resets the consecutive count
    assert not fail(balancer, victim, 2)
    assert balancer.report_failure(victim, FailureKind.HTTP_5XX)
    assert balancer.is_ejected(victim.target)
    assert ejections == [(victim.target, 10)]
    assert all(balancer.pick(r).target != victim.target for _ in range(300))
    # Failures of requests begun before the ejection do not extend it.
    assert not fail(balancer, victim, 5)
    clock.now += 10
    assert not balancer.is_ejected(victim.target)
    assert victim.target in {balancer.pick(r).target for _ in range(300)}
    assert fail(balancer, victim, 3)
    assert ejections[-1] == (victim.target, 20)  # doubled
    clock.now += 20
    assert fail(balancer, victim, 3)
    assert ejections[-1] == (victim.target, 25)  # capped
    clock.now += 25
    balancer.report_success(victim)  # a success after the ejection resets the back-off
    assert fail(balancer, victim, 3)
    assert ejections[-1] == (victim.target, 10)


def test_success_during_ejection_does_not_cancel_it() -> None:
    clock = FakeClock()
    balancer = Balancer(OutlierPolicy(consecutive_failures=1), random.Random(1), clock)
    choice = balancer.pick(route(local("east", n=3)))
    assert fail(balancer, choice, 1)
    balancer.report_success(choice)
    assert balancer.is_ejected(choice.target)


def test_ejected_gateways_move_traffic_to_the_next_cluster() -> None:
    clock = FakeClock()
    balancer = Balancer(OutlierPolicy(consecutive_failures=2), random.Random(3), clock)
    r = route(remote("west", gateways=2), remote("north", priority=1))
    seen: set[str | None] = set()
    while len(seen) < 2:  # eject both of west's gateways
        choice = balancer.pick(r)
        assert choice.cluster == "west"
        if choice.gateway not in seen:
            seen.add(choice.gateway)
            assert fail(balancer, choice, 2)
    got = shares(balancer, r, n=300)
    assert got == {"north": 1.0}
    clock.now += OutlierPolicy().base_ejection
    assert shares(balancer, r, n=300) == {"west": 1.0}


def test_weighted_cluster_with_ejected_gateway_fails_over() -> None:
    balancer = Balancer(OutlierPolicy(consecutive_failures=1), random.Random(6), FakeClock())
    r = route(local("east", weight=50), remote("west", weight=50))
    while (choice := balancer.pick(r)).cluster != "west":
        pass
    assert fail(balancer, choice, 1)
    assert shares(balancer, r, n=300) == {"east": 1.0}


def test_panic_within_a_set() -> None:
    clock = FakeClock()
    policy = OutlierPolicy(consecutive_failures=1, panic_threshold=0.5)
    balancer = Balancer(policy, random.Random(12), clock)
    r = route(local("east", n=4))
    ejected: set[Target] = set()
    while len(ejected) < 2:
        c = balancer.pick(r)
        if c.target not in ejected:
            assert fail(balancer, c, 1)
            ejected.add(c.target)
    # Half ejected is not above the threshold: the other half takes everything.
    picks = [balancer.pick(r) for _ in range(300)]
    assert not any(p.panic for p in picks)
    assert not {p.target for p in picks} & ejected
    while len(ejected) < 3:
        c = balancer.pick(r)
        if c.target not in ejected:
            assert fail(balancer, c, 1)
            ejected.add(c.target)
    # Three of four ejected: use all four.
    picks = [balancer.pick(r) for _ in range(300)]
    assert all(p.panic for p in picks)
    assert len({p.target for p in picks}) == 4


def test_panic_across_clusters_when_everything_is_ejected() -> None:
    balancer = Balancer(OutlierPolicy(consecutive_failures=1), random.Random(13), FakeClock())
    r = route(local("east", n=1), remote("west", priority=1))
    for _ in range(2):
        assert fail(balancer, balancer.pick(r), 1)
    choice = balancer.pick(r)
    assert choice.panic
    assert choice.cluster == "east"  # priorities still hold in panic


def test_retain_forgets_targets_that_left_the_table() -> None:
    balancer = Balancer(OutlierPolicy(consecutive_failures=1), random.Random(1), FakeClock())
    r = route(local("east", n=2))
    choice = balancer.pick(r)
    assert fail(balancer, choice, 1)
    balancer.retain(Balancer.targets_of([r]))
    assert balancer.is_ejected(choice.target)
    balancer.retain(Balancer.targets_of([route(local("east", n=0, endpoints=()))]))
    assert not balancer.is_ejected(choice.target)


@pytest.mark.parametrize(
    "kw",
    [
        {"consecutive_failures": 0},
        {"base_ejection": 0},
        {"base_ejection": 10, "max_ejection": 5},
        {"panic_threshold": 1.5},
    ],
)
def test_bad_policies(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutlierPolicy(**kw)  # type: ignore[arg-type]


def test_retries_avoid_targets_already_tried() -> None:
    balancer = Balancer(rng=random.Random(21))
    r = route(local("east", n=3), remote("west", priority=1))
    first = balancer.pick(r)
    tried = frozenset({first.target})
    assert all(balancer.pick(r, exclude=tried).target != first.target for _ in range(200))
    everything_local = frozenset(Balancer.targets_of([r])) - {
        t for t in Balancer.targets_of([r]) if t.cluster == "west"
    }
    # Every local endpoint tried: the retry goes to the next cluster.
    assert {balancer.pick(r, exclude=everything_local).cluster for _ in range(50)} == {"west"}
    # Pinned with everything tried: nothing else is left, so a tried one is used again.
    assert balancer.pick(r, pinned_cluster="east", exclude=everything_local).cluster == "east"
