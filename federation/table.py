"""Builds routing-table snapshots from the local catalog, the peers' exports and the traffic
policies, and publishes them.

Changes are coalesced: a burst of registrations triggers one rebuild, and a rebuild only
recomputes the local destinations of services whose workloads changed (from the catalog's
change log). Peer and policy changes recompose the routes from those cached destinations.

Priorities (DESIGN §5): the local cluster 0, clusters in the same region 1, the rest 2. A
policy's weights apply to the clusters it names; `failover` says whether a cluster's share
moves elsewhere when it has no healthy capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace

from discovery.catalog import Catalog
from discovery.errors import DiscoveryError
from discovery.model import Health, Locality, WorkloadState
from discovery.names import ServiceKey
from federation.feed import FeedState
from federation.policy import PolicyStore
from federation.routing import (
    Destination,
    Endpoint,
    IPAddress,
    RoutingTable,
    ServiceRoute,
    TableHolder,
)

PRIORITY_LOCAL, PRIORITY_REGION, PRIORITY_OTHER = 0, 1, 2

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


def remote_destination(
    peer: str, feed: FeedState, service: dict, locality: Locality, fallback_gateway: str
) -> Destination:
    region = feed.locality.get("region", "")
    return Destination(
        cluster=peer,
        local=False,
        priority=PRIORITY_REGION if region and region == locality.region else PRIORITY_OTHER,
        healthy=service["healthy"],
        total=service["total"],
        locality=Locality(region, feed.locality.get("zone", "")),
        gateways=tuple(feed.gateways) or (fallback_gateway,),
    )


class _MissingVip(Exception):
    pass


class Imports:
    """What the builder needs to know of peers: (cluster, fallback address, feed) each."""

    def __init__(self) -> None:
        self.feeds: dict[str, tuple[str, FeedState]] = {}


class TableBuilder:
    """Keeps a TableHolder in step with the catalog, the peers' exports and the policies."""

    def __init__(
        self,
        catalog: Catalog,
        holder: TableHolder,
        *,
        cluster: str,
        trust_domain: str,
        locality: Locality,
        exported: Callable[[ServiceKey], bool] = lambda _: False,
        policies: PolicyStore | None = None,
        imports: Imports | None = None,
        known_clusters: Callable[[], frozenset[str]] | None = None,
        debounce: float = 0.02,
    ) -> None:
        self.catalog = catalog
        self.holder = holder
        self.cluster = cluster
        self.trust_domain = trust_domain
        self.locality = locality
        self.exported = exported
        self.policies = policies
        self.imports = imports or Imports()
        self.known_clusters = known_clusters or (lambda: frozenset({cluster}))
        self.debounce = debounce
        self._by_vip: dict[IPAddress, tuple[ServiceKey, str | None]] = {}
        self._built_index = -1
        self._local: dict[ServiceKey, tuple[dict[str, int], Destination]] = {}
        self._routes: dict[ServiceKey, ServiceRoute] = {}
        self._recompose_all = True
        self._recompose: set[ServiceKey] = set()
        self._owner: dict[str, ServiceKey] = {}  # workload id -> service, as last built
        self._version = holder.current.version
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def invalidate(self, keys: set[ServiceKey] | None = None) -> None:
        """Peers or policies changed: recompose these routes (None: every route) next."""
        if keys is None:
            self._recompose_all = True
        else:
            self._recompose |= keys
        self._dirty.set()

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
            # Coalesce a burst (a registration storm) into one rebuild; bounds rebuild CPU.
            await asyncio.sleep(self.debounce)
            self._dirty.clear()
            try:
                await self.rebuild()
            except Exception as e:  # the builder must outlive any one bad rebuild
                log.exception("routing table rebuild failed", extra={"error": str(e)})
                self._recompose_all = True
                await asyncio.sleep(1)
                self._dirty.set()

    async def rebuild(self) -> RoutingTable:
        index = self.catalog.index
        changed = self.catalog.changes_since(self._built_index) if self._built_index >= 0 else None
        if changed is None:
            keys = {st.workload.service for st in self.catalog.workloads()} | set(self._local)
        else:
            keys = set()
            for wid in changed:
                # the service it was in (if it moved or left) and the one it is in now
                if wid in self._owner:
                    keys.add(self._owner[wid])
                with contextlib.suppress(DiscoveryError):
                    keys.add(self.catalog.get(wid).workload.service)
        for key in keys:
            old = self._local.pop(key, None)
            if old is not None:
                for e in old[1].endpoints:
                    self._owner.pop(e.workload_id, None)
            members = self.catalog.workloads(key)
            if members:
                for st in members:
                    self._owner[st.workload.id] = key
                self._local[key] = (
                    service_ports(members),
                    local_destination(self.cluster, self.locality, members),
                )
        if self._recompose_all:
            self._recompose_all = False
            remote_keys: set[ServiceKey] = set()
            for _, feed in self.imports.feeds.values():
                for name in feed.services:
                    with contextlib.suppress(ValueError):
                        remote_keys.add(ServiceKey.parse(name))
            policy_keys = {p.service for p in self.policies.all()} if self.policies else set()
            keys = set(self._local) | remote_keys | set(self._routes) | policy_keys
        keys |= self._recompose
        self._recompose = set()
        pending = keys
        while pending:
            # Peer updates may land while VIPs are being allocated: compose, and allocate
            # again for whatever a newly seen cluster needs.
            await self._allocate_vips(pending)
            retry = set()
            for key in pending:
                try:
                    route = self._compose(key)
                except _MissingVip:
                    retry.add(key)
                    continue
                self._set_route(key, route)
            pending = retry
        self._built_index = index
        self._version += 1
        # Plain dict copies (C speed): building from the route list would be a Python loop
        # over every service on every change.
        table = RoutingTable(
            version=self._version,
            cluster=self.cluster,
            trust_domain=self.trust_domain,
            services=dict(self._routes),
            clusters=self.known_clusters() | {self.cluster},
            by_vip=dict(self._by_vip),
        )
        self.holder.publish(table)
        return table

    def _set_route(self, key: ServiceKey, route: ServiceRoute | None) -> None:
        old = self._routes.pop(key, None)
        if old is not None:
            self._by_vip.pop(old.vip, None)
            for vip in old.cluster_vips.values():
                self._by_vip.pop(vip, None)
        if route is not None:
            self._routes[key] = route
            self._by_vip[route.vip] = (key, None)
            for c, vip in route.cluster_vips.items():
                self._by_vip[vip] = (key, c)

    async def _allocate_vips(self, keys: set[ServiceKey]) -> None:
        """Every VIP these routes need, allocated at once: the catalog commits them together."""
        wanted = []
        for key in keys:
            name = str(key)
            clusters = {self.cluster} if key in self._local else set()
            for peer, (_, feed) in self.imports.feeds.items():
                if name in feed.services:
                    clusters.add(peer)
            if clusters:
                wanted.append(name)
                wanted.extend(f"{name}.{c}" for c in clusters)
        missing = [k for k in wanted if self.catalog.known_vip(k) is None]
        if missing:
            await asyncio.gather(*(self.catalog.vip(k) for k in missing))

    def _vip(self, name: str) -> IPAddress:
        vip = self.catalog.known_vip(name)
        if vip is None:
            raise _MissingVip(name)
        return vip

    def _compose(self, key: ServiceKey) -> ServiceRoute | None:
        dests: list[Destination] = []
        ports: dict[str, int] = {}
        local = self._local.get(key)
        if local is not None:
            ports = dict(local[0])
            dests.append(local[1])
        name = str(key)
        for peer in sorted(self.imports.feeds):
            address, feed = self.imports.feeds[peer]
            svc = feed.services.get(name)
            if svc is None or peer == self.cluster:
                continue
            dests.append(remote_destination(peer, feed, svc, self.locality, address))
            for pname, port in svc["ports"].items():
                ports.setdefault(pname, port)
        if not dests:
            return None
        policy = self.policies.get(key) if self.policies else None
        failover, version = True, None
        if policy is not None and policy.weights is not None:
            weights = policy.weights
            dests = [replace(d, weight=weights.get(d.cluster, 0)) for d in dests]
            failover, version = policy.failover, str(policy.stamp)
        dests.sort(key=lambda d: (d.priority, d.cluster))
        vip = self._vip(name)
        cluster_vips = {d.cluster: self._vip(f"{name}.{d.cluster}") for d in dests}
        return ServiceRoute(
            service=key,
            vip=vip,
            ports=ports,
            destinations=tuple(dests),
            cluster_vips=cluster_vips,
            failover=failover,
            policy_version=version,
            exported=local is not None and self.exported(key),
        )


# The builder with no peers and no policies: the local catalog alone.
LocalTableBuilder = TableBuilder
