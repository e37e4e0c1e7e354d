"""`cache`: replies of the plugins behind it (normally `forward`), positive and negative.

    cache [TTL] [ZONES...] {
        success CAPACITY [TTL] [MINTTL]
        denial CAPACITY [TTL] [MINTTL]
        prefetch AMOUNT [[DURATION] [PERCENTAGE%]]
    }

TTL caps what is stored (default 3600 s for answers, 1800 s for NXDOMAIN/NODATA, whose
lifetime is the SOA minimum per RFC 2308); MINTTL is the floor (default 5 s). CAPACITY
bounds each half (default 9984 entries; the oldest entry is evicted first). With prefetch, an
entry asked AMOUNT times within DURATION (default 1m) is refreshed in the background once
less than PERCENTAGE (default 10%) of its TTL remains, so popular names never expire.

Hits are served from the stored wire bytes: ID, RD and the counted-down TTLs are patched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dns.answers import Answer, CachedAnswer
from dns.corefile import Directive, Token
from dns.errors import WireError
from dns.metrics import CACHE_ENTRIES, CACHE_EVICTIONS, CACHE_HITS, CACHE_MISSES, CACHE_PREFETCHES
from dns.plugin import (
    FAST_ANSWERS,
    FAST_OPAQUE,
    PASS,
    Pass,
    Plugin,
    Setup,
    Writer,
    arg_count,
    duration_arg,
    int_arg,
    register,
    serve_next,
    zone_args,
)
from dns.wire import (
    AA,
    NOERROR,
    NXDOMAIN,
    OPT,
    SOA,
    Request,
    is_subdomain,
    scan_message,
    text_to_wire,
)

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 9984
MAX_SUCCESS_TTL = 3600
MAX_DENIAL_TTL = 1800
MIN_TTL = 5
SUCCESS, DENIAL = "success", "denial"


class _NullWriter:
    __slots__ = ()

    def write(self, reply: bytes) -> None:
        """A prefetch has no client to answer."""


class _StoringWriter:
    __slots__ = ("cache", "inner", "req")

    def __init__(self, cache: CachePlugin, req: Request, inner: Writer) -> None:
        self.cache = cache
        self.req = req
        self.inner = inner

    def write(self, reply: bytes) -> None:
        if self.req.local:
            self.inner.write(reply)
            return
        try:
            self.cache.store(self.req, reply, time.monotonic())
        except Exception:  # a reply we cannot cache is still a reply
            log.exception("dns cache store failed", extra={"server": self.cache.server})
        self.inner.write(reply)


class Store:
    """One half of the cache: a dict in insertion order, oldest evicted first."""

    def __init__(self, kind: str, capacity: int, max_ttl: int, min_ttl: int, server: str):
        self.kind = kind
        self.capacity = capacity
        self.max_ttl = max_ttl
        self.min_ttl = min_ttl
        self.server = server
        self.entries: dict[bytes, CachedAnswer] = {}

    def bind_metrics(self) -> None:
        # Not in __init__: a server sets its plugins up once just to validate the Corefile,
        # and those throwaway instances must not export series.
        self._gauge = CACHE_ENTRIES.labels(self.server, self.kind)
        self._evictions = CACHE_EVICTIONS.labels(self.server, self.kind)

    def put(self, key: bytes, entry: CachedAnswer) -> None:
        entries = self.entries
        old = entries.pop(key, None)
        if old is not None:
            old.live = False
        while len(entries) >= self.capacity:
            entries.pop(next(iter(entries))).live = False
            self._evictions.inc()
        entries[key] = entry
        self._gauge.set(len(entries))

    def drop(self, key: bytes) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            old.live = False
            self._gauge.set(len(self.entries))


class CachePlugin(Plugin):
    name = "cache"

    def __init__(
        self,
        zones: tuple[str, ...],
        success: tuple[int, int, int],
        denial: tuple[int, int, int],
        prefetch: tuple[int, float, float] | None,
        server: str,
    ) -> None:
        super().__init__()
        self.zones = tuple(text_to_wire(z) for z in zones)
        self.all_zones = self.zones == (b"\x00",)
        self.server = server
        self.success = Store(SUCCESS, *success, server)
        self.denial = Store(DENIAL, *denial, server)
        self.prefetch = prefetch
        # The fast path looks entries up by key alone, which says nothing about the zone.
        self.fast_role = FAST_ANSWERS if self.all_zones else FAST_OPAQUE

    async def start(self) -> None:
        self.success.bind_metrics()
        self.denial.bind_metrics()
        self._hit = {
            SUCCESS: CACHE_HITS.labels(self.server, SUCCESS),
            DENIAL: CACHE_HITS.labels(self.server, DENIAL),
        }
        self._miss = CACHE_MISSES.labels(self.server)
        self._last_hit = self._hit[SUCCESS]
        self._prefetches = CACHE_PREFETCHES.labels(self.server)

    def serve(self, req: Request, w: Writer) -> int:
        if not self.all_zones and not any(
            is_subdomain(req.qlower, req.labels, z) for z in self.zones
        ):
            return serve_next(self, req, w)
        now = time.monotonic()
        key = req.key
        store = self.success
        entry = store.entries.get(key)
        if entry is None:
            store = self.denial
            entry = store.entries.get(key)
        if entry is not None:
            if entry.expires > now:
                w.write(entry.render_at(req, now))
                self._hit[store.kind].inc()
                if self.prefetch is not None:
                    self._maybe_prefetch(req, entry, now)
                return entry.rcode
            store.drop(key)
        self._miss.inc()
        return serve_next(self, req, _StoringWriter(self, req, w))

    def fast_answer(self, key: bytes, now: float) -> Answer | Pass | None:
        store = self.success
        entry = store.entries.get(key)
        if entry is None:
            store = self.denial
            entry = store.entries.get(key)
            if entry is None:
                return PASS
        if entry.expires <= now:
            return None  # serve() drops it and asks the next plugin
        if self.prefetch is not None:
            if entry.remaining(now) <= entry.ttl * self.prefetch[2]:
                return None  # serve() decides about prefetching, with the Request it needs
            entry.hits += 1  # what _maybe_prefetch counts before finding it is too early
        self._last_hit = hit = self._hit[store.kind]  # for fast_stamp, called next
        hit.inc()
        return entry

    def fast_stamp(self, answer: Answer, now: float) -> tuple[CachedAnswer, int, Any] | None:
        if self.prefetch is not None or not isinstance(answer, CachedAnswer):
            return None  # every prefetch-enabled hit needs serve()'s bookkeeping
        # Valid while the entry is stored and its TTLs show the same second.
        return answer, int(now - answer.stored), self._last_hit

    def fast_replay(self, stamp: Any, now: float) -> bool:
        entry, second, hit = stamp
        if not entry.live or entry.expires <= now or int(now - entry.stored) != second:
            return False
        hit.inc()
        return True

    def fast_passed(self) -> None:
        self._miss.inc()

    def _maybe_prefetch(self, req: Request, entry: CachedAnswer, now: float) -> None:
        assert self.prefetch is not None
        amount, window, fraction = self.prefetch
        entry.hits += 1
        # AMOUNT hits per DURATION, measured over the entry's life so far.
        rate = entry.hits * window / max(now - entry.stored, 1.0)
        if entry.prefetching or rate < amount:
            return
        if entry.remaining(now) > entry.ttl * fraction:
            return
        entry.prefetching = True
        self._prefetches.inc()
        serve_next(self, req, _StoringWriter(self, req, _NullWriter()))

    def store(self, req: Request, reply: bytes, now: float) -> None:
        """Keep `reply` for `req` if it is a cacheable answer or denial."""
        try:
            shape = scan_message(reply)
        except WireError:
            return
        rcode = shape.rcode
        if shape.truncated or rcode not in (NOERROR, NXDOMAIN):
            return
        if reply[12 : shape.qend].lower() != req.key[:-1]:
            return  # not the question we asked (rewritten, or a confused upstream)
        records = shape.answer + shape.authority + shape.additional
        end = len(reply)
        ar = len(shape.additional)
        if shape.additional and shape.additional[-1].rtype == OPT:
            end = shape.additional[-1].start  # each client gets its own OPT
            ar -= 1
            records = records[:-1]
        if any(r.rtype == OPT for r in records):
            return
        if rcode == NOERROR and shape.answer:
            store = self.success
            ttl = min(r.ttl for r in records)
        else:
            soa = [r for r in shape.authority if r.rtype == SOA and r.rdlen >= 20]
            if not soa:
                return  # a denial without SOA says nothing about how long it holds
            minimum = int.from_bytes(reply[soa[0].end - 4 : soa[0].end], "big")
            ttl = min(soa[0].ttl, minimum)
            store = self.denial
        ttl = max(store.min_ttl, min(ttl, store.max_ttl))
        qend = shape.qend
        ttls = tuple((r.ttl_pos - qend, r.ttl) for r in records)
        flags = shape.flags & ~AA
        entry = CachedAnswer(
            flags, len(shape.answer), len(shape.authority), ar, reply[qend:end], ttls, now, ttl
        )
        (self.denial if store is self.success else self.success).drop(req.key)
        store.put(req.key, entry)


def _capacity_spec(sub: Directive, default_ttl: int, default_min: int) -> tuple[int, int, int]:
    arg_count(sub, 1, 3)
    capacity = int_arg(sub.args[0], 1, 10_000_000, "a capacity")
    ttl = int_arg(sub.args[1], 0, 86400 * 7, "a TTL") if len(sub.args) > 1 else default_ttl
    min_ttl = int_arg(sub.args[2], 0, ttl, "a minimum TTL") if len(sub.args) > 2 else default_min
    return capacity, ttl, min(min_ttl, ttl)


def _prefetch_spec(sub: Directive) -> tuple[int, float, float]:
    arg_count(sub, 1, 3)
    amount = int_arg(sub.args[0], 1, 1_000_000, "an amount")
    window = 60.0
    fraction = 0.1
    for tok in sub.args[1:]:
        if tok.text.endswith("%"):
            pct = int_arg(
                Token(tok.kind, tok.text[:-1], tok.line, tok.column, tok.source),
                1,
                100,
                "a percentage",
            )
            fraction = pct / 100
        else:
            window = duration_arg(tok, 1.0)
    return amount, window, fraction


@register("cache")
def setup(s: Setup, d: Directive) -> CachePlugin:
    args = list(d.args)
    success_ttl, denial_ttl = MAX_SUCCESS_TTL, MAX_DENIAL_TTL
    if args and args[0].text.isascii() and args[0].text.isdigit():
        success_ttl = denial_ttl = int_arg(args.pop(0), 0, 86400 * 7, "a TTL in seconds")
    zones = zone_args(args, (".",))
    success = (DEFAULT_CAPACITY, success_ttl, min(MIN_TTL, success_ttl))
    denial = (DEFAULT_CAPACITY, denial_ttl, min(MIN_TTL, denial_ttl))
    prefetch = None
    for sub in d.block or ():
        if sub.name == SUCCESS:
            success = _capacity_spec(sub, success_ttl, success[2])
        elif sub.name == DENIAL:
            denial = _capacity_spec(sub, denial_ttl, denial[2])
        elif sub.name == "prefetch":
            prefetch = _prefetch_spec(sub)
        else:
            raise sub.token.error(
                f"cache: unknown property {sub.name!r} (known: success, denial, prefetch)"
            )
    return CachePlugin(zones, success, denial, prefetch, s.server)
