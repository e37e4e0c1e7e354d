"""`isthmus demo`: a whole federation on loopback in one command.

Two clusters, east and west, each an appliance (control, ingress, DNS; west also egress), and
one VM agent in east with its own egress and resolver. Sample HTTP services run in both
clusters. Everything shares one PKI made for the demo under a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from federation.trust import TrustBundle, create_cluster_ca, create_root
from federation.trust.pemfiles import write_bundle, write_certs, write_key
from isthmus import config as configmod
from isthmus.appliance import Appliance

TD = "demo.isthmus"
HTTP_PORT = 9080


@dataclass
class SampleService:
    """A backend that says who it is; POST /fail and /recover flip its health."""

    name: str
    cluster: str
    version: str
    host: str
    healthy: bool = True
    runner: web.AppRunner | None = field(default=None, repr=False)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_post("/fail", self._fail)
        app.router.add_post("/recover", self._recover)
        app.router.add_get("/{tail:.*}", self._hello)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, HTTP_PORT, reuse_address=True).start()

    async def _hello(self, _: web.Request) -> web.Response:
        if not self.healthy:
            return web.Response(status=503, text="down\n")
        return web.Response(text=f"{self.name} {self.version} from {self.cluster} ({self.host})\n")

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _fail(self, _: web.Request) -> web.Response:
        self.healthy = False
        return web.Response(text=f"{self.name} in {self.cluster} now fails its health check\n")

    async def _recover(self, _: web.Request) -> web.Response:
        self.healthy = True
        return web.Response(text=f"{self.name} in {self.cluster} is healthy again\n")

    def registration(self) -> dict[str, Any]:
        return {
            "id": f"{self.name}-{self.cluster}",
            "service": self.name,
            "address": self.host,
            "ports": {"http": HTTP_PORT},
            "labels": {"version": self.version},
            # two failures in a row: one slow answer on a busy laptop is not an outage
            "check": {
                "http": f"http://{self.host}:{HTTP_PORT}/healthz",
                "interval": "1s",
                "timeout": "1s",
                "failure_threshold": 2,
            },
        }


CLUSTERS = {
    # name: (edge host, vip range, region)
    "east": ("127.10.0.1", "127.241.0.0/16", "us-east"),
    "west": ("127.20.0.1", "127.242.0.0/16", "us-west"),
}
AGENT_HOST = "127.10.0.100"


def make_pki(base: Path) -> None:
    root = create_root(TD)
    write_key(base / "root-ca.key", root.key)
    write_certs(base / "root-ca.pem", [root.cert])
    for name in CLUSTERS:
        ca = create_cluster_ca(root, name)
        d = base / name
        write_key(d / "cluster-ca.key", ca.key)
        write_certs(d / "cluster-ca.pem", [ca.cert])
        write_bundle(d / "bundle.pem", TrustBundle.of([root.cert]))


def cluster_config(base: Path, name: str, services: list[SampleService]) -> dict[str, Any]:
    host, vips, region = CLUSTERS[name]
    d = base / name
    roles = ["control", "ingress", "dns"] + (["egress"] if name == "west" else [])
    return {
        "cluster": name,
        "trust_domain": TD,
        "node": f"{name}-gw-1",
        "locality": {"region": region, "zone": f"{region}-1a"},
        "roles": roles,
        "data_dir": str(d / "data"),
        "trust": {
            "bundle": str(d / "bundle.pem"),
            "ca_cert": str(d / "cluster-ca.pem"),
            "ca_key": str(d / "cluster-ca.key"),
            "cert": str(d / "node.pem"),
            "key": str(d / "node.key"),
        },
        "api": {"listen": f"{host}:15000", "token_file": str(d / "api-token")},
        "control": {"listen": f"{host}:15012"},
        "metrics": {"listen": f"{host}:15090"},
        "ingress": {"listen": f"{host}:15443", "public_address": f"{host}:15443"},
        "egress": {"vip_cidr": vips},
        "dns": {"listen": f"{host}:15053"},
        "federation": {
            "peers": [
                {"cluster": o, "address": f"{CLUSTERS[o][0]}:15443"} for o in CLUSTERS if o != name
            ],
            "export": ["*.default"],
        },
        "discovery": {"workloads": [s.registration() for s in services if s.cluster == name]},
        "log": {"level": "warning"},
        "drain_timeout": "2s",
    }


def agent_config(base: Path, token: str) -> dict[str, Any]:
    d = base / "vm-1"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "east" / "bundle.pem", d / "bundle.pem")
    (d / "bootstrap-token").write_text(token + "\n")
    return {
        "cluster": "east",
        "trust_domain": TD,
        "node": "vm-1",
        "locality": {"region": "us-east", "zone": "us-east-1b"},
        "roles": ["agent"],
        "data_dir": str(d / "data"),
        "trust": {
            "bundle": str(d / "bundle.pem"),
            "cert": str(d / "agent.pem"),
            "key": str(d / "agent.key"),
            "ca_cert": str(d / "no-ca.pem"),
            "ca_key": str(d / "no-ca.key"),
        },
        "agent": {
            "control": f"{CLUSTERS['east'][0]}:15012",
            "bootstrap_token_file": str(d / "bootstrap-token"),
        },
        "api": {"listen": f"{AGENT_HOST}:15000", "token_file": str(d / "api-token")},
        "metrics": {"listen": f"{AGENT_HOST}:15090"},
        "dns": {"listen": f"{AGENT_HOST}:15053"},
        "egress": {"vip_cidr": CLUSTERS["east"][1]},
        "log": {"level": "warning"},
        "drain_timeout": "2s",
    }


async def _until_served(table: Any) -> None:
    """Ready when a call through the VM's egress to every sample service answers 200 (the
    data plane settles a moment after the table: first gateway probes, warm pools)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        for route in table.services.values():
            async with asyncio.timeout(20):
                while True:
                    try:
                        async with http.get(f"http://{route.vip}:{HTTP_PORT}/") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)


