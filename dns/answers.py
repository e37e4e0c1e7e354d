"""Pre-encoded replies: built once, served many times with only the ID, flags and TTLs patched.

A reply body is everything after the question. Answer records are owned by the question name
through the compression pointer 0xC00C, and every other name is written in full, so one body
serves any spelling (0x20 case) of the question and needs no re-encoding per query.
"""

from __future__ import annotations

import ipaddress
import struct

from dns.wire import AA, CLASS_IN, QR, RA, RD, Request

QNAME_PTR = b"\xc0\x0c"
_RR_FIXED = struct.Struct(">HHIH")
_TAIL = struct.Struct(">HHHHH")  # flags, qd, an, ns, ar


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = CLASS_IN) -> bytes:
    return owner + _RR_FIXED.pack(rtype, rclass, ttl, len(rdata)) + rdata


def ip_rdata(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return address.packed


def srv_rdata(priority: int, weight: int, port: int, target: bytes) -> bytes:
    return struct.pack(">HHH", priority, weight, port) + target


def soa_rdata(
    mname: bytes, rname: bytes, serial: int, refresh: int, retry: int, expire: int, minimum: int
) -> bytes:
    return (
        mname + rname + struct.pack(">IIIII", serial & 0xFFFFFFFF, refresh, retry, expire, minimum)
    )


class Answer:
    """A reply body plus its four possible header tails (RD copied from the query, +OPT)."""

    __slots__ = ("heads", "rcode", "rest")

    def __init__(self, flags: int, an: int, ns: int, ar: int, rest: bytes) -> None:
        self.rcode = flags & 0x0F
        self.rest = rest
        base = flags & ~RD
        # Index: bit 0 = query RD, bit 1 = query had EDNS (one more additional record: OPT).
        # Each head is the 10 header bytes after the ID (flags and the four counts).
        self.heads = (
            _TAIL.pack(base, 1, an, ns, ar),
            _TAIL.pack(base | RD, 1, an, ns, ar),
            _TAIL.pack(base, 1, an, ns, ar + 1),
            _TAIL.pack(base | RD, 1, an, ns, ar + 1),
        )

    def render(self, req: Request) -> bytes:
        head = self.heads[req.rd | (2 if req.edns else 0)]
        return req.wire[:2] + head + req.question + self.rest + req.opt

    def body(self, now: float) -> bytes:
        """Everything after the question (without OPT) as of `now` (monotonic seconds)."""
        return self.rest


def authoritative(rcode: int, an: list[bytes], ns: list[bytes], ar: list[bytes]) -> Answer:
    """An authoritative answer from our own records."""
    return Answer(QR | AA | RA | rcode, len(an), len(ns), len(ar), b"".join(an + ns + ar))


class CachedAnswer(Answer):
    """A stored upstream reply whose TTLs count down; re-patched at most once per second."""

    __slots__ = (
        "_memo_rest",
        "_memo_second",
        "_ttls",
        "expires",
        "hits",
        "live",
        "prefetching",
        "stored",
        "ttl",
    )

    def __init__(
        self,
        flags: int,
        an: int,
        ns: int,
        ar: int,
        rest: bytes,
        ttls: tuple[tuple[int, int], ...],
        stored: float,
        ttl: int,
    ) -> None:
        super().__init__(flags, an, ns, ar, rest)
        self._ttls = ttls  # (offset in rest, original TTL)
        self.stored = stored
        self.ttl = ttl
        self.expires = stored + ttl
        self._memo_second = 0
        self._memo_rest = rest
        self.hits = 0
        self.prefetching = False
        self.live = True  # False once dropped, replaced or evicted from its store

    def render_at(self, req: Request, now: float) -> bytes:
        head = self.heads[req.rd | (2 if req.edns else 0)]
        return req.wire[:2] + head + req.question + self.body(now) + req.opt

    def body(self, now: float) -> bytes:
        elapsed = int(now - self.stored)
        if elapsed != self._memo_second:
            buf = bytearray(self.rest)
            for off, ttl in self._ttls:
                struct.pack_into(">I", buf, off, max(ttl - elapsed, 0))
            self._memo_rest = bytes(buf)
            self._memo_second = elapsed
        return self._memo_rest

    def remaining(self, now: float) -> float:
        return self.expires - now
