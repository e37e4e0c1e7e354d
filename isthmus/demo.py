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
import socket
import sys
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


PORTS = (15000, 15012, 15053, 15090, 15443)  # API, control, DNS, metrics, ingress


@dataclass(frozen=True, slots=True)
class Layout:
    """Every address of the demo, inside one loopback /16 (127.N.0.0/16)."""

    base: str  # "127.N"

    def edge(self, cluster: str) -> str:
        return f"{self.base}.{1 if cluster == 'east' else 2}.1"

    def service(self, cluster: str, n: int) -> str:
        return f"{self.base}.{1 if cluster == 'east' else 2}.{10 + n}"

    def vips(self, cluster: str) -> str:
        return f"{self.base}.{241 if cluster == 'east' else 242}.0/24"

    @property
    def agent(self) -> str:
        return f"{self.base}.1.100"

    def listeners(self) -> list[tuple[str, int, int]]:
        """(host, port, socket type) the demo binds at fixed ports."""
        out = []
        for host in (self.edge("east"), self.edge("west"), self.agent):
            out += [(host, p, socket.SOCK_STREAM) for p in PORTS]
            out.append((host, 15053, socket.SOCK_DGRAM))
        for host in (self.service("east", 1), self.service("west", 1), self.service("west", 2)):
            out.append((host, HTTP_PORT, socket.SOCK_STREAM))
        return out


REGIONS = {"east": "us-east", "west": "us-west"}
CLUSTERS = tuple(REGIONS)
FIRST_BASE, LAST_BASE = 10, 239  # 127.240.0.0 and up are where VIP ranges usually live


class DemoError(Exception):
    pass


def _bound_in(base: str) -> str | None:
    """An address of 127.N.0.0/16 some socket on this host is bound to, from /proc/net."""
    prefix = bytes(int(x) for x in base.split("."))  # 127, N
    for name in ("tcp", "udp"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            return None  # not Linux: trust the bind probes alone
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if name == "tcp" and state != "0A":  # only listeners hold an address for good
                continue
            addr = bytes.fromhex(local.split(":")[0])[::-1]  # little-endian IPv4
            if addr[:2] == prefix:
                return f"{'.'.join(map(str, addr))}:{int(local.split(':')[1], 16)}"
    return None


def _taken(layout: Layout) -> str | None:
    """Why `layout` cannot be used, or None."""
    busy = _bound_in(layout.base)
    if busy is not None:
        return f"{busy} is in use"
    for host, port, kind in layout.listeners():
        with socket.socket(socket.AF_INET, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                return f"{host}:{port} is taken ({e.strerror})"
    return None


def choose_layout(base: str | None) -> Layout:
    if base is not None:
        parts = base.split(".")
        if len(parts) != 2 or parts[0] != "127" or not parts[1].isdigit() or \
                not 1 <= int(parts[1]) <= 254:
            raise DemoError(f"--base {base!r}: expected 127.N with N from 1 to 254, e.g. 127.30")
        why = _taken(Layout(base))
        if why:
            raise DemoError(f"--base {base}: {why}; pass another --base 127.N")
        return Layout(base)
    first_problem = None
    for n in range(FIRST_BASE, LAST_BASE + 1):
        layout = Layout(f"127.{n}")
        why = _taken(layout)
        if why is None:
            return layout
        first_problem = first_problem or why
    raise DemoError(f"no free 127.N.0.0/16 from 127.{FIRST_BASE}: {first_problem}; "
                    "pass --base 127.N")


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


def cluster_config(
    base: Path, name: str, services: list[SampleService], layout: Layout
) -> dict[str, Any]:
    host, vips, region = layout.edge(name), layout.vips(name), REGIONS[name]
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
                {"cluster": o, "address": f"{layout.edge(o)}:15443"} for o in CLUSTERS if o != name
            ],
            "export": ["*.default"],
        },
        "discovery": {"workloads": [s.registration() for s in services if s.cluster == name]},
        "log": {"level": "warning"},
        "drain_timeout": "2s",
    }


def agent_config(base: Path, token: str, layout: Layout) -> dict[str, Any]:
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
            "control": f"{layout.edge('east')}:15012",
            "bootstrap_token_file": str(d / "bootstrap-token"),
        },
        "api": {"listen": f"{layout.agent}:15000", "token_file": str(d / "api-token")},
        "metrics": {"listen": f"{layout.agent}:15090"},
        "dns": {"listen": f"{layout.agent}:15053"},
        "egress": {"vip_cidr": layout.vips("east")},
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


