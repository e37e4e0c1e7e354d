"""The UDP fast path: answer a datagram from pre-encoded bytes, or say the full chain must.

Sans-IO. `FastPath.answer(datagram)` reads only what a plain query needs (header, the one
question, an OPT record), routes it to its server block by the longest zone like `Mux`,
and asks the block's leading plugins for a stored answer by `Request.key`: the cache's
entries and the answers `global` has already given. No Request, no writer, no chain walk;
the reply is the query's ID, a prepared header, the client's question, the stored body
and our OPT. Whatever it does not recognise (a miss, an opcode, EDNS version, class,
a second additional record, a plugin that must see every query such as `log`) returns
None and the full path handles it, so the fast path never changes an answer, only its cost.

A block's plan is its chain from the head, skipping plugins that do nothing to an answered
query (`errors`) and ending before the first one that must see every query; see
`dns.plugin.Plugin.fast_role`.

Cheaper still, a reply is remembered by the query's bytes after the ID with a stamp from
the plugin that answered (`Plugin.fast_stamp`: global's index; a cache entry and the
second its TTLs show): the same query again (the same name in the same case, flags, EDNS)
is answered by one dict lookup and the ID while the plugin says the stamp still holds.
Bounded (REPLAY_MAX entries, cleared when full; queries up to REPLAY_QUERY_MAX bytes) so
random names or case cannot grow it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping

from dns.answers import Answer
from dns.plugin import FAST_ANSWERS, FAST_TRANSPARENT, PASS, Handler, Plugin
from dns.wire import (
    HEADER_LEN,
    MAX_NAME_LEN,
    MAX_UDP_SIZE,
    OPT,
    OPT_DO,
    OPT_PLAIN,
    PLAIN_UDP_SIZE,
    TC,
)

Plan = tuple[Plugin, ...]

# Header words 2-5 (QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT) of a plain query, without and with OPT.
_COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_DO_BYTE = (b"\x00", b"\x01")  # the last byte of Request.key
_OPTS = (b"", b"", OPT_PLAIN, OPT_DO)  # by 2 * edns + do
_TRUNCATED = struct.Struct(">HHHHH")
REPLAY_MAX = 65536
REPLAY_QUERY_MAX = 512

# query bytes after the ID -> (answering plugin, its stamp, reply after the ID, plugins passed)
_Replay = tuple[Plugin, object, bytes, Plan]


def plan_of(handler: Handler | None) -> Plan:
    """The plugins of a chain the fast path can ask, in chain order (empty: none)."""
    plan: list[Plugin] = []
    node = handler
    while isinstance(node, Plugin):
        if node.fast_role == FAST_ANSWERS:
            plan.append(node)
        elif node.fast_role != FAST_TRANSPARENT:
            break
        node = node.next
    return tuple(plan)


class FastPath:
    """Fast answers for one listener's server blocks (the zones `Mux` routes by)."""

    def __init__(
        self, zones: Mapping[bytes, Handler], clock: Callable[[], float] = time.monotonic
    ) -> None:
        plans = {zone: plan_of(handler) for zone, handler in zones.items()}
        self.root: Plan = plans.pop(b"\x00", ())
        # Longest first: the first zone a name ends with (on a label boundary) is its block.
        self.zones = sorted(plans.items(), key=lambda zp: -len(zp[0]))
        self.enabled = bool(self.root) or any(plan for _, plan in self.zones)
        self.clock = clock
        self.replay: dict[bytes, _Replay] = {}

    def _plan(self, key: bytes, name_end: int, labels: list[int]) -> Plan:
        """The plan of the block with the longest zone `key`'s (lowercase) name is under."""
        name_len = name_end - HEADER_LEN
        for zone, plan in self.zones:
            if name_end - len(zone) in labels and key.endswith(zone, 0, name_len):
                return plan
        return self.root

    def answer(self, data: bytes) -> bytes | None:
        """The reply to `data`, or None when the full path must answer (or drop) it."""
        hit = self.replay.get(data[2:])
        if hit is not None:
            plugin, stamp, tail, passed = hit
            if plugin.fast_replay(stamp, self.clock()):
                for p in passed:
                    p.fast_passed()
                return data[:2] + tail
        n = len(data)
        # QR clear, opcode QUERY; exactly one question; nothing or one record (OPT) more.
        if n < HEADER_LEN + 5 or data[2] & 0xF8:
            return None
        counts = data[4:12]
        if counts == _COUNTS_PLAIN:
            edns = 0
        elif counts == _COUNTS_EDNS:
            edns = 1
        else:
            return None
        pos = HEADER_LEN
        labels: list[int] = []
        while True:
            length = data[pos]
            if length == 0:
                break
            if length > 63:
                return None  # compression or an extended label type: FORMERR, not ours
            labels.append(pos)
            pos += length + 1
            if pos >= n:
                return None
        name_end = pos + 1
        qend = name_end + 4
        if name_end - HEADER_LEN > MAX_NAME_LEN or qend > n:
            return None
        # Class IN, a type below 256 that lower() leaves alone: then the lowercased
        # question is exactly Request.key's name + type + class.
        if data[name_end] or data[name_end + 2] or data[name_end + 3] != 1:
            return None
        if 0x41 <= data[name_end + 1] <= 0x5A:
            return None
        if edns:
            if qend + 11 > n or data[qend] or data[qend + 1] or data[qend + 2] != OPT:
                return None
            if data[qend + 6]:
                return None  # EDNS version other than 0: BADVERS
            if qend + 11 + (data[qend + 9] << 8 | data[qend + 10]) > n:
                return None
            do = data[qend + 7] >> 7
            max_size = min(max(data[qend + 3] << 8 | data[qend + 4], PLAIN_UDP_SIZE), MAX_UDP_SIZE)
        else:
            do = 0
            max_size = PLAIN_UDP_SIZE
        key = data[HEADER_LEN:qend].lower() + _DO_BYTE[do]
        plan = self._plan(key, name_end, labels) if self.zones else self.root
        if not plan:
            return None
        now = self.clock()
        passed = 0
        for plugin in plan:
            found = plugin.fast_answer(key, now)
            if found is PASS:
                passed += 1
                continue
            if found is None:
                return None
            break
        else:
            return None  # every plugin passed: the next one must see the query
        answer: Answer = found  # type: ignore[assignment]  # neither PASS nor None
        for i in range(passed):
            plan[i].fast_passed()
        head = answer.heads[(data[2] & 1) | edns << 1]
        opt = _OPTS[edns << 1 | do]
        reply = b"".join((data[:2], head, data[HEADER_LEN:qend], answer.body(now), opt))
        if len(reply) > max_size:
            flags = (head[0] << 8 | head[1]) | TC
            reply = data[:2] + _TRUNCATED.pack(flags, 1, 0, 0, edns) + data[HEADER_LEN:qend] + opt
        stamp = plugin.fast_stamp(answer, now)
        if stamp is not None and n <= REPLAY_QUERY_MAX:
            if len(self.replay) >= REPLAY_MAX:
                self.replay.clear()
            self.replay[data[2:]] = (plugin, stamp, reply[2:], plan[:passed])
        return reply
