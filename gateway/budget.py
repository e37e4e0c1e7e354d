"""The egress listener budget: how many VIP listeners (file descriptors) a process may hold.

The egress listens on every VIP port of every service in the routing table (`vips.py`), so
what the catalog holds decides how many file descriptors it takes: ten registrations of 64
ports once took 1,280 of a 1,024 limit, and the API, the ingress and DNS stopped with them.

- `raise_nofile_limit` lifts the process's soft open-file limit to its hard limit at start.
- `listener_budget` is `egress.max_listeners`, or by default a quarter of that limit: the
  other three quarters stay for connections, the stores, the API, DNS and the ingress.
- `ListenerAdmission` refuses a registration that would take the listeners the table wants
  past the budget (409), computed from the catalog and the table, without opening a socket.
- The egress itself opens at most the budget (`vips.fit_budget`) whatever the catalog holds,
  so a catalog written before the budget existed never stops a start.
"""

from __future__ import annotations

import collections
import itertools
import logging
import resource
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import Gauge

from discovery.catalog import Catalog
from discovery.errors import LimitExceeded
from discovery.model import Workload, WorkloadState
from discovery.names import ServiceKey
from federation.routing import RoutingTable, ServiceRoute, TableHolder

__all__ = [
    "LISTENER_SHARE",
    "ListenerAdmission",
    "listener_budget",
    "open_file_limit",
    "raise_nofile_limit",
]

log = logging.getLogger(__name__)

LISTENER_SHARE = 4  # listeners get at most 1/LISTENER_SHARE of the open-file limit by default
_UNLIMITED = 1 << 20  # what an unlimited RLIMIT_NOFILE counts as (Linux's default nr_open)

LISTENERS = Gauge("isthmus_egress_listeners", "Egress VIP listeners open", ["cluster"])
BUDGET = Gauge(
    "isthmus_egress_listener_budget", "Egress VIP listeners this process may open", ["cluster"]
)
SKIPPED = Gauge(
    "isthmus_egress_listeners_skipped",
    "VIP listeners the routing table wants that the listener budget leaves out",
    ["cluster"],
)
WANTED = Gauge(
    "isthmus_egress_listeners_wanted",
    "VIP listeners the catalog and the routing table ask every egress for",
    ["cluster"],
)


def open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED if soft == resource.RLIM_INFINITY or soft < 0 else soft