def instructions(base: Path, vip: str, layout: Layout) -> str:
    e, w, vm = layout.edge("east"), layout.edge("west"), layout.agent
    east_cfg = f"--config {base}/east/east.yaml"
    return f"""
Isthmus demo: clusters east ({e}) and west ({w}) peer over their public ingress
addresses ({e}:15443, {w}:15443) with mutual TLS under one root; VM agent vm-1 ({vm})
runs in east with its own resolver and egress. State, configs and PKI: {base}

  reviews  v1 in east ({layout.service("east", 1)}), v2 in west ({layout.service("west", 1)})
  ratings  only in west ({layout.service("west", 2)})

Try, from another terminal (the VM's view):
  dig @{vm} -p 15053 reviews.default.global +short          # the VIP: {vip}
  dig @{vm} -p 15053 _http._tcp.reviews.default.global SRV +short
  curl http://{vip}:{HTTP_PORT}/                # east first: locality
  # ratings runs only in west: the VM reaches it through mTLS between the gateways
  curl http://$(dig @{vm} -p 15053 ratings.default.global +short):{HTTP_PORT}/
  isthmus status {east_cfg}
  isthmus status --config {base}/vm-1/vm-1.yaml   # the agent's own view

Shift traffic, from any cluster's API (replicated to all):
  isthmus traffic set reviews.default east=20 west=80 {east_cfg}
  for i in $(seq 20); do curl -s http://{vip}:{HTTP_PORT}/; done | sort | uniq -c

Kill a backend and watch failover (no failed requests):
  curl -X POST http://{layout.service("east", 1)}:{HTTP_PORT}/fail
  for i in $(seq 20); do curl -s http://{vip}:{HTTP_PORT}/; done | sort | uniq -c
  curl -X POST http://{layout.service("east", 1)}:{HTTP_PORT}/recover

Ctrl-C stops everything.
"""


def _write_config(path: Path, raw: dict[str, Any]) -> Any:
    """The config as a file (so `isthmus status --config` works), loaded like `run` does."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return configmod.load(path)


async def run_demo(base: Path, layout: Layout, ready: asyncio.Event | None = None) -> None:
    make_pki(base)
    services = [
        SampleService("reviews", "east", "v1", layout.service("east", 1)),
        SampleService("reviews", "west", "v2", layout.service("west", 1)),
        SampleService("ratings", "west", "v1", layout.service("west", 2)),
    ]
    appliances: list[Appliance] = []
    try:
        for s in services:
            await s.start()
        for name in CLUSTERS:
            cfg = _write_config(base / name / f"{name}.yaml",
                                cluster_config(base, name, services, layout))
            app = Appliance(cfg)
            appliances.append(app)
            await app.start()
        east = appliances[0]
        assert east.bootstrap_tokens is not None
        token, _ = east.bootstrap_tokens.create(600)
        agent = Appliance(_write_config(base / "vm-1" / "vm-1.yaml",
                                        agent_config(base, token, layout)))
        appliances.append(agent)
        await agent.start()
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
        print(instructions(base, vip, layout), flush=True)
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


def main(keep: str | None, base: str | None = None) -> int:
    from isthmus import logs
    from isthmus.appliance import StartupError

    logs.setup("warning", "text")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        layout = choose_layout(base)
        if keep:
            state = Path(keep)
            state.mkdir(parents=True, exist_ok=True)
            if any(state.iterdir()):
                raise DemoError(f"{state} is not empty")
            runner(run_demo(state, layout))
            return 0
        with tempfile.TemporaryDirectory(prefix="isthmus-demo-") as d:
            runner(run_demo(Path(d), layout))
    except (DemoError, StartupError) as e:
        print(f"isthmus demo: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:  # something took an address between the probe and the bind
        print(f"isthmus demo: {e.strerror or e}; try again, or pass --base 127.N",
              file=sys.stderr, flush=True)
        return 1
    except TimeoutError:
        print("isthmus demo: the federation did not come up within 30 s", file=sys.stderr)
        return 1
    return 0
