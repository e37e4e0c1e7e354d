"""A peer's state: `connected`, then `stale` when its link is lost (last-known exports kept),
then `unreachable` once it has been down for `federation.peer_unreachable_after`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from federation.feed import ExportedService, ExportFeed
from federation.peering import PeerLink, PeerStatus
from federation.trust import TlsCredentials, TrustBundle, create_cluster_ca, create_root
from federation.trust.ca import issue_identity

from .conftest import Cluster, eventually

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def credentials() -> TlsCredentials:
    root = create_root("states.test")
    ca = create_cluster_ca(root, "east")
    return TlsCredentials(issue_identity(ca, "gateway", "east-gw"), TrustBundle.of([root.cert]))


def west_snapshot() -> dict[str, Any]:
    feed = ExportFeed("west", {"region": "eu"}, ["203.0.113.20:15443"])
    feed.set_services({"reviews.default": ExportedService("reviews", "default", {"http": 9080},
                                                          1, 1)})
    return feed.since(None, 0)


async def _ignore(*_: Any) -> None:
    return None


def link(clock: FakeClock, after: float | None) -> PeerLink:
    return PeerLink("east", "west", "203.0.113.20:15443", credentials(), _ignore,
                    unreachable_after=after, clock=clock)


async def test_stale_then_unreachable_past_the_bound_then_connected_again() -> None:
    clock = FakeClock()
    peer = link(clock, after=60.0)
    assert peer.state.status is PeerStatus.UNREACHABLE  # never synced
    await peer._apply(west_snapshot())
    assert peer.state.status is PeerStatus.CONNECTED and peer.state.down_since is None

    peer._down("connect", "connection refused")  # the link is lost
    assert peer.state.status is PeerStatus.STALE
    assert peer.state.to_json()["state"] == "stale"
    assert peer.state.to_json()["down_since"] is not None
    assert peer.state.to_json()["services"] == ["reviews.default"]  # last-known exports kept

    clock.now += 59.0
    peer._down("connect", "connection refused")  # a retry fails, still within the bound
    assert peer.state.status is PeerStatus.STALE

    clock.now += 1.0
    peer._down("timeout", "no feed message within the heartbeat window")
    assert peer.state.status is PeerStatus.UNREACHABLE
    out = peer.state.to_json()
    assert out["state"] == "unreachable"
    assert out["services"] == ["reviews.default"]  # still kept: routing is the data plane's call
    assert out["error"] == "no feed message within the heartbeat window"

    await peer._apply({"type": "heartbeat", "epoch": "e", "version": 1})  # back
    assert peer.state.status is PeerStatus.CONNECTED
    assert peer.state.down_since is None and peer.state.error is None

    peer._down("connect", "refused again")  # a new outage starts its own bound
    assert peer.state.status is PeerStatus.STALE
    await peer.close()


async def test_without_a_bound_a_lost_peer_stays_stale() -> None:
    clock = FakeClock()
    peer = link(clock, after=None)
    await peer._apply(west_snapshot())
    peer._down("connect", "refused")
    clock.now += 10 * 365 * 86400.0
    peer._down("connect", "refused")
    assert peer.state.status is PeerStatus.STALE
    await peer.close()


async def test_the_bound_passing_turns_the_peer_unreachable_without_a_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No reconnect attempt needs to happen at the bound: a timer flips the state and logs it."""
    peer = PeerLink("east", "west", "203.0.113.20:15443", credentials(), _ignore,
                    unreachable_after=0.05)
    await peer._apply(west_snapshot())
    with caplog.at_level(logging.WARNING, logger="federation.peering"):
        peer._down("connect", "refused")
        assert peer.state.status is PeerStatus.STALE

        async def flipped() -> bool:
            return peer.state.status is PeerStatus.UNREACHABLE

        await eventually(flipped, timeout=10, what="unreachable after the bound")
    assert any(r.getMessage() == "peer unreachable" for r in caplog.records)
    await peer.close()


class Bounded(Cluster):
    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["federation"]["peer_unreachable_after"] = "1s"
        cfg["drain_timeout"] = "1s"
        return cfg


async def test_appliance_shows_a_peer_gone_past_the_bound_as_unreachable(tmp_path: Any) -> None:
    from .conftest import make_pki

    make_pki(tmp_path, ["a", "b"])
    a = Bounded("a", tmp_path, "127.61.7.1", "us")
    b = Bounded("b", tmp_path, "127.61.7.2", "us")
    a.peers, b.peers = {"b": b.ingress}, {"a": a.ingress}
    try:
        await asyncio.gather(a.start(), b.start())
        await b.register("r-b1", "reviews")

        async def peer_b() -> dict[str, Any]:
            status, peers = await a.call("GET", "/v1/peers")
            assert status == 200
            return {p["cluster"]: p for p in peers}["b"]

        async def imported() -> bool:
            p = await peer_b()
            return p["state"] == "connected" and "reviews.default" in p["services"]

        await eventually(imported, timeout=30, what="a imports b's reviews")
        await b.stop()

        async def unreachable() -> dict[str, Any] | None:
            p = await peer_b()
            return p if p["state"] == "unreachable" else None

        p = await eventually(unreachable, timeout=30, what="b unreachable on a")
        assert p["down_since"] is not None and p["last_sync"] is not None
        assert p["services"] == ["reviews.default"]  # last-known exports kept
        status, svc = await a.call("GET", "/v1/services/default/reviews")
        assert status == 200 and "b" in svc["clusters"]

        await b.start()

        async def back() -> bool:
            p = await peer_b()
            return p["state"] == "connected" and p["down_since"] is None

        await eventually(back, timeout=30, what="b connected again on a")
    finally:
        await asyncio.gather(a.close(), b.close(), return_exceptions=True)
