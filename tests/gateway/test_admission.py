"""Connection slots shared by source, and refusal logs that count (gateway/admission.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from gateway.admission import (
    ConnectionSlots,
    Full,
    RefusalLog,
    Slot,
    SlotLimits,
    parse_networks,
    source_of,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def take(slots: ConnectionSlots, host: str, n: int) -> list[Slot]:
    out = []
    for _ in range(n):
        slot = slots.acquire(host)
        assert isinstance(slot, Slot), f"{host}: {slot}"
        out.append(slot)
    return out


def test_sources_are_addresses_and_ipv6_64s() -> None:
    assert source_of("203.0.113.7") == "203.0.113.7"
    assert source_of("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_of("::ffff:203.0.113.7") == "203.0.113.7"


def test_one_source_holds_at_most_its_cap() -> None:
    slots = ConnectionSlots(SlotLimits(total=100, per_source=3))
    held = take(slots, "198.51.100.1", 3)
    assert slots.acquire("198.51.100.1") is Full.SOURCE
    # another address of the same IPv6 /64 is the same source
    take(slots, "2001:db8::1", 2)
    take(slots, "2001:db8::2", 1)
    assert slots.acquire("2001:db8::3") is Full.SOURCE
    slots.release(held[0])
    assert isinstance(slots.acquire("198.51.100.1"), Slot)
    assert slots.held == 6


def test_unknown_sources_share_what_the_peers_reserve_leaves() -> None:
    limits = SlotLimits(total=10, per_source=2, reserved_share=0.5, per_peer=4)
    slots = ConnectionSlots(limits, peers=["192.0.2.0/24"])
    for i in range(5):  # five unknown sources (2 each would be 10) fill the shared 5
        take(slots, f"198.51.100.{i}", 1)
    assert slots.acquire("198.51.100.99") is Full.TOTAL
    # a configured peer gets the reserve, up to its own cap
    peer = take(slots, "192.0.2.10", 4)
    assert slots.acquire("192.0.2.10") is Full.SOURCE
    take(slots, "192.0.2.11", 1)
    assert slots.held == 10
    assert slots.acquire("192.0.2.12") is Full.TOTAL
    slots.release(peer[0])
    assert slots.acquire("198.51.100.99") is Full.TOTAL  # a peer's slot does not go to strangers
    assert isinstance(slots.acquire("192.0.2.12"), Slot)


def test_a_verified_source_is_known_for_a_while() -> None:
    clock = Clock()
    limits = SlotLimits(total=10, per_source=1, reserved_share=0.5, per_peer=5, known_ttl=60)
    slots = ConnectionSlots(limits, clock=clock)
    first = take(slots, "203.0.113.5", 1)[0]
    assert not first.known
    assert slots.acquire("203.0.113.5") is Full.SOURCE
    slots.verified("203.0.113.5")
    assert slots.is_known("203.0.113.5")
    known = take(slots, "203.0.113.5", 4)  # 5 with the first: the per-peer cap
    assert all(s.known for s in known)
    assert slots.acquire("203.0.113.5") is Full.SOURCE
    # the first slot was taken as unknown: released from the shared part, where it counted
    slots.release(first)
    for s in known:
        slots.release(s)
    assert slots.held == 0
    clock.now += 61
    assert not slots.is_known("203.0.113.5")


def test_known_sources_are_bounded() -> None:
    slots = ConnectionSlots(SlotLimits(total=10, per_source=1, max_known=3))
    for i in range(5):
        slots.verified(f"203.0.113.{i}")
    assert [slots.is_known(f"203.0.113.{i}") for i in range(5)] == [False, False, True, True, True]


def test_releasing_twice_is_a_bug_not_a_free_slot() -> None:
    slots = ConnectionSlots(SlotLimits(total=2, per_source=2))
    slot = take(slots, "203.0.113.1", 1)[0]
    slots.release(slot)
    with pytest.raises(RuntimeError):
        slots.release(slot)


@pytest.mark.parametrize(
    "limits",
    [
        {"total": 0, "per_source": 1},
        {"total": 4, "per_source": 0},
        {"total": 4, "per_source": 1, "reserved_share": 1.0},
        {"total": 4, "per_source": 1, "reserved_share": -0.1},
    ],
)
def test_bad_limits_are_refused(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SlotLimits(**limits)  # type: ignore[arg-type]


def test_bad_peer_networks_are_named() -> None:
    with pytest.raises(ValueError, match=r"'peer\.example'"):
        parse_networks(["10.0.0.0/8", "peer.example"])


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("test.refusals")
    logger.addHandler(handler)
    logger.propagate = False
    yield handler
    logger.removeHandler(handler)


async def test_a_flood_of_refusals_is_a_count_not_a_line_each(lines: Lines) -> None:
    refusals = RefusalLog(logging.getLogger("test.refusals"), "refused", interval=3600)
    for i in range(1000):
        host = "198.51.100.1" if i % 10 else f"203.0.113.{i % 7}"
        refusals.refused("source_limit", f"{host}:{40000 + i}", "too many", host)
    refusals.refused("unknown_sni", "192.0.2.1:1", "no service x")
    assert [(r.reason, r.count) for r in lines.records] == [  # type: ignore[attr-defined]
        ("source_limit", 1),
        ("unknown_sni", 1),
    ]
    refusals.flush()
    last = lines.records[-1]
    assert (last.reason, last.count) == ("source_limit", 999)  # type: ignore[attr-defined]
    assert last.top_sources.startswith("198.51.100.1=900")  # type: ignore[attr-defined]
    assert len(lines.records) == 3


async def test_a_steady_flood_gets_one_line_per_interval(lines: Lines) -> None:
    refusals = RefusalLog(logging.getLogger("test.refusals"), "refused", interval=0.05)

    async def line(n: int) -> logging.LogRecord:
        async with asyncio.timeout(10):
            while len(lines.records) < n:
                await asyncio.sleep(0.01)
        return lines.records[n - 1]

    for _ in range(10):
        refusals.refused("pending_limit", "198.51.100.1:1", "too many handshakes")
    assert (await line(1)).count == 1  # type: ignore[attr-defined]
    assert (await line(2)).count == 9  # type: ignore[attr-defined]
    refusals.refused("pending_limit", "198.51.100.1:2", "too many handshakes")
    assert (await line(3)).count == 1  # type: ignore[attr-defined]
    refusals.flush()
