"""Choosing where a connection or request goes (DESIGN §5); sans-IO and deterministic.

`Balancer.pick(route)` chooses a destination cluster from a `ServiceRoute`, then within it a
local endpoint (power of two choices on outstanding requests, sampled by endpoint weight) or a
remote cluster's ingress gateway. The data plane reports back with `begin`/`end` (outstanding
counts) and `report_success`/`report_failure` (passive outlier detection). Randomness and time
are injected, so a seeded `random.Random` and a fake clock make every decision reproducible.

Cluster choice:
- pinned (a cluster VIP): that cluster only; it fails when the cluster has no healthy capacity;
- a traffic policy (some destination has `weight > 0`): weighted choice among the weighted
  clusters. With `route.failover` the share of a cluster without capacity goes to the others,
  and when no weighted cluster has capacity the unweighted ones are tried by priority; without
  failover a pick that lands on a cluster without capacity fails;
- no policy: the lowest priority tier with capacity, clusters in a tier weighted by their
  healthy endpoint count.

A cluster "has capacity" when the routing table reports healthy endpoints and passive outlier
detection has not ejected all of them (local) or all of its gateways (remote). When every
candidate is out only through ejections, the ejections are ignored (panic) rather than failing
everything. Within a cluster, if more than `panic_threshold` of the healthy set is ejected the
whole healthy set is used.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from federation.routing import Destination, Endpoint, ServiceRoute
from gateway.errors import NoDestination, NoHealthyDestination

__all__ = [
    "Balancer",
    "Choice",
    "FailureKind",
    "OutlierPolicy",
    "Target",
    "TargetKind",
]

log = logging.getLogger(__name__)


class TargetKind(enum.StrEnum):
    ENDPOINT = "endpoint"
    GATEWAY = "gateway"


class FailureKind(enum.StrEnum):
    CONNECT = "connect"  # refused, reset or timed out before a byte moved
    HTTP_5XX = "5xx"


class Target(NamedTuple):
    """What outlier detection and outstanding counts are kept for (a NamedTuple: it is hashed
    several times per request, and a tuple hashes in C)."""

    cluster: str
    kind: TargetKind
    ident: str  # a local endpoint's workload id, or a gateway's "host:port"


class Choice(NamedTuple):
    route: ServiceRoute
    destination: Destination
    target: Target
    endpoint: Endpoint | None  # set for a local destination
    gateway: str | None  # "host:port" of the remote ingress, set for a remote destination
    panic: bool = False  # ejections were ignored to make this choice

    @property
    def cluster(self) -> str:
        return self.destination.cluster

    @property
    def local(self) -> bool:
        return self.destination.local


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5
    base_ejection: float = 5.0  # seconds; doubles with each ejection without a success between
    max_ejection: float = 300.0
    panic_threshold: float = 0.5  # ejected share of a set above which the whole set is used

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if not 0 < self.base_ejection <= self.max_ejection:
            raise ValueError("need 0 < base_ejection <= max_ejection")
        if not 0.0 <= self.panic_threshold <= 1.0:
            raise ValueError("panic_threshold must be within [0, 1]")

    def ejection_time(self, times_ejected: int) -> float:
        """How long the `times_ejected`-th consecutive ejection (1-based) lasts."""
        return min(self.base_ejection * 2.0 ** min(times_ejected - 1, 62), self.max_ejection)


class _Members(NamedTuple):
    """A destination's pickable members, built once per (immutable) Destination object."""

    dest: Destination
    targets: tuple[Target, ...]
    weights: tuple[int, ...]
    endpoints: tuple[Endpoint, ...]  # local: the healthy endpoints with weight > 0
    gateways: tuple[str, ...]  # remote


class _Outlier:
    """Passive health of one target."""

    __slots__ = ("ejected_until", "failures", "times_ejected")

    def __init__(self) -> None:
        self.failures = 0  # consecutive
        self.times_ejected = 0  # since the last success; grows the back-off
        self.ejected_until = 0.0


EjectListener = Callable[[Choice, float], None]


