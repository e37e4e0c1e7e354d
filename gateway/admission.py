"""Admission at accept time: connection slots shared fairly by source, and refusal logs that
count instead of writing a line per refusal.

`ConnectionSlots` decides, before a byte is read, whether a connection from a source address
may take a slot (for the ingress: a connection still in its ClientHello or TLS handshake; for
the appliance's HTTP listeners: any open connection). Three rules:

- every source holds at most `per_source` slots. A source is an IPv4 address or an IPv6 /64
  (one host commonly owns a whole /64);
- a share of the slots (`reserved_share`) is kept for known peers: sources inside the
  configured peer networks, and sources that completed a verified handshake in the last
  `known_ttl` seconds. Sources that are not known share the rest, so a flood from unknown
  addresses never takes the last slots from the federation's peers;
- a known peer holds at most `per_peer` slots, so one of them cannot take the whole reserve.

`RefusalLog` logs the first refusal of a reason at once, then at most one line per reason per
interval carrying the count, the last peer and the busiest sources: a flood of refusals costs
a few lines, while the metrics still count every refusal.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from discovery.addresses import source_of

__all__ = [
    "ConnectionSlots",
    "Full",
    "RefusalLog",
    "Slot",
    "SlotLimits",
    "parse_networks",
    "source_of",
]

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[IpNetwork, ...]:
    """Addresses or CIDRs (`203.0.113.7`, `198.51.100.0/24`); ValueError names a bad one."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or network") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SlotLimits:
    total: int
    per_source: int
    reserved_share: float = 0.0  # of `total`, only for known peers
    per_peer: int = 0  # slots one known peer may hold; 0: as many as `total`
    known_ttl: float = 3600.0  # a verified handshake makes its source known for this long
    max_known: int = 4096  # most recently verified sources remembered (bounds memory)

    def __post_init__(self) -> None:
        if self.total < 1 or self.per_source < 1 or self.per_peer < 0:
            raise ValueError(f"slot limits must be positive: {self}")
        if not 0.0 <= self.reserved_share < 1.0:
            raise ValueError(f"reserved_share must be in [0, 1): {self.reserved_share}")

    @property
    def shared(self) -> int:
        """Slots sources that are not known may take, together."""
        return max(1, self.total - int(self.total * self.reserved_share))


class Full(enum.StrEnum):
    SOURCE = "source"  # this source holds all it may
    TOTAL = "total"  # no slot left that this source may take


@dataclass(frozen=True, slots=True)
class Slot:
    source: str
    known: bool  # taken as a known peer (counted against the whole budget, not the shared part)


class ConnectionSlots:
    def __init__(
        self,
        limits: SlotLimits,
        peers: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.peers = parse_networks(peers)
        self._clock = clock
        self._held: dict[str, int] = {}
        self._total = 0
        self._unknown = 0
        self._verified: OrderedDict[str, float] = OrderedDict()  # source -> last verified at

    @property
    def held(self) -> int:
        return self._total

    def held_by(self, host: str) -> int:
        return self._held.get(source_of(host), 0)

    def acquire(self, host: str) -> Slot | Full:
        source = source_of(host)
        known = self._is_known(source, host)
        lim = self.limits
        held = self._held.get(source, 0)
        if held >= ((lim.per_peer or lim.total) if known else lim.per_source):
            return Full.SOURCE
        if self._total >= lim.total or (not known and self._unknown >= lim.shared):
            return Full.TOTAL
        self._held[source] = held + 1
        self._total += 1
        if not known:
            self._unknown += 1
        return Slot(source, known)

    def release(self, slot: Slot) -> None:
        held = self._held.get(slot.source, 0)
        if held <= 0:
            raise RuntimeError(f"slot of {slot.source} released twice")
        if held == 1:
            del self._held[slot.source]
        else:
            self._held[slot.source] = held - 1
        self._total -= 1
        if not slot.known:
            self._unknown -= 1

    def verified(self, host: str) -> None:
        """`host` completed a verified handshake: it is a known peer for `known_ttl`."""
        source = source_of(host)
        self._verified[source] = self._clock()
        self._verified.move_to_end(source)
        while len(self._verified) > self.limits.max_known:
            self._verified.popitem(last=False)

    def is_known(self, host: str) -> bool:
        return self._is_known(source_of(host), host)

    def _is_known(self, source: str, host: str) -> bool:
        at = self._verified.get(source)
        if at is not None:
            if self._clock() - at <= self.limits.known_ttl:
                return True
            del self._verified[source]
        if not self.peers:
            return False
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.peers)


_TOP_SOURCES = 3
_MAX_SOURCES = 256  # distinct sources counted per window; more go under "other"


class _Window:
    """Refusals of one reason since its last line."""

    __slots__ = ("count", "detail", "peer", "sources", "timer")

    def __init__(self) -> None:
        self.count = 0
        self.peer = ""
        self.detail = ""
        self.sources: Counter[str] = Counter()
        self.timer: asyncio.TimerHandle | None = None


class RefusalLog:
    """One line when a reason starts; then one line per reason per `interval` with the count of
    refusals since the last line. Call `flush` before going away, so no count is lost."""

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        interval: float = 10.0,
        context: dict[str, object] | None = None,
    ) -> None:
        self._log = logger
        self._message = message
        self._interval = interval
        self._context = dict(context or {})
        self._windows: dict[str, _Window] = {}

    def refused(self, reason: str, peer: str, detail: str, host: str | None = None) -> None:
        """One refusal of `peer` ("ip:port", for the log) from `host` (its address, counted by
        source in the busiest sources)."""
        window = self._windows.get(reason)
        if window is not None:
            window.count += 1
            window.peer, window.detail = peer, detail
            source = source_of(host) if host else peer
            if source in window.sources or len(window.sources) < _MAX_SOURCES:
                window.sources[source] += 1
            else:
                window.sources["other"] += 1
            return
        self._emit(reason, 1, peer, detail, None)
        self._open(reason)

    def flush(self) -> None:
        """Log every count not logged yet and stop the timers."""
        for reason in list(self._windows):
            window = self._windows.pop(reason)
            if window.timer is not None:
                window.timer.cancel()
            if window.count:
                self._emit_window(reason, window)

    def _open(self, reason: str) -> None:
        window = _Window()
        self._windows[reason] = window
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop to time the window: the next `flush` logs it
        window.timer = loop.call_later(self._interval, self._tick, reason)

    def _tick(self, reason: str) -> None:
        window = self._windows.pop(reason, None)
        if window is None or not window.count:
            return  # a quiet interval: the next refusal of this reason is logged at once
        self._emit_window(reason, window)
        self._open(reason)

    def _emit_window(self, reason: str, window: _Window) -> None:
        top = ", ".join(f"{s}={n}" for s, n in window.sources.most_common(_TOP_SOURCES))
        self._emit(reason, window.count, window.peer, window.detail, top)

    def _emit(self, reason: str, count: int, peer: str, detail: str, top: str | None) -> None:
        extra: dict[str, object] = {
            **self._context,
            "reason": reason,
            "count": count,
            "peer": peer,
            "detail": detail,
        }
        if top is not None:
            extra["interval"] = self._interval
            extra["top_sources"] = top
        self._log.warning(self._message, extra=extra)
