"""A federation of appliances on loopback: one PKI, each cluster its own 127.x addresses."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from federation.trust import TrustBundle, create_cluster_ca, create_root
from federation.trust.pemfiles import write_bundle, write_certs, write_key
from isthmus import config as configmod
from isthmus.appliance import Appliance

TD = "mesh.test"
_nets = itertools.count(1)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Cluster:
    """One appliance (control + ingress) and a client for its API."""

    def __init__(
        self,
        name: str,
        base: Path,
        host: str,
        region: str,
        vip_cidr: str = "127.240.0.0/16",
        roles: tuple[str, ...] = ("control", "ingress"),
    ) -> None:
        self.name = name
        self.vip_cidr = vip_cidr
        self.roles = roles
        self.dir = base / name
        self.host = host
        self.region = region
        self.ingress = f"{host}:{free_port(host)}"
        self.api_listen = f"{host}:{free_port(host)}"
        self.app: Appliance | None = None
        self.peers: dict[str, str] = {}
        self.http: aiohttp.ClientSession | None = None

    def config(self) -> dict[str, Any]:
        pki = self.dir / "pki"
        return {
            "cluster": self.name,
            "trust_domain": TD,
            "node": f"{self.name}-gw",
            "locality": {"region": self.region, "zone": f"{self.region}-a"},
            "roles": list(self.roles),
            "data_dir": str(self.dir / "data"),
            "trust": {
                "bundle": str(pki / "bundle.pem"),
                "ca_cert": str(pki / "ca.pem"),
                "ca_key": str(pki / "ca.key"),
                "cert": str(pki / "node.pem"),
                "key": str(pki / "node.key"),
            },
            "api": {"listen": self.api_listen, "token_file": str(self.dir / "api-token")},
            "control": {"listen": f"{self.host}:0"},
            "metrics": {"enabled": False},
            "ingress": {"listen": self.ingress, "public_address": self.ingress},
            "federation": {
                "peers": [{"cluster": c, "address": a} for c, a in sorted(self.peers.items())],
                "export": ["*.default"],
            },
            "egress": {"vip_cidr": self.vip_cidr},
            # the shift benchmark checks every 500 ms: below a real appliance's 1 s floor
            "discovery": {"min_check_interval": "100ms"},
        }

    async def start(self) -> None:
        self.app = Appliance(configmod.validate(self.config()), None)
        await self.app.start()
        if self.http is None:
            self.http = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.stop()
            self.app = None

    async def close(self) -> None:
        await self.stop()
        if self.http is not None:
            await self.http.close()

    async def call(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        assert self.http is not None
        token = (self.dir / "api-token").read_text().strip()
        async with self.http.request(
            method,
            f"http://{self.api_listen}{path}",
            json=json,
            headers={"Authorization": f"Bearer {token}"},
        ) as r:
            text = await r.text()
            return r.status, (await r.json(content_type=None)) if text else None

    async def register(self, wid: str, service: str, **body: Any) -> None:
        status, out = await self.call(
            "PUT",
            f"/v1/workloads/{wid}",
            {"service": service, "address": self.host, "ports": {"http": 9080}, **body},
        )
        assert status in (200, 201), out


class Backend:
    """An HTTP server answering every GET with its cluster's name (tests and benches)."""

    def __init__(self, cluster: str, host: str) -> None:
        self.cluster, self.host = cluster, host
        self.port = free_port(host)
        self.runner: web.AppRunner | None = None

    async def _handle(self, _: web.Request) -> web.Response:
        return web.Response(text=self.cluster)

    async def up(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()

    async def down(self) -> None:
        if self.runner:
            await self.runner.cleanup()
            self.runner = None


def make_pki(base: Path, names: list[str]) -> None:
    root = create_root(TD)
    bundle = TrustBundle.of([root.cert])
    for name in names:
        ca = create_cluster_ca(root, name)
        pki = base / name / "pki"
        write_key(pki / "ca.key", ca.key)
        write_certs(pki / "ca.pem", [ca.cert])
        write_bundle(pki / "bundle.pem", bundle)


async def eventually(probe: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll an async probe until it returns something truthy (bounded)."""
    last = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await probe()
                if last:
                    return last
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"never true within {timeout}s: {what} (last {last!r})") from None


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[dict[str, Cluster]]:
    n = next(_nets) + 10 * (os.getpid() % 20)
    names = ["a", "b", "c"]
    regions = {"a": "us", "b": "us", "c": "eu"}
    make_pki(tmp_path, names)
    clusters = {
        c: Cluster(c, tmp_path, f"127.60.{n % 250}.{i + 1}", regions[c])
        for i, c in enumerate(names)
    }
    for c in clusters.values():
        c.peers = {o.name: o.ingress for o in clusters.values() if o is not c}
    try:
        await asyncio.gather(*(c.start() for c in clusters.values()))
        yield clusters
    finally:
        await asyncio.gather(*(c.close() for c in clusters.values()), return_exceptions=True)
