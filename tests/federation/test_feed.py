"""The export feed and the policy clock, without sockets."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.names import ServiceKey
from federation.feed import (
    ExportedService,
    ExportFeed,
    FeedError,
    MessageDecoder,
    apply_message,
    encode_frame,
)
from federation.hlc import ClockDriftError, HybridClock, Stamp
from federation.policy import PolicyStore, TrafficPolicy


def svc(name: str, healthy: int = 1, total: int = 1) -> ExportedService:
    return ExportedService(name, "default", {"http": 80}, healthy, total)


def test_frames_roundtrip_in_any_split() -> None:
    data = encode_frame({"type": "a", "n": 1}) + encode_frame({"type": "b"})
    for cut in range(len(data) + 1):
        d = MessageDecoder()
        got = d.feed(data[:cut]) + d.feed(data[cut:])
        assert [m["type"] for m in got] == ["a", "b"]


def test_oversized_and_malformed_frames() -> None:
    with pytest.raises(FeedError, match="exceeds"):
        MessageDecoder(max_frame=100).feed(struct.pack(">I", 101))
    with pytest.raises(FeedError, match="not JSON"):
        MessageDecoder().feed(struct.pack(">I", 3) + b"{{{")
    with pytest.raises(FeedError, match="type"):
        MessageDecoder().feed(struct.pack(">I", 2) + b"[]")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_property_decoder_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(FeedError):
        MessageDecoder(max_frame=1000).feed(data)


def test_snapshot_then_deltas() -> None:
    feed = ExportFeed("west", {"region": "eu"}, ["203.0.113.1:15443"])
    feed.set_services({"reviews.default": svc("reviews"), "ratings.default": svc("ratings")})
    snap = feed.since(None, 0)
    assert snap["type"] == "snapshot" and set(snap["services"]) == {
        "reviews.default", "ratings.default"}
    state = apply_message(None, snap)
    v = snap["version"]
    feed.set_services({"reviews.default": svc("reviews", 0, 1)})  # ratings gone, reviews down
    delta = feed.since(feed.epoch, v)
    assert delta["type"] == "delta"
    assert delta["services"] == {"reviews.default": svc("reviews", 0, 1).to_json(),
                                 "ratings.default": None}
    state = apply_message(state, delta)
    assert set(state.services) == {"reviews.default"}
    assert state.services["reviews.default"]["healthy"] == 0
    # nothing changed: an empty delta; a different epoch (restart): a snapshot
    assert feed.since(feed.epoch, feed.version)["services"] == {}
    assert feed.since("another-epoch", feed.version)["type"] == "snapshot"
    assert feed.since(feed.epoch, feed.version + 5)["type"] == "snapshot"


def test_malformed_feed_messages_leave_state_untouched() -> None:
    feed = ExportFeed("west", {}, [])
    feed.set_services({"reviews.default": svc("reviews")})
    state = apply_message(None, feed.snapshot())
    bad = [
        {"type": "delta", "services": {"x.default": {"ports": {"http": 70000}, "healthy": 0,
                                                     "total": 0}}},
        {"type": "delta", "services": {"x.default": {"ports": {}, "healthy": 3, "total": 1}}},
        {"type": "delta", "services": []},
        {"type": "delta", "services": {}, "gateways": ["nowhere"]},
        {"type": "delta", "services": {}, "policies": "all"},
        {"type": "surprise", "services": {}},
    ]
    for msg in bad:
        with pytest.raises(FeedError):
            apply_message(state, msg)
    assert set(state.services) == {"reviews.default"}
    with pytest.raises(FeedError, match="before any snapshot"):
        apply_message(None, {"type": "delta", "services": {}})


def test_hlc_orders_writes_despite_skew() -> None:
    wall = [1000.0]
    east = HybridClock("east", wall=lambda: wall[0])
    west_wall = [900.0]  # west's clock is 100 s behind
    west = HybridClock("west", wall=lambda: west_wall[0])
    s1 = east.now()
    west.observe(s1)
    s2 = west.now()  # made after seeing s1: must win although west's clock is behind
    assert s2 > s1
    with pytest.raises(ClockDriftError):
        west.observe(Stamp(int((west_wall[0] + 7200) * 1000), 0, "east"))
    assert Stamp.parse(str(s2)) == s2
    with pytest.raises(ValueError):
        Stamp.parse("soon")


async def test_policy_store_last_writer_wins_and_persists(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path, HybridClock("east"))
    await store.open()
    key = ServiceKey("reviews")
    mine = await store.set(key, {"east": 1, "west": 1}, True)
    older = TrafficPolicy(key, {"east": 9}, True, Stamp(mine.stamp.wall_ms - 1, 0, "west"))
    assert not await store.merge(older)
    newer = TrafficPolicy(key, {"west": 5}, False, Stamp(mine.stamp.wall_ms + 1, 0, "west"))
    assert await store.merge(newer)
    assert store.get(key) == newer
    await store.reset(key)
    assert store.get(key) is None
    await store.close()
    again = PolicyStore(tmp_path, HybridClock("east"))
    await again.open()
    assert again.get(key) is None and again.all()[0].deleted
    later = await again.set(key, {"east": 1}, True)
    assert later.stamp > newer.stamp  # the clock resumed past what was stored
    await again.close()
    assert TrafficPolicy.from_json(json.loads(json.dumps(later.to_json()))) == later
