"""Drill: one unauthenticated source floods the ingress's handshake slots.

The attacker (slot_flood.py, a process of its own) holds 512 connections to west's ingress from
127.0.66.6, each with the first 6 bytes of a ClientHello, and reconnects whenever the ingress
closes one. Before the per-source cap and the reserved peer share, it held every pending slot:
peers' handshakes and the egress's tunnel re-dials were refused (`pending_limit`), and every
refusal was a log line. Under the same flood, on the two-cluster topology of gw_topology.py:

- a stream on an established tunnel keeps serving;
- the egress's tunnel re-dials succeed, and new connections through them;
- new peer handshakes succeed: from a configured peer source, from a source that completed a
  verified handshake before the flood, and from sources the ingress never saw;
- every refusal is counted in `isthmus_rejections_total`, and logged as a count per reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gw_topology import TCP_PORT, TD, WEST_ONLY_VIP, Pki, topology
from prometheus_client import REGISTRY

from federation.trust.connections import tls_connect
from federation.trust.credentials import TlsCredentials
from federation.trust.errors import TrustError

pytestmark = pytest.mark.timeout(120)

ATTACKER = "127.0.66.6"
SOCKETS = 512  # the ingress's whole default pending budget
PEER_SOURCE = "127.0.30.1"  # in the ingress's configured peer sources
KNOWN = "127.0.40.1"  # completes a verified handshake before the flood
FRESH = [f"127.0.50.{i}" for i in range(1, 21)]  # never seen before the flood
FLOOD = Path(__file__).with_name("slot_flood.py")


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


def rejections() -> dict[str, float]:
    """isthmus_rejections_total of west's ingress, by reason."""
    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name != "isthmus_rejections":
            continue
        for s in metric.samples:
            labels = s.labels
            if (
                s.name == "isthmus_rejections_total"
                and labels.get("gateway") == "ingress"
                and labels.get("cluster") == "west"
            ):
                out[labels["reason"]] = s.value
    return out


def refused_since(before: dict[str, float]) -> float:
    return sum(v - before.get(r, 0.0) for r, v in rejections().items())


@contextlib.asynccontextmanager
async def flood(gateway: str, sources: str = ATTACKER) -> AsyncIterator[None]:
    """slot_flood.py against `gateway` from `sources` until the block ends (90 s at most)."""
    host, port = gateway.rsplit(":", 1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FLOOD), host, port, sources, str(SOCKETS), "90",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            assert await proc.stdout.readline() == b"ready\n"
        yield
    finally:
        proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def peer_handshake(pki: Pki, gateway: str, source: str) -> bool:
    """A gateway of east completes a mutual-TLS handshake with west's ingress from `source`."""
    host, port = gateway.rsplit(":", 1)
    creds = TlsCredentials(pki.east, pki.bundle)
    try:
        conn = await tls_connect(
            host, int(port), creds, server_hostname=f"probe.west.{TD}",
            expected_cluster="west", local_addr=(source, 0),
        )  # fmt: skip
    except (TrustError, OSError):
        return False
    conn.writer.close()
    return True


async def echo_through(vip: str, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(vip, TCP_PORT)
    try:
        writer.write(payload)
        return await reader.readexactly(len(payload))
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    finally:
        writer.close()


async def test_a_slot_flood_from_one_source_starves_no_peer(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.ingress")
    west_ingress: dict[str, object] = {
        "peer_sources": (PEER_SOURCE,),
        "refusal_log_interval": 3600.0,  # one line now, the rest as one count at close
    }
    before = rejections()
    vip = str(WEST_ONLY_VIP)
    async with asyncio.timeout(90), topology(pki, west_ingress=west_ingress) as topo:
        gateway = topo.west.gateway
        ingress = topo.west.ingress
        assert ingress is not None
        # Before the flood: a tunnel from east's egress with a long-lived stream on it, and one
        # verified handshake from KNOWN.
        reader, writer = await asyncio.open_connection(vip, TCP_PORT)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        assert await peer_handshake(pki, gateway, KNOWN)
        dials = topo.egress.tunnels.dials

        async with flood(gateway):
            # The first wave has reached the ingress: held (old code: every slot) or refused.
            for _ in range(1000):
                if ingress.connections >= SOCKETS - 12 or refused_since(before) >= 400:
                    break
                await asyncio.sleep(0.01)

            # The established tunnel keeps serving.
            writer.write(b"during")
            assert await reader.readexactly(6) == b"during"
            assert await echo_through(vip, b"new stream") == b"new stream"

            # New peer handshakes: 30 from the configured source, 20 from the known one, one
            # from each of 20 fresh sources.
            sources = [PEER_SOURCE] * 30 + [KNOWN] * 20 + FRESH
            ok = 0
            for i in range(0, len(sources), 10):
                batch = sources[i : i + 10]
                ok += sum(await asyncio.gather(*(peer_handshake(pki, gateway, s) for s in batch)))
            assert ok == len(sources), f"{len(sources) - ok} of {len(sources)} peers refused"

            # The egress loses its tunnels and dials again, through the flood.
            for conn in topo.egress.tunnels.connections(gateway):
                conn.abort()
            for i in range(5):
                assert await echo_through(vip, b"after re-dial %d" % i) == b"after re-dial %d" % i
            assert topo.egress.tunnels.dials > dials
            refused = refused_since(before)
            assert refused >= 400, "the flood was refused, not held"
        writer.close()

    # Counted one by one, logged as counts: one line when a reason starts, one at close.
    total = refused_since(before)
    lines = [r for r in caplog.records if r.getMessage() == "ingress refused connection"]
    assert sum(getattr(r, "count", 1) for r in lines) == total
    reasons = {r.reason for r in lines}  # type: ignore[attr-defined]
    assert len(lines) <= 2 * len(reasons), [(r.reason, r.count) for r in lines]  # type: ignore[attr-defined]


async def test_a_flood_from_many_sources_leaves_the_reserve_to_known_peers(pki: Pki) -> None:
    """64 addresses, 8 sockets each: under every per-source cap, together more than the shared
    part of the pending slots. Known peers still get in, through the reserved share."""
    attackers = ",".join(f"127.0.67.{i}" for i in range(1, 65))
    before = rejections()
    async with (
        asyncio.timeout(90),
        topology(pki, west_ingress={"peer_sources": (PEER_SOURCE,)}) as topo,
    ):
        gateway = topo.west.gateway
        ingress = topo.west.ingress
        assert ingress is not None
        assert await peer_handshake(pki, gateway, KNOWN)
        async with flood(gateway, attackers):
            shared = ingress.config.max_pending // 2
            for _ in range(1000):
                if ingress.pending >= shared and rejections().get("pending_limit", 0) > before.get(
                    "pending_limit", 0
                ):
                    break
                await asyncio.sleep(0.01)
            assert ingress.pending >= shared, "the flood took the shared slots"
            sources = [PEER_SOURCE] * 10 + [KNOWN] * 10
            results = await asyncio.gather(*(peer_handshake(pki, gateway, s) for s in sources))
            assert all(results), f"{results.count(False)} of {len(sources)} known peers refused"
