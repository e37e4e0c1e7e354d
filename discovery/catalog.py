"""The catalog interface, and the in-memory view every backend serves reads from.

Backends (the embedded SQLite store, Consul) implement `Catalog`. Reads are answered
from memory; writes are acknowledged only once durable. Every change bumps a monotonic index,
which is what watchers (blocking queries, the routing table, peering) wait on.
"""

from __future__ import annotations

import abc
import collections
import ipaddress
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from discovery.changes import ChangeSignal
from discovery.errors import Conflict, InvalidInput, NotFound
from discovery.model import Health, Workload, WorkloadState
from discovery.names import ServiceKey

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ChangeListener = Callable[[int, str, WorkloadState | None], None]

# How many change records the catalog keeps for `changes_since`; older callers resync fully.
CHANGELOG_SIZE = 65536


@dataclass(frozen=True, slots=True)
class ServiceSummary:
    service: ServiceKey
    vip: IPAddress | None
    ports: dict[str, int]
    healthy: int
    total: int


class Catalog(abc.ABC):
    """What the rest of the appliance needs from a catalog backend."""

    cluster: str
    # True when the store runs the health checks itself (Consul's agents do): the appliance's
    # HealthChecker then probes nothing, and TTL heartbeats go to `heartbeat`.
    runs_checks: bool = False

    async def heartbeat(self, workload_id: str) -> WorkloadState:
        """A TTL check's heartbeat, for a store that runs checks (`runs_checks`)."""
        raise InvalidInput(
            f"workload {workload_id!r}: this catalog does not run checks itself", field="check"
        )

    def report(self) -> dict[str, object]:
        """What `GET /v1/status` shows of the store under `catalog`: `stale` is true while it
        serves a last-known state (Consul unreachable)."""
        return {"stale": False}

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush every acknowledged write and release the store."""

    @abc.abstractmethod
    async def put(
        self, workload: Workload, *, owners: Collection[str] | None = None
    ) -> WorkloadState:
        """Register or replace; returns once durable.

        With `owners`, only a new id, or one whose stored `source` is in `owners`, is written;
        anything else raises Conflict naming the stored owner. The check is part of the write
        itself (one transaction, a Consul check-and-set), so of two writers racing for a new id
        exactly one wins."""

    @abc.abstractmethod
    async def delete(self, workload_id: str, *, owners: Collection[str] | None = None) -> None:
        """Deregister; raises NotFound. With `owners`, as for `put`: Conflict unless the
        stored `source` is one of them, decided in the same transaction."""

    @abc.abstractmethod
    async def set_health(self, workload_id: str, health: Health, output: str = "") -> None:
        """Record a health transition (ignored if the workload is gone)."""

    @abc.abstractmethod
    async def vip(self, key: str) -> IPAddress:
        """The VIP for `key` (a service `name.ns`, or `name.ns.cluster`), stable forever."""

    # Reads: answered from memory.
    @property
    @abc.abstractmethod
    def index(self) -> int: ...

    @abc.abstractmethod
    def get(self, workload_id: str) -> WorkloadState: ...

    @abc.abstractmethod
    def workloads(self, service: ServiceKey | None = None) -> list[WorkloadState]: ...

    @abc.abstractmethod
    def services(self) -> list[ServiceSummary]: ...

    @abc.abstractmethod
    def health_counts(self) -> dict[Health, int]:
        """Workloads per health state."""

    @abc.abstractmethod
    def known_vip(self, key: str) -> IPAddress | None: ...

    @abc.abstractmethod
    async def wait(self, index: int, timeout: float) -> int:
        """Block until the index is past `index` or `timeout` passes; returns the index."""

    @abc.abstractmethod
    def changes_since(self, index: int) -> set[str] | None:
        """Workload ids changed after `index`; None if that is too old to tell (resync)."""

    @abc.abstractmethod
    def subscribe(self, listener: ChangeListener) -> Callable[[], None]: ...


def owner_conflict(workload_id: str, stored_source: str) -> Conflict:
    """What a refused conditional write raises, the same from every backend."""
    return Conflict(f"workload {workload_id!r} belongs to {stored_source}")


class MemoryView:
    """The read side shared by backends: workloads by id and by service, the change log."""

    def __init__(self) -> None:
        self.by_id: dict[str, WorkloadState] = {}
        self.by_service: dict[ServiceKey, dict[str, WorkloadState]] = {}
        self.vips: dict[str, IPAddress] = {}
        # kept in step on every change: status and metrics never walk 100,000 workloads
        self.health_counts: collections.Counter[Health] = collections.Counter()
        self.index = 0
        self._log: collections.deque[tuple[int, str]] = collections.deque(maxlen=CHANGELOG_SIZE)
        self._changed = ChangeSignal()
        self._listeners: list[ChangeListener] = []

    def load(self, states: Iterable[WorkloadState], index: int) -> None:
        for st in states:
            self._insert(st)
        self.index = index

    def _insert(self, st: WorkloadState) -> None:
        self.by_id[st.workload.id] = st
        self.health_counts[st.health] += 1
        self.by_service.setdefault(st.workload.service, {})[st.workload.id] = st

    def _remove(self, workload_id: str) -> WorkloadState | None:
        old = self.by_id.pop(workload_id, None)
        if old is not None:
            self.health_counts[old.health] -= 1
            members = self.by_service[old.workload.service]
            del members[workload_id]
            if not members:
                del self.by_service[old.workload.service]
        return old

    def apply(self, index: int, workload_id: str, state: WorkloadState | None) -> None:
        """Apply one durable change (state None = deleted) and wake watchers."""
        self._remove(workload_id)
        if state is not None:
            self._insert(state)
        self.index = index
        self._log.append((index, workload_id))
        for listener in list(self._listeners):
            listener(index, workload_id, state)
        self._changed.notify()

    def get(self, workload_id: str) -> WorkloadState:
        try:
            return self.by_id[workload_id]
        except KeyError:
            raise NotFound(f"workload {workload_id!r} is not registered") from None

    def workloads(self, service: ServiceKey | None = None) -> list[WorkloadState]:
        if service is None:
            return [self.by_id[k] for k in sorted(self.by_id)]
        members = self.by_service.get(service, {})
        return [members[k] for k in sorted(members)]

    def services(self) -> list[ServiceSummary]:
        out = []
        for key in sorted(self.by_service):
            members = self.by_service[key]
            ports: dict[str, int] = {}
            healthy = 0
            for wid in sorted(members):
                st = members[wid]
                for name, port in st.workload.ports.items():
                    ports.setdefault(name, port)
                healthy += st.health is Health.PASSING
            out.append(
                ServiceSummary(key, self.vips.get(str(key)), ports, healthy, len(members))
            )
        return out

    async def wait(self, index: int, timeout: float) -> int:
        if self.index <= index and timeout > 0:
            await self._changed.wait_past(lambda: self.index, index, timeout)
        return self.index

    def changes_since(self, index: int) -> set[str] | None:
        if index >= self.index:
            return set()
        if not self._log or self._log[0][0] > index + 1:
            return None
        return {wid for i, wid in self._log if i > index}

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)
