"""`global`: answers the federation's service names from the routing table (DESIGN §3).

    global [ZONE] {
        ttl SECONDS
    }

Every answer is encoded when a routing table is published, so a query costs one dict lookup
and a few byte concatenations. A name that exists without the asked type is NODATA, an
unknown name NXDOMAIN, both with the zone SOA in authority (RFC 2308).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from dns.answers import QNAME_PTR, Answer, authoritative, ip_rdata, rr, soa_rdata, srv_rdata
from dns.corefile import Directive
from dns.metrics import GLOBAL_NAMES, GLOBAL_TABLE_VERSION
from dns.plugin import Plugin, Setup, Writer, arg_count, int_arg, register, serve_next, zone_args
from dns.wire import (
    AAAA,
    ANY,
    AXFR,
    CLASS_ANY,
    CLASS_IN,
    IXFR,
    NOERROR,
    NS,
    NXDOMAIN,
    REFUSED,
    SOA,
    SRV,
    A,
    Request,
    is_subdomain,
    text_to_wire,
)
from federation.routing import IPAddress, RoutingTable, TableHolder

log = logging.getLogger(__name__)

DEFAULT_ZONE = "global."
DEFAULT_TTL = 30
SRV_PRIORITY = 0
SRV_WEIGHT = 100


def _label(text: str) -> bytes:
    raw = text.encode("ascii")
    return bytes([len(raw)]) + raw


@dataclass(frozen=True, slots=True)
class ZoneIndex:
    """Every answer of one zone for one routing table, keyed by lowercase wire name."""

    version: int
    nodes: dict[bytes, dict[int, Answer]]
    nodata: Answer
    nxdomain: Answer


def build_index(
    table: RoutingTable, zone: bytes, ttl: int, apex_addresses: tuple[IPAddress, ...] = ()
) -> ZoneIndex:
    """Encode all answers of `zone` for `table` (sans-IO; pure function of its inputs)."""
    hostmaster = b"\x0ahostmaster" + zone
    soa = rr(zone, SOA, ttl, soa_rdata(zone, hostmaster, table.version, 7200, 1800, 86400, ttl))
    # records[name][type] = (answer RRs, additional RRs)
    records: dict[bytes, dict[int, tuple[list[bytes], list[bytes]]]] = {}

    def add(name: bytes, rtype: int, answer: bytes, extra: bytes | None = None) -> None:
        slot = records.setdefault(name, {}).setdefault(rtype, ([], []))
        slot[0].append(answer)
        if extra is not None:
            slot[1].append(extra)

    def address_rr(owner: bytes, vip: IPAddress) -> tuple[int, bytes]:
        rtype = A if vip.version == 4 else AAAA
        return rtype, rr(owner, rtype, ttl, ip_rdata(vip))

    add(zone, SOA, rr(QNAME_PTR, SOA, ttl, soa[len(zone) + 10 :]))
    add(zone, NS, rr(QNAME_PTR, NS, ttl, zone))
    for ip in apex_addresses:
        add(zone, *address_rr(QNAME_PTR, ip))

    for key, route in table.services.items():
        base = _label(key.name) + _label(key.namespace)
        targets: list[tuple[bytes, IPAddress]] = [(base + zone, route.vip)]
        targets += [(base + _label(c) + zone, vip) for c, vip in sorted(route.cluster_vips.items())]
        for owner, vip in targets:
            add(owner, *address_rr(QNAME_PTR, vip))
            rtype, glue = address_rr(owner, vip)
            for port_name, port in sorted(route.ports.items()):
                if not 0 < len(port_name) < 63:
                    continue
                srv_owner = _label("_" + port_name) + b"\x04_tcp" + owner
                add(
                    srv_owner,
                    SRV,
                    rr(QNAME_PTR, SRV, ttl, srv_rdata(SRV_PRIORITY, SRV_WEIGHT, port, owner)),
                    glue,
                )

    nodes: dict[bytes, dict[int, Answer]] = {}
    for name, by_type in records.items():
        answers: dict[int, Answer] = {}
        all_an: list[bytes] = []
        all_ar: list[bytes] = []
        for rtype, (an, ar) in by_type.items():
            answers[rtype] = authoritative(NOERROR, an, [], ar)
            all_an += an
            all_ar += ar
        answers[ANY] = authoritative(NOERROR, all_an, [], all_ar)
        nodes[name] = answers
        # Empty non-terminals exist (NODATA, never NXDOMAIN): every ancestor up to the zone.
        pos = 0
        while len(name) - pos > len(zone):
            pos += name[pos] + 1
            nodes.setdefault(name[pos:], {})
    return ZoneIndex(
        version=table.version,
        nodes=nodes,
        nodata=authoritative(NOERROR, [], [soa], []),
        nxdomain=authoritative(NXDOMAIN, [], [soa], []),
    )


EMPTY_INDEX = ZoneIndex(
    -1, {}, authoritative(REFUSED, [], [], []), authoritative(REFUSED, [], [], [])
)


class GlobalPlugin(Plugin):
    name = "global"

    def __init__(
        self,
        zone: str,
        ttl: int,
        tables: TableHolder,
        apex_addresses: tuple[IPAddress, ...] = (),
        server: str = "",
    ) -> None:
        super().__init__()
        self.zone = zone
        self.zone_wire = text_to_wire(zone)
        self.ttl = ttl
        self.tables = tables
        self.apex_addresses = apex_addresses
        self.server = server
        self._unsubscribe: Callable[[], None] | None = None
        self.index = EMPTY_INDEX  # encoded at start(), not for a setup-only instance

    def _build(self, table: RoutingTable) -> ZoneIndex:
        t0 = time.perf_counter()
        index = build_index(table, self.zone_wire, self.ttl, self.apex_addresses)
        GLOBAL_NAMES.labels(self.server, self.zone).set(len(index.nodes))
        GLOBAL_TABLE_VERSION.labels(self.server, self.zone).set(table.version)
        log.info(
            "global zone encoded",
            extra={
                "zone": self.zone,
                "server": self.server,
                "version": table.version,
                "services": len(table.services),
                "names": len(index.nodes),
                "seconds": round(time.perf_counter() - t0, 4),
            },
        )
        return index

    def _on_table(self, table: RoutingTable) -> None:
        self.index = self._build(table)  # one reference swap: readers see old or new

    async def start(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.tables.subscribe(self._on_table)
            self._on_table(self.tables.current)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def ready(self) -> bool:
        return self.index is not EMPTY_INDEX and self.index.version > 0

    def serve(self, req: Request, w: Writer) -> int:
        if not is_subdomain(req.qlower, req.labels, self.zone_wire):
            return serve_next(self, req, w)
        if req.qclass != CLASS_IN and req.qclass != CLASS_ANY:
            return REFUSED
        if req.qtype == AXFR or req.qtype == IXFR:
            return REFUSED
        index = self.index
        node = index.nodes.get(req.qlower)
        answer = index.nxdomain if node is None else node.get(req.qtype) or index.nodata
        req.local = True
        w.write(answer.render(req))
        return answer.rcode


@register("global")
def setup(s: Setup, d: Directive) -> GlobalPlugin:
    arg_count(d, 0, 1)
    zone = zone_args(d.args, (DEFAULT_ZONE,))[0]
    ttl = DEFAULT_TTL
    for sub in d.block or ():
        if sub.name == "ttl":
            arg_count(sub, 1, 1)
            ttl = int_arg(sub.args[0], 0, 86400, "a TTL in seconds")
        else:
            raise sub.token.error(f"global: unknown property {sub.name!r} (known: ttl)")
    apex: list[IPAddress] = []
    for host in s.listen_hosts:
        ip = ipaddress.ip_address(host)
        if not ip.is_unspecified:
            apex.append(ip)
    return GlobalPlugin(zone, ttl, s.tables, tuple(apex), s.server)
