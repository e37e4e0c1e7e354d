"""Two appliances on one host keep their own identities, and a peering that fails says why."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from isthmus import config as configmod
from isthmus.appliance import Appliance, StartupError

from .conftest import Cluster, eventually, make_pki


def without_identity_paths(c: Cluster) -> None:
    """The lab setup: bundle and cluster CA configured, trust.cert/trust.key left default."""
    base = c.config

    def config() -> dict[str, Any]:
        raw = base()
        del raw["trust"]["cert"], raw["trust"]["key"]
        return raw

    c.config = config  # type: ignore[method-assign]


async def test_two_clusters_on_one_host_keep_their_own_identities(tmp_path: Path) -> None:
    make_pki(tmp_path, ["east", "west"])
    east = Cluster("east", tmp_path, "127.67.0.1", "us")
    west = Cluster("west", tmp_path, "127.67.0.2", "eu")
    east.peers, west.peers = {"west": west.ingress}, {"east": east.ingress}
    for c in (east, west):
        without_identity_paths(c)
    try:
        await asyncio.gather(east.start(), west.start())
        assert east.app is not None and west.app is not None
        for c in (east, west):
            assert c.app is not None and c.app.trust is not None
            assert str(c.app.trust.credentials.spiffe_id).endswith(f"/cluster/{c.name}/gateway/"
                                                                   f"{c.name}-gw")
            assert (c.dir / "data" / "pki" / "node.pem").exists()
            assert (c.dir / "data" / "pki" / "node.key").stat().st_mode & 0o777 == 0o600

        async def peered() -> bool:
            _, peers = await east.call("GET", "/v1/peers")
            return peers[0]["state"] == "connected"

        await eventually(peered, what="east and west peered")
    finally:
        await asyncio.gather(east.close(), west.close(), return_exceptions=True)


async def test_an_identity_of_another_node_is_never_overwritten(tmp_path: Path) -> None:
    make_pki(tmp_path, ["east", "west"])
    east = Cluster("east", tmp_path, "127.67.0.3", "us")
    west = Cluster("west", tmp_path, "127.67.0.4", "eu")
    shared = tmp_path / "shared"
    for c in (east, west):
        base = c.config

        def config(base: Any = base) -> dict[str, Any]:
            raw = base()
            raw["trust"]["cert"] = str(shared / "node.pem")  # both point at one file
            raw["trust"]["key"] = str(shared / "node.key")
            return raw

        c.config = config  # type: ignore[method-assign]
    try:
        await east.start()
        before = (shared / "node.pem").read_bytes()
        app = Appliance(configmod.validate(west.config()))
        with pytest.raises(StartupError) as e:
            await app.start()
        await app.stop()
        msg = str(e.value)
        assert "spiffe://mesh.test/cluster/east/gateway/east-gw" in msg
        assert "another node" in msg and "trust.cert" in msg
        assert (shared / "node.pem").read_bytes() == before  # east keeps its identity
    finally:
        await east.close()
        await west.close()


async def test_a_peer_that_refuses_us_is_logged_with_what_to_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_pki(tmp_path, ["east", "west"])
    east = Cluster("east", tmp_path, "127.67.0.5", "us")
    west = Cluster("west", tmp_path, "127.67.0.6", "eu")
    east.peers = {"west": west.ingress}  # west does not list east: it refuses east's feed
    caplog.set_level(logging.WARNING, logger="federation.peering")
    try:
        await asyncio.gather(east.start(), west.start())

        async def logged() -> list[logging.LogRecord]:
            return [r for r in caplog.records
                    if r.getMessage() == "peer link down" and getattr(r, "reason", "") == "refused"]

        record = (await eventually(logged, what="east logs why peering fails"))[0]
        detail = record.detail  # type: ignore[attr-defined]
        assert "refused this node's certificate" in detail and "its log says why" in detail
        assert record.levelno == logging.WARNING
        await asyncio.sleep(1.5)  # several retries: the same cause is not logged again
        again = [r for r in await logged() if r.levelno >= logging.WARNING]
        assert len(again) == 1
        _, peers = await east.call("GET", "/v1/peers")
        assert "refused" in peers[0]["error"]
    finally:
        await asyncio.gather(east.close(), west.close(), return_exceptions=True)
