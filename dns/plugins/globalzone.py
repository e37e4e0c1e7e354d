"""`global`: answers the federation's service names from the routing table (DESIGN §3).

    global [ZONE] {
        ttl SECONDS
    }

When a routing table is published the zone's names are indexed (cheaply, and for large tables
a step at a time so the event loop keeps serving); a name's answers are encoded the first
time it is asked for, so a query costs one dict lookup and a few byte concatenations. A name
that exists without the asked type is NODATA, an unknown name NXDOMAIN, both with the zone
SOA in authority (RFC 2308).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Generator

from dns.answers import QNAME_PTR, Answer, authoritative, ip_rdata, rr, soa_rdata, srv_rdata
from dns.corefile import Directive
from dns.metrics import GLOBAL_NAMES, GLOBAL_TABLE_VERSION
from dns.plugin import (
    FAST_ANSWERS,
    Plugin,
    Setup,
    Writer,
    arg_count,
    int_arg,
    register,
    serve_next,
    zone_args,
)
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


# One record a name holds, not yet encoded: (type, SRV port, SRV target, packed address;
# A or AAAA by its length). A name keeps a tuple of these (usually one) and encoding waits
# for its first query. Tuples of bytes and ints only: the garbage collector stops tracking
# them, so a large index does not make every full collection slower.
Contribution = tuple[int, int, bytes, bytes]

# Tables up to this many services are indexed synchronously in the publish callback (a few
# milliseconds); larger ones in steps of STEP_SERVICES between which the loop runs.
SYNC_SERVICES = 2000
STEP_SERVICES = 500


class ZoneIndex:
    """The names of one zone for one routing table, keyed by lowercase wire name.

    Built cheaply (which names exist and what they hold); each name's answers are encoded
    the first time it is asked for and kept for the life of the index. `fast` holds the
    answers already given, by `Request.key`, for the UDP fast path (dns.fastpath).
    """

    __slots__ = ("encoded", "fast", "fast_cap", "nodata", "nxdomain", "specs", "ttl", "version")

    def __init__(
        self,
        version: int,
        ttl: int,
        specs: dict[bytes, tuple[Contribution, ...]],
        apex: tuple[bytes, dict[int, Answer]] | None,
        nodata: Answer,
        nxdomain: Answer,
    ) -> None:
        self.version = version
        self.ttl = ttl
        self.specs = specs  # empty: an empty non-terminal (NODATA for every type)
        self.encoded: dict[bytes, dict[int, Answer]] = dict([apex]) if apex else {}
        self.nodata = nodata
        self.nxdomain = nxdomain
        self.fast: dict[bytes, Answer] = {}
        # Bounds the memo: every name with a few types; cleared (not grown) past it.
        self.fast_cap = 4 * len(specs) + 1024

    def answers(self, name: bytes) -> dict[int, Answer] | None:
        """The answers of `name` by type (ANY included), or None when it does not exist."""
        node = self.encoded.get(name)
        if node is None:
            spec = self.specs.get(name)
            if spec is None:
                return None
            node = self.encoded[name] = _encode_node(spec, self.ttl)
        return node

    def remember(self, key: bytes, answer: Answer) -> None:
        fast = self.fast
        if len(fast) >= self.fast_cap:
            fast.clear()
        fast[key] = answer


def _address_rr(owner: bytes, packed: bytes, ttl: int) -> bytes:
    return rr(owner, A if len(packed) == 4 else AAAA, ttl, packed)


def _encode_node(spec: tuple[Contribution, ...], ttl: int) -> dict[int, Answer]:
    # by_type[type] = (answer RRs, additional RRs), in the order the records were added.
    by_type: dict[int, tuple[list[bytes], list[bytes]]] = {}
    for rtype, port, target, vip in spec:
        an, ar = by_type.setdefault(rtype, ([], []))
        if rtype == SRV:
            an.append(rr(QNAME_PTR, SRV, ttl, srv_rdata(SRV_PRIORITY, SRV_WEIGHT, port, target)))
            ar.append(_address_rr(target, vip, ttl))
        else:
            an.append(_address_rr(QNAME_PTR, vip, ttl))
    if not by_type:
        return {}  # an empty non-terminal
    answers: dict[int, Answer] = {}
    all_an: list[bytes] = []
    all_ar: list[bytes] = []
    for rtype, (an, ar) in by_type.items():
        answers[rtype] = authoritative(NOERROR, an, [], ar)
        all_an += an
        all_ar += ar
    answers[ANY] = authoritative(NOERROR, all_an, [], all_ar)
    return answers


def index_steps(
    table: RoutingTable,
    zone: bytes,
    ttl: int,
    apex_addresses: tuple[IPAddress, ...] = (),
    step: int = STEP_SERVICES,
) -> Generator[None, None, ZoneIndex]:
    """Index `zone` for `table`, yielding after every `step` services (sans-IO: the caller
    decides whether to run it through at once or to let an event loop run in between)."""
    hostmaster = b"\x0ahostmaster" + zone
    soa = rr(zone, SOA, ttl, soa_rdata(zone, hostmaster, table.version, 7200, 1800, 86400, ttl))
    apex: dict[int, tuple[list[bytes], list[bytes]]] = {
        SOA: ([rr(QNAME_PTR, SOA, ttl, soa[len(zone) + 10 :])], []),
        NS: ([rr(QNAME_PTR, NS, ttl, zone)], []),
    }
    for ip in apex_addresses:
        apex.setdefault(A if ip.version == 4 else AAAA, ([], []))[0].append(
            _address_rr(QNAME_PTR, ip_rdata(ip), ttl)
        )
    apex_answers = {t: authoritative(NOERROR, an, [], ar) for t, (an, ar) in apex.items()}
    apex_answers[ANY] = authoritative(NOERROR, [r for an, _ in apex.values() for r in an], [], [])

    specs: dict[bytes, tuple[Contribution, ...]] = {zone: ()}
    zlen = len(zone)
    for done, route in enumerate(table.services.values(), 1):
        key = route.service
        base = _label(key.name) + _label(key.namespace)
        targets: list[tuple[bytes, IPAddress]] = [(base + zone, route.vip)]
        targets += [(base + _label(c) + zone, vip) for c, vip in sorted(route.cluster_vips.items())]
        ports = [(n, p) for n, p in sorted(route.ports.items()) if 0 < len(n) < 63]
        for owner, vip in targets:
            packed = ip_rdata(vip)
            node = specs.get(owner)
            if node is None:
                node = ()
                # Empty non-terminals exist (NODATA, never NXDOMAIN): every ancestor up to
                # the zone. A SRV owner's only new ancestor is `_tcp.<owner>`; a name that
                # is already there has all its ancestors too.
                pos = owner[0] + 1
                while len(owner) - pos > zlen:
                    specs.setdefault(owner[pos:], ())
                    pos += owner[pos] + 1
            specs[owner] = (*node, (A if len(packed) == 4 else AAAA, 0, b"", packed))
            if ports:
                specs.setdefault(b"\x04_tcp" + owner, ())
            for port_name, port in ports:
                srv_owner = _label("_" + port_name) + b"\x04_tcp" + owner
                specs[srv_owner] = (*specs.get(srv_owner, ()), (SRV, port, owner, packed))
        if done % step == 0:
            yield
    return ZoneIndex(
        table.version,
        ttl,
        specs,
        (zone, apex_answers),
        authoritative(NOERROR, [], [soa], []),
        authoritative(NXDOMAIN, [], [soa], []),
    )


def build_index(
    table: RoutingTable, zone: bytes, ttl: int, apex_addresses: tuple[IPAddress, ...] = ()
) -> ZoneIndex:
    """`index_steps` run through at once."""
    steps = index_steps(table, zone, ttl, apex_addresses)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


EMPTY_INDEX = ZoneIndex(
    -1, 0, {}, None, authoritative(REFUSED, [], [], []), authoritative(REFUSED, [], [], [])
)


class GlobalPlugin(Plugin):
    name = "global"
    fast_role = FAST_ANSWERS

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
        self._pending: RoutingTable | None = None  # the newest table not yet indexed
        self._builder: asyncio.Task[None] | None = None
        self.index = EMPTY_INDEX  # indexed at start(), not for a setup-only instance

    def _swap(self, index: ZoneIndex, services: int, t0: float, cpu: float) -> None:
        if index.version <= self.index.version:
            return  # a large table finished after a newer, smaller one was indexed
        self.index = index  # one reference swap: readers see the old index or the new one
        GLOBAL_NAMES.labels(self.server, self.zone).set(len(index.specs))
        GLOBAL_TABLE_VERSION.labels(self.server, self.zone).set(index.version)
        log.info(
            "global zone indexed",
            extra={
                "zone": self.zone,
                "server": self.server,
                "version": index.version,
                "services": services,
                "names": len(index.specs),
                "seconds": round(time.perf_counter() - t0, 4),
                "loop_seconds": round(cpu, 4),
            },
        )

    def _on_table(self, table: RoutingTable) -> None:
        if len(table.services) <= SYNC_SERVICES:
            t0 = time.perf_counter()
            index = build_index(table, self.zone_wire, self.ttl, self.apex_addresses)
            self._swap(index, len(table.services), t0, time.perf_counter() - t0)
            return
        self._pending = table
        if self._builder is None or self._builder.done():
            self._builder = asyncio.get_running_loop().create_task(self._build_pending())

    async def _build_pending(self) -> None:
        """Index large tables a step at a time; the newest one published wins, none starve."""
        while self._pending is not None:
            table, self._pending = self._pending, None
            t0 = time.perf_counter()
            cpu = 0.0
            steps = index_steps(table, self.zone_wire, self.ttl, self.apex_addresses)
            while True:
                s0 = time.perf_counter()
                try:
                    next(steps)
                except StopIteration as done:
                    cpu += time.perf_counter() - s0
                    self._swap(done.value, len(table.services), t0, cpu)
                    break
                cpu += time.perf_counter() - s0
                await asyncio.sleep(0)

    async def start(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.tables.subscribe(self._on_table)
            self._on_table(self.tables.current)
            if self._builder is not None:
                await asyncio.shield(self._builder)  # serve (and be ready) with the table

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._builder is not None:
            self._builder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._builder
            self._builder = None

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
        node = index.answers(req.qlower)
        if node is None:
            answer = index.nxdomain
        else:
            answer = node.get(req.qtype) or index.nodata
            if req.qclass == CLASS_IN:
                index.remember(req.key, answer)  # NXDOMAIN is not: any name can be asked
        req.local = True
        w.write(answer.render(req))
        return answer.rcode

    def fast_answer(self, key: bytes, now: float) -> Answer | None:
        return self.index.fast.get(key)

    def fast_stamp(self, answer: Answer, now: float) -> ZoneIndex:
        return self.index  # its answers are fixed until the next table

    def fast_replay(self, stamp: object, now: float) -> bool:
        return stamp is self.index


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