def raise_nofile_limit() -> int:
    """Lift the soft open-file limit to the hard one (best effort); returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY or hard < 0:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = _UNLIMITED
    if soft != resource.RLIM_INFINITY and 0 <= soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised", extra={"from": soft, "to": target})
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit",
                        extra={"soft": soft, "hard": hard, "error": str(e)})
    return open_file_limit()


def listener_budget(configured: int | None, limit: int | None = None) -> int:
    """`configured` (egress.max_listeners), else a quarter of the open-file limit. A configured
    budget above half the limit is lowered to half: past that it is not a budget any more."""
    limit = open_file_limit() if limit is None else limit
    if configured is None:
        return max(1, limit // LISTENER_SHARE)
    ceiling = max(1, limit // 2)
    if configured > ceiling:
        log.warning(
            "egress.max_listeners lowered to half the open-file limit",
            extra={"configured": configured, "open_files": limit, "budget": ceiling},
        )
        return ceiling
    return configured


class ListenerAdmission:
    """Counts the VIP listeners the catalog and the routing table ask every egress for, and
    refuses a registration that would take that count past the budget.

    A service wants (1 + clusters serving it) VIPs times its distinct ports. Counted from the
    catalog as each change applies (the table follows a moment later) and from the table for
    what only peers know (their clusters and ports); writes still in flight hold what they
    add, so a burst of registrations cannot slip past together. A write that adds no listener
    is never refused, even past the budget (a catalog from before the budget)."""

    def __init__(self, budget: int, cluster: str, catalog: Catalog, holder: TableHolder) -> None:
        self.budget = budget
        self.cluster = cluster
        self._names: dict[ServiceKey, collections.Counter[str]] = {}
        self._numbers: dict[ServiceKey, collections.Counter[int]] = {}
        self._ports_of: dict[str, tuple[ServiceKey, tuple[tuple[str, int], ...]]] = {}
        self._routes: dict[ServiceKey, ServiceRoute] = {}
        self._counts: dict[ServiceKey, int] = {}
        self._reserved: dict[int, int] = {}
        self._tokens = itertools.count()
        self.wanted = 0
        for st in catalog.workloads():
            self._add(st.workload)
        self._routes = dict(holder.current.services)
        for key in set(self._names) | set(self._routes):
            self._recount(key)
        self._unsubscribe = [catalog.subscribe(self._on_change), holder.subscribe(self._on_table)]
        BUDGET.labels(cluster).set(budget)

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    # keeping count ------------------------------------------------------------------------
    def _add(self, w: Workload) -> None:
        ports = tuple(w.ports.items())
        self._ports_of[w.id] = (w.service, ports)
        self._names.setdefault(w.service, collections.Counter()).update(n for n, _ in ports)
        self._numbers.setdefault(w.service, collections.Counter()).update(p for _, p in ports)

    def _remove(self, workload_id: str) -> ServiceKey | None:
        found = self._ports_of.pop(workload_id, None)
        if found is None:
            return None
        key, ports = found
        names, numbers = self._names[key], self._numbers[key]
        names.subtract(n for n, _ in ports)
        numbers.subtract(p for _, p in ports)
        for counter in (names, numbers):
            for k in [k for k, c in counter.items() if c <= 0]:
                del counter[k]
        if not names:
            del self._names[key], self._numbers[key]
        return key

    def _on_change(self, _index: int, workload_id: str, state: WorkloadState | None) -> None:
        keys = {self._remove(workload_id)}
        if state is not None:
            self._add(state.workload)
            keys.add(state.workload.service)
        for key in keys - {None}:
            self._recount(key)  # type: ignore[arg-type]

    def _on_table(self, table: RoutingTable) -> None:
        changed = {k for k, r in table.services.items() if self._routes.get(k) is not r}
        changed |= set(self._routes) - set(table.services)
        self._routes = dict(table.services)
        for key in changed:
            self._recount(key)

    def _recount(self, key: ServiceKey) -> None:
        new = self.count(key, self._names.get(key, ()), self._numbers.get(key, ()))
        self.wanted += new - self._counts.get(key, 0)
        if new:
            self._counts[key] = new
        else:
            self._counts.pop(key, None)
        WANTED.labels(self.cluster).set(self.wanted)

    def count(self, key: ServiceKey, names: Iterable[str], numbers: Iterable[int]) -> int:
        """Listeners for `key` with these local port names and numbers: (1 + clusters) VIPs
        times its distinct ports (at most its distinct names, at most its distinct numbers)."""
        names, numbers = set(names), set(numbers)
        route = self._routes.get(key)
        # The local cluster serves it while the catalog says so (the table may lag behind a
        # deregistration); remote clusters and their ports only the table knows.
        remote = set(route.cluster_vips) - {self.cluster} if route is not None else set()
        clusters = remote | {self.cluster} if names else remote
        if not clusters:
            return 0
        if remote:
            assert route is not None
            names |= set(route.ports)
            numbers |= set(route.ports.values())
        return (1 + len(clusters)) * min(len(names), len(numbers))

    # the check ---------------------------------------------------------------------------
    def admit(self, workload: Workload, old: Workload | None) -> Callable[[], None]:
        """Raises LimitExceeded if `workload` would take the wanted listeners past the budget;
        else returns the release of what it holds until its write is settled."""
        key = workload.service
        names = collections.Counter(self._names.get(key, {}))
        numbers = collections.Counter(self._numbers.get(key, {}))
        if old is not None and old.service == key:
            names.subtract(old.ports.keys())
            numbers.subtract(old.ports.values())
        names.update(workload.ports.keys())
        numbers.update(workload.ports.values())
        after = self.count(
            key, (n for n, c in names.items() if c > 0), (p for p, c in numbers.items() if c > 0)
        )
        growth = after - self._counts.get(key, 0)
        total = self.wanted + sum(self._reserved.values()) + growth
        if growth > 0 and total > self.budget:
            raise LimitExceeded(
                f"workload {workload.id!r} would give service {key} {after} egress listeners "
                f"({total} in all), past the egress listener budget of {self.budget} "
                "(egress.max_listeners, by default a quarter of the open-file limit): "
                "deregister unused services or ports, or raise the budget"
            )
        token = next(self._tokens)
        self._reserved[token] = max(growth, 0)

        def release() -> None:
            self._reserved.pop(token, None)

        return release

    def report(self) -> dict[str, int]:
        return {"budget": self.budget, "wanted": self.wanted}
