"""Which VIP listeners a routing table asks for, and what a connection to one of them means.

Sans-IO: a routing table in, listener specs and resolved destinations out. The egress listens on
every `VIP:port` of every service (and on each cluster VIP, which routes to one cluster only),
inside `egress.vip_cidr`. That is one listener per VIP port, and each service has 1 + N VIPs
(N clusters serve it): `name.ns.global` and `name.ns.<cluster>.global` are different addresses,
and a connection's destination address is all the egress learns of which one the client meant,
so neither can share the other's listener.

Every listener is a file descriptor, so the egress opens at most a budget of them
(`fit_budget`): those already open first, then the rest in address order.

Ports named `http`, `http-*`, `http2*` or `grpc*` are handled at L7
(DESIGN §3); `http2`/`grpc` need HTTP/2, which the L7 proxy does not speak, so they are relayed
at L4 unless `http2_at_l7` is set — everything else is relayed at L4.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from discovery.names import ServiceKey
from federation.routing import IPAddress, RoutingTable, ServiceRoute

__all__ = [
    "ListenerSpec",
    "Mode",
    "Resolved",
    "fit_budget",
    "port_mode",
    "resolve",
    "wanted_listeners",
]


class Mode(enum.StrEnum):
    L4 = "l4"
    HTTP = "http"


def port_mode(port_name: str, http2_at_l7: bool = False) -> Mode:
    if port_name == "http" or port_name.startswith("http-"):
        return Mode.HTTP
    if port_name.startswith(("http2", "grpc")):
        return Mode.HTTP if http2_at_l7 else Mode.L4
    return Mode.L4


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    vip: IPAddress
    port: int
    mode: Mode

    @property
    def address(self) -> str:
        return f"[{self.vip}]:{self.port}" if self.vip.version == 6 else f"{self.vip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Resolved:
    route: ServiceRoute
    port_name: str
    pinned_cluster: str | None

    @property
    def service(self) -> ServiceKey:
        return self.route.service


def wanted_listeners(
    table: RoutingTable,
    vip_cidr: ipaddress.IPv4Network | ipaddress.IPv6Network,
    http_at_l7: bool = True,
) -> tuple[dict[tuple[IPAddress, int], ListenerSpec], list[str]]:
    """The listeners `table` needs, and one problem line per VIP or port that cannot get one."""
    wanted: dict[tuple[IPAddress, int], ListenerSpec] = {}
    problems: list[str] = []
    for vip, (service, _pinned) in table.by_vip.items():
        route = table.services.get(service)
        if route is None:
            continue
        if vip.version != vip_cidr.version or vip not in vip_cidr:
            problems.append(f"{service}: VIP {vip} is outside egress.vip_cidr {vip_cidr}")
            continue
        for name, port in route.ports.items():
            mode = port_mode(name) if http_at_l7 else Mode.L4
            key = (vip, port)
            if key in wanted and wanted[key].mode is not mode:
                problems.append(f"{service}: port {port} is listed twice with different names")
                continue
            wanted[key] = ListenerSpec(vip, port, mode)
    return wanted, problems


Key = tuple[IPAddress, int]


def fit_budget(
    wanted: dict[Key, ListenerSpec], open_now: dict[Key, ListenerSpec], budget: int
) -> tuple[dict[Key, ListenerSpec], list[ListenerSpec]]:
    """At most `budget` of the wanted listeners, and the ones left out. Listeners open now and
    still wanted unchanged stay (a table change never moves traffic off a working listener);
    the rest are taken in address order, so whole VIPs are served rather than a few ports of
    each, and the same catalog gives the same choice on every start."""
    kept = {k: s for k, s in wanted.items() if open_now.get(k) == s}
    chosen = dict(list(kept.items())[:budget])
    skipped: list[ListenerSpec] = []
    for key in sorted(wanted, key=lambda k: (k[0].version, int(k[0]), k[1])):
        if key in chosen:
            continue
        if len(chosen) < budget:
            chosen[key] = wanted[key]
        else:
            skipped.append(wanted[key])
    return chosen, skipped


def resolve(table: RoutingTable, address: str, port: int) -> Resolved | None:
    """What a connection accepted on `address:port` (its local address) is for."""
    try:
        vip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(vip, ipaddress.IPv6Address) and vip.ipv4_mapped is not None:
        vip = vip.ipv4_mapped
    entry = table.by_vip.get(vip)
    if entry is None:
        return None
    service, pinned = entry
    route = table.services.get(service)
    if route is None:
        return None
    for name, number in route.ports.items():
        if number == port:
            return Resolved(route, name, pinned)
    return None