class Balancer:
    """Per-process balancing state; not thread-safe (one per event loop)."""

    def __init__(
        self,
        policy: OutlierPolicy | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_eject: EjectListener | None = None,
    ) -> None:
        self.policy = policy or OutlierPolicy()
        self._rng = rng or random.Random()
        self._clock = clock
        self._on_eject = on_eject
        self._outstanding: dict[Target, int] = {}
        self._outliers: dict[Target, _Outlier] = {}
        self._exclude: frozenset[Target] = frozenset()  # of the pick in progress
        self._down: set[Target] = set()  # failed active probes; out like ejected targets
        self._prepared: dict[int, _Members] = {}  # by id(Destination), checked by identity

    # --- what the data plane calls -------------------------------------------------------

    def pick(
        self,
        route: ServiceRoute,
        pinned_cluster: str | None = None,
        exclude: frozenset[Target] = frozenset(),
    ) -> Choice:
        """Choose a destination and a target within it; raises a RoutingError if none can.

        `exclude` holds targets a retry already tried: they are avoided like ejected ones
        (a cluster whose every target is excluded counts as without capacity), unless nothing
        else is left."""
        now = self._clock()
        self._exclude = exclude
        dests = route.destinations
        if pinned_cluster is None and len(dests) == 1 and not exclude:
            # The usual shape (one destination, one member): what the general path below
            # decides, without building its candidate lists.
            d = dests[0]
            if d.healthy > 0 and (d.weight <= 0 or route.failover):
                m = self._prepare(d)
                if len(m.targets) == 1 and not self._ejected_at(m.targets[0], now):
                    if d.local:
                        return Choice(route, d, m.targets[0], m.endpoints[0], None, False)
                    return Choice(route, d, m.targets[0], None, m.gateways[0], False)
        if pinned_cluster is not None:
            dest = route.destination(pinned_cluster)
            if dest is None:
                raise NoDestination(f"{route.service} has no destination in {pinned_cluster!r}")
            if dest.healthy <= 0 or not self._members(dest):
                raise NoHealthyDestination(
                    f"{route.service} has no healthy capacity in {pinned_cluster}", pinned_cluster
                )
            return self._within(route, dest, now, panic=not self._has_capacity(dest, now))
        if not route.destinations:
            raise NoDestination(f"{route.service} has no destinations")
        dest = self._choose_cluster(route, now, ignore_ejections=False)
        if dest is not None:
            return self._within(route, dest, now, panic=False)
        # Nothing left but ejected capacity: use it rather than fail everything (panic).
        dest = self._choose_cluster(route, now, ignore_ejections=True)
        if dest is None:
            raise NoHealthyDestination(f"{route.service} has no healthy destination")
        return self._within(route, dest, now, panic=True)

    def begin(self, choice: Choice) -> None:
        """A connection or request to `choice` starts (counts toward outstanding)."""
        t = choice.target
        self._outstanding[t] = self._outstanding.get(t, 0) + 1

    def end(self, choice: Choice) -> None:
        t = choice.target
        n = self._outstanding.get(t, 0) - 1
        if n > 0:
            self._outstanding[t] = n
        else:
            self._outstanding.pop(t, None)

    def report_success(self, choice: Choice) -> None:
        """The target answered: forget its failures and reset its back-off."""
        state = self._outliers.get(choice.target)
        if state is not None and state.ejected_until <= self._clock():
            del self._outliers[choice.target]

    def report_failure(self, choice: Choice, kind: FailureKind = FailureKind.CONNECT) -> bool:
        """Count a failure; returns True when this failure ejected the target."""
        now = self._clock()
        state = self._outliers.get(choice.target)
        if state is None:
            state = self._outliers[choice.target] = _Outlier()
        if state.ejected_until > now:
            return False  # already out; failures of requests begun before do not stack
        state.failures += 1
        if state.failures < self.policy.consecutive_failures:
            return False
        state.failures = 0
        state.times_ejected += 1
        duration = self.policy.ejection_time(state.times_ejected)
        state.ejected_until = now + duration
        t = choice.target
        log.warning(
            "outlier ejected",
            extra={
                "service": str(choice.route.service),
                "cluster": t.cluster,
                "target_kind": t.kind.value,
                "target": t.ident,
                "failure": kind.value,
                "ejection_seconds": duration,
                "times_ejected": state.times_ejected,
            },
        )
        if self._on_eject is not None:
            self._on_eject(choice, duration)
        return True

    def set_down(self, target: Target, down: bool) -> bool:
        """Active health (probes): a down target is avoided like an ejected one, until a probe
        brings it back; panic may still use it. Returns True when the state changed."""
        if down == (target in self._down):
            return False
        if down:
            self._down.add(target)
        else:
            self._down.discard(target)
        log.warning(
            "target probed down" if down else "target probed up",
            extra={"cluster": target.cluster, "target_kind": target.kind.value,
                   "target": target.ident},
        )  # fmt: skip
        return True

    # --- inspection and housekeeping -----------------------------------------------------

    def outstanding(self, target: Target) -> int:
        return self._outstanding.get(target, 0)

    def is_ejected(self, target: Target) -> bool:
        return self._ejected_at(target, self._clock())

    def is_down(self, target: Target) -> bool:
        return target in self._down

    def retain(self, targets: set[Target]) -> None:
        """Drop outlier and probe state of targets no longer in the routing table (on a swap)."""
        for t in [t for t in self._outliers if t not in targets]:
            del self._outliers[t]
        self._down &= targets

    @staticmethod
    def targets_of(routes: Sequence[ServiceRoute]) -> set[Target]:
        out: set[Target] = set()
        for route in routes:
            for d in route.destinations:
                if d.local:
                    kind = TargetKind.ENDPOINT
                    out.update(Target(d.cluster, kind, e.workload_id) for e in d.endpoints)
                else:
                    out.update(Target(d.cluster, TargetKind.GATEWAY, g) for g in d.gateways)
        return out

    # --- cluster choice ------------------------------------------------------------------

    def _choose_cluster(
        self, route: ServiceRoute, now: float, ignore_ejections: bool
    ) -> Destination | None:
        def usable(d: Destination) -> bool:
            if d.healthy <= 0 or not self._members(d):
                return False
            return ignore_ejections or self._has_capacity(d, now)

        dests = route.destinations
        if len(dests) == 1 and (dests[0].weight <= 0 or route.failover):
            return dests[0] if usable(dests[0]) else None
        weighted = [d for d in dests if d.weight > 0]
        if weighted:
            if not route.failover:
                chosen = self._weighted(weighted, [d.weight for d in weighted])
                # Ejections alone do not fail it: the choice inside the cluster panics instead.
                if chosen.healthy <= 0 or not self._members(chosen):
                    raise NoHealthyDestination(
                        f"{route.service}: {chosen.cluster} has no healthy capacity and "
                        "failover is off",
                        chosen.cluster,
                    )
                return chosen
            live = [d for d in weighted if usable(d)]
            if live:
                return self._weighted(live, [d.weight for d in live])
            rest = [d for d in route.destinations if d.weight <= 0]
        else:
            rest = list(route.destinations)
        for priority in sorted({d.priority for d in rest}):
            tier = [d for d in rest if d.priority == priority and usable(d)]
            if tier:
                return self._weighted(tier, [d.healthy for d in tier])
        return None

    def _prepare(self, dest: Destination) -> _Members:
        m = self._prepared.get(id(dest))
        if m is not None and m.dest is dest:
            return m
        if len(self._prepared) > 65536:  # tables replace destinations; drop the old ones
            self._prepared.clear()
        if dest.local:
            eps = tuple(e for e in dest.endpoints if e.healthy and e.weight > 0)
            targets = tuple(Target(dest.cluster, TargetKind.ENDPOINT, e.workload_id) for e in eps)
            m = _Members(dest, targets, tuple(e.weight for e in eps), eps, ())
        else:
            gws = tuple(dest.gateways)
            targets = tuple(Target(dest.cluster, TargetKind.GATEWAY, g) for g in gws)
            m = _Members(dest, targets, (1,) * len(gws), (), gws)
        self._prepared[id(dest)] = m
        return m

    def _members(self, dest: Destination) -> tuple[Target, ...]:
        return self._prepare(dest).targets

    def _has_capacity(self, dest: Destination, now: float) -> bool:
        exclude = self._exclude
        for target in self._prepare(dest).targets:
            if target in exclude:
                continue
            if not self._ejected_at(target, now):
                return True
        return False

    # --- choice within a cluster ---------------------------------------------------------

    def _within(self, route: ServiceRoute, dest: Destination, now: float, panic: bool) -> Choice:
        m = self._prepare(dest)
        index, set_panic = self._p2c(m.targets, m.weights, now, panic)
        if dest.local:
            return Choice(route, dest, m.targets[index], m.endpoints[index], None, set_panic)
        return Choice(route, dest, m.targets[index], None, m.gateways[index], set_panic)

    def _p2c(
        self, targets: Sequence[Target], weights: Sequence[int], now: float, panic: bool
    ) -> tuple[int, bool]:
        """Two samples by weight; the one with fewer outstanding requests wins, ties the first."""
        if len(targets) == 1:  # no choice: only whether it is ejected (then: panic)
            return 0, panic or self._ejected_at(targets[0], now)
        candidates = list(range(len(targets)))
        if self._exclude:
            fresh = [i for i in candidates if targets[i] not in self._exclude]
            candidates = fresh or candidates
        if not panic:
            live = [i for i in candidates if not self._ejected_at(targets[i], now)]
            ejected_share = 1.0 - len(live) / len(candidates)
            if live and ejected_share <= self.policy.panic_threshold:
                candidates = live
            else:
                panic = True
        if len(candidates) == 1:
            return candidates[0], panic
        w = [weights[i] for i in candidates]
        a, b = self._rng.choices(candidates, weights=w, k=2)
        if self._outstanding.get(targets[b], 0) < self._outstanding.get(targets[a], 0):
            a = b
        return a, panic

    def _ejected_at(self, target: Target, now: float) -> bool:
        if target in self._down:
            return True
        state = self._outliers.get(target)
        return state is not None and state.ejected_until > now

    def _weighted(self, items: list[Destination], weights: list[int]) -> Destination:
        if len(items) == 1:
            return items[0]
        return self._rng.choices(items, weights=weights, k=1)[0]
