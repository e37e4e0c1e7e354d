"""The routing table: an immutable, versioned snapshot read by the gateways and the resolver.

`federation` computes it (from the catalog, peers' exports and traffic policies); `gateway`
and `dns` only read it. A new snapshot replaces the old one atomically through a
`TableHolder`; readers keep whichever snapshot they started with. Mappings inside a snapshot
are plain dicts (so snapshots pickle to worker processes) and are never mutated after build.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from discovery.model import EMPTY_LOCALITY, Locality
from discovery.names import ServiceKey

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A local workload that can take traffic."""

    workload_id: str
    address: str
    ports: Mapping[str, int]
    weight: int = 1
    healthy: bool = True
    locality: Locality = EMPTY_LOCALITY


@dataclass(frozen=True, slots=True)
class Destination:
    """One cluster that serves a service: the local one (endpoints) or a remote one (gateways)."""

    cluster: str
    local: bool
    priority: int = 0  # 0 is tried first; higher numbers are failover tiers
    weight: int = 0  # operator weight from a traffic policy; 0 when no policy applies
    healthy: int = 0  # healthy endpoints (remote: as reported by the peer's export feed)
    total: int = 0
    locality: Locality = EMPTY_LOCALITY
    gateways: tuple[str, ...] = ()  # remote: public ingress "host:port" addresses
    endpoints: tuple[Endpoint, ...] = ()  # local: the workloads


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    service: ServiceKey
    vip: IPAddress
    ports: Mapping[str, int]
    destinations: tuple[Destination, ...]
    # `<name>.<namespace>.<cluster>.global` resolves to a VIP that routes only to that cluster.
    cluster_vips: Mapping[str, IPAddress] = field(default_factory=dict)
    failover: bool = True
    policy_version: str | None = None
    exported: bool = False

    def destination(self, cluster: str) -> Destination | None:
        for d in self.destinations:
            if d.cluster == cluster:
                return d
        return None


@dataclass(frozen=True, slots=True)
class RoutingTable:
    version: int
    cluster: str
    trust_domain: str
    services: Mapping[ServiceKey, ServiceRoute]
    clusters: frozenset[str] = frozenset()
    # VIP -> (service, pinned cluster or None); built once per snapshot for the egress.
    by_vip: Mapping[IPAddress, tuple[ServiceKey, str | None]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        version: int,
        cluster: str,
        trust_domain: str,
        routes: list[ServiceRoute] | tuple[ServiceRoute, ...],
        clusters: frozenset[str] | None = None,
    ) -> RoutingTable:
        services = {r.service: r for r in routes}
        by_vip: dict[IPAddress, tuple[ServiceKey, str | None]] = {}
        seen_clusters = {cluster}
        for r in routes:
            by_vip[r.vip] = (r.service, None)
            for c, vip in r.cluster_vips.items():
                by_vip[vip] = (r.service, c)
            seen_clusters.update(d.cluster for d in r.destinations)
        return cls(
            version=version,
            cluster=cluster,
            trust_domain=trust_domain,
            services=services,
            clusters=frozenset(clusters if clusters is not None else seen_clusters),
            by_vip=by_vip,
        )

    def get(self, service: ServiceKey) -> ServiceRoute | None:
        return self.services.get(service)


EMPTY_TABLE = RoutingTable.build(0, "local", "local", [])

Listener = Callable[[RoutingTable], None]


class TableHolder:
    """Holds the current snapshot; swapping it is one reference assignment, then listeners run."""

    def __init__(self, table: RoutingTable = EMPTY_TABLE) -> None:
        self._table = table
        self._listeners: list[Listener] = []

    @property
    def current(self) -> RoutingTable:
        return self._table

    def publish(self, table: RoutingTable) -> None:
        if table.version <= self._table.version and self._table is not EMPTY_TABLE:
            raise ValueError(
                f"routing table version {table.version} is not newer than {self._table.version}"
            )
        self._table = table
        for listener in list(self._listeners):
            listener(table)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)


# --- JSON form, for agents that read their cluster's table over the control channel --------


def _locality_json(loc: Locality) -> list[str]:
    return [loc.region, loc.zone]


def table_to_json(table: RoutingTable) -> dict[str, object]:
    return {
        "version": table.version,
        "cluster": table.cluster,
        "trust_domain": table.trust_domain,
        "clusters": sorted(table.clusters),
        "services": [
            {
                "name": r.service.name,
                "namespace": r.service.namespace,
                "vip": str(r.vip),
                "ports": dict(r.ports),
                "cluster_vips": {c: str(v) for c, v in r.cluster_vips.items()},
                "failover": r.failover,
                "policy_version": r.policy_version,
                "exported": r.exported,
                "destinations": [
                    {
                        "cluster": d.cluster,
                        "local": d.local,
                        "priority": d.priority,
                        "weight": d.weight,
                        "healthy": d.healthy,
                        "total": d.total,
                        "locality": _locality_json(d.locality),
                        "gateways": list(d.gateways),
                        "endpoints": [
                            [
                                e.workload_id,
                                e.address,
                                dict(e.ports),
                                e.weight,
                                e.healthy,
                                _locality_json(e.locality),
                            ]
                            for e in d.endpoints
                        ],
                    }
                    for d in r.destinations
                ],
            }
            for r in table.services.values()
        ],
    }


def table_from_json(raw: dict, version: int | None = None) -> RoutingTable:
    """Rebuild a snapshot; raises ValueError/KeyError/TypeError on a malformed document."""
    routes = []
    for s in raw["services"]:
        dests = []
        for d in s["destinations"]:
            endpoints = tuple(
                Endpoint(
                    str(wid),
                    str(addr),
                    {str(k): int(v) for k, v in ports.items()},
                    int(weight),
                    bool(healthy),
                    Locality(*map(str, loc)),
                )
                for wid, addr, ports, weight, healthy, loc in d["endpoints"]
            )
            dests.append(
                Destination(
                    cluster=str(d["cluster"]),
                    local=bool(d["local"]),
                    priority=int(d["priority"]),
                    weight=int(d["weight"]),
                    healthy=int(d["healthy"]),
                    total=int(d["total"]),
                    locality=Locality(*map(str, d["locality"])),
                    gateways=tuple(str(g) for g in d["gateways"]),
                    endpoints=endpoints,
                )
            )
        routes.append(
            ServiceRoute(
                service=ServiceKey(str(s["name"]), str(s["namespace"])),
                vip=ipaddress.ip_address(s["vip"]),
                ports={str(k): int(v) for k, v in s["ports"].items()},
                destinations=tuple(dests),
                cluster_vips={
                    str(c): ipaddress.ip_address(v) for c, v in s["cluster_vips"].items()
                },
                failover=bool(s["failover"]),
                policy_version=s["policy_version"],
                exported=bool(s["exported"]),
            )
        )
    return RoutingTable.build(
        int(raw["version"]) if version is None else version,
        str(raw["cluster"]),
        str(raw["trust_domain"]),
        routes,
        clusters=frozenset(map(str, raw["clusters"])),
    )
