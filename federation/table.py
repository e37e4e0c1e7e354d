"""Builds routing-table snapshots from the local catalog and publishes them.

Changes are coalesced: a burst of registrations triggers one rebuild, and a rebuild only
recomputes the services whose workloads changed (from the catalog's change log), reusing
the other routes of the previous snapshot as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from discovery.catalog import Catalog
from discovery.errors import DiscoveryError
from discovery.model import Health, Locality, WorkloadState
from discovery.names import ServiceKey
from federation.routing import Destination, Endpoint, RoutingTable, ServiceRoute, TableHolder

log = logging.getLogger(__name__)


def local_destination(
    cluster: str, locality: Locality, members: list[WorkloadState]
) -> Destination:
    endpoints = tuple(
        Endpoint(
            workload_id=st.workload.id,
            address=st.workload.address,
            ports=st.workload.ports,
            weight=st.workload.weight,
            healthy=st.health is Health.PASSING,
            locality=st.workload.locality,
        )
        for st in members
    )
    return Destination(
        cluster=cluster,
        local=True,
        priority=0,
        healthy=sum(1 for e in endpoints if e.healthy),
        total=len(endpoints),
        locality=locality,
        endpoints=endpoints,
    )


def service_ports(members: list[WorkloadState]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for st in members:
        for name, port in st.workload.ports.items():
            ports.setdefault(name, port)
    return ports


class LocalTableBuilder:
    """Keeps a TableHolder in step with the local catalog."""

    def __init__(
        self,
        catalog: Catalog,
        holder: TableHolder,
        *,
        cluster: str,
        trust_domain: str,
        locality: Locality,
        exported: Callable[[ServiceKey], bool] = lambda _: False,
    ) -> None:
        self.catalog = catalog
        self.holder = holder
        self.cluster = cluster
        self.trust_domain = trust_domain
        self.locality = locality
        self.exported = exported
        self._built_index = -1
        self._routes: dict[ServiceKey, ServiceRoute] = {}
        self._owner: dict[str, ServiceKey] = {}  # workload id -> service, as last built
        self._version = holder.current.version
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        await self.rebuild()
        self._unsubscribe = self.catalog.subscribe(lambda *_: self._dirty.set())
        self._task = asyncio.create_task(self._run(), name="routing-table")

    async def stop(self) -> None:
        if self._unsubscribe:
            self._unsubscribe()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(0)  # let the rest of a burst land first
            self._dirty.clear()
            try:
                await self.rebuild()
            except DiscoveryError as e:
                log.error("routing table rebuild failed", extra={"error": str(e)})
                await asyncio.sleep(1)
                self._dirty.set()

    async def rebuild(self) -> RoutingTable:
        index = self.catalog.index
        changed = self.catalog.changes_since(self._built_index) if self._built_index >= 0 else None
        if changed is None:
            keys = {st.workload.service for st in self.catalog.workloads()} | set(self._routes)
        else:
            keys = set()
            for wid in changed:
                # the service it was in (if it moved or left) and the one it is in now
                if wid in self._owner:
                    keys.add(self._owner[wid])
                with contextlib.suppress(DiscoveryError):
                    keys.add(self.catalog.get(wid).workload.service)
        for key in keys:
            old = self._routes.get(key)
            if old is not None:
                for dest in old.destinations:
                    for e in dest.endpoints:
                        self._owner.pop(e.workload_id, None)
            members = self.catalog.workloads(key)
            if not members:
                self._routes.pop(key, None)
                continue
            for st in members:
                self._owner[st.workload.id] = key
            vip = await self.catalog.vip(str(key))
            pinned = await self.catalog.vip(f"{key}.{self.cluster}")
            self._routes[key] = ServiceRoute(
                service=key,
                vip=vip,
                ports=service_ports(members),
                destinations=(local_destination(self.cluster, self.locality, members),),
                cluster_vips={self.cluster: pinned},
                exported=self.exported(key),
            )
        self._built_index = index
        self._version += 1
        table = RoutingTable.build(
            self._version, self.cluster, self.trust_domain, list(self._routes.values()),
            clusters=frozenset({self.cluster}),
        )
        self.holder.publish(table)
        return table