def instructions(base: Path, vip: str) -> str:
    e, w = CLUSTERS["east"][0], CLUSTERS["west"][0]
    east_api = f"--api http://{e}:15000 --token-file {base}/east/api-token"
    return f"""
Isthmus demo: clusters east ({e}) and west ({w}) peer over their public ingress
addresses ({e}:15443, {w}:15443) with mutual TLS under one root; VM agent vm-1 ({AGENT_HOST})
runs in east with its own resolver and egress. State and PKI: {base}

  reviews  v1 in east ({e.rsplit(".", 1)[0]}.11), v2 in west ({w.rsplit(".", 1)[0]}.11)
  ratings  only in west ({w.rsplit(".", 1)[0]}.12)

Try, from another terminal (the VM's view):
  dig @{AGENT_HOST} -p 15053 reviews.default.global +short          # the VIP: {vip}
  dig @{AGENT_HOST} -p 15053 _http._tcp.reviews.default.global SRV +short
  curl http://{vip}:{HTTP_PORT}/                # east first: locality
  # ratings runs only in west: the VM reaches it through mTLS between the gateways
  curl http://$(dig @{AGENT_HOST} -p 15053 ratings.default.global +short):{HTTP_PORT}/
  isthmus status {east_api}

Shift traffic, from any cluster's API (replicated to all):
  isthmus traffic set reviews.default east=20 west=80 {east_api}
  for i in $(seq 20); do curl -s http://{vip}:{HTTP_PORT}/; done | sort | uniq -c

Kill a backend and watch failover (no failed requests):
  curl -X POST http://{e.rsplit(".", 1)[0]}.11:{HTTP_PORT}/fail
  for i in $(seq 20); do curl -s http://{vip}:{HTTP_PORT}/; done | sort | uniq -c
  curl -X POST http://{e.rsplit(".", 1)[0]}.11:{HTTP_PORT}/recover

Ctrl-C stops everything.
"""


async def run_demo(base: Path, ready: asyncio.Event | None = None) -> None:
    make_pki(base)
    services = [
        SampleService("reviews", "east", "v1", "127.10.0.11"),
        SampleService("reviews", "west", "v2", "127.20.0.11"),
        SampleService("ratings", "west", "v1", "127.20.0.12"),
    ]
    appliances: list[Appliance] = []
    try:
        for s in services:
            await s.start()
        for name in CLUSTERS:
            app = Appliance(configmod.validate(cluster_config(base, name, services)))
            await app.start()
            appliances.append(app)
        east = appliances[0]
        assert east.bootstrap_tokens is not None
        token, _ = east.bootstrap_tokens.create(600)
        agent = Appliance(configmod.validate(agent_config(base, token)))
        await agent.start()
        appliances.append(agent)
        # ready when the VM sees every sample backend healthy, in both clusters, and a call
        # through its egress to each service answers
        want = {("reviews", "east"), ("reviews", "west"), ("ratings", "west")}
        async with asyncio.timeout(30):
            while True:
                table = agent.holder.current
                seen = {
                    (k.name, d.cluster)
                    for k, r in table.services.items()
                    for d in r.destinations
                    if d.healthy > 0
                }
                if want <= seen:
                    break
                await asyncio.sleep(0.1)
        await _until_served(table)
        vip = str(next(r.vip for k, r in table.services.items() if k.name == "reviews"))
        print(instructions(base, vip), flush=True)
        if ready is not None:
            ready.set()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping the demo...", flush=True)
    finally:
        for app in reversed(appliances):
            with contextlib.suppress(Exception):
                await app.stop()
        for s in services:
            if s.runner:
                await s.runner.cleanup()


def main(keep: str | None) -> int:
    from isthmus import logs

    logs.setup("warning", "text")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    if keep:
        base = Path(keep)
        base.mkdir(parents=True, exist_ok=True)
        if any(base.iterdir()):
            print(f"isthmus demo: {base} is not empty", flush=True)
            return 1
        runner(run_demo(base))
        return 0
    with tempfile.TemporaryDirectory(prefix="isthmus-demo-") as d:
        runner(run_demo(Path(d)))
    return 0
