"""Consul as the catalog (issue 14), MEASURED AGAINST THE CONSUL STAND-IN.

No Consul server is reachable from this project's machines: the Consul side is the stand-in of
tests/consul_standin (one Python process playing the local agent and the servers, with Consul's
documented blocking-query semantics), run as a process of its own. Its costs are not Consul's;
what is measured is what the appliance does: how many requests it sends and how soon a change
reaches its routing table.

1. start-up: N services read (one blocking query per service), the routing table built;
2. change -> routing table: an instance added or removed, or a check turning critical or
   passing, made through Consul's HTTP API, until the appliance's routing table shows it;
3. Consul requests per minute from the appliance, at rest and under churn.

    python3 bench/consul_bench.py --services 5000 --max-connections 6000 --wait 60s
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import consul.aio

from discovery.addresses import split_host_port
from discovery.consul.client import ConsulOptions
from discovery.consul.mapping import MappingRules
from discovery.consul.store import ConsulCatalog
from discovery.durations import parse_duration
from discovery.model import Locality
from discovery.names import ServiceKey
from federation.routing import RoutingTable, TableHolder
from federation.table import TableBuilder

CLUSTER = "bench"
DRIVER = {"PUT catalog/register", "PUT catalog/deregister", "GET standin"}


class StandInProcess:
    def __init__(self, services: int) -> None:
        self.services = services
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def __enter__(self) -> StandInProcess:
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.consul_standin.serve", "--host", "127.78.250.1",
             "--services", str(self.services), "--cluster", CLUSTER,
             "--vip-prefix", f"isthmus/{CLUSTER}"],
            cwd=root, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["READY"], line
        self.address = line[1]
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def requests(session: aiohttp.ClientSession, address: str) -> collections.Counter[str]:
    async with session.get(f"{address}/standin/requests") as r:
        return collections.Counter(json.loads(await r.text()))


def per_minute(before: collections.Counter[str], after: collections.Counter[str],
               seconds: float) -> dict[str, float]:
    out = {k: (after[k] - before[k]) * 60 / seconds for k in after if k not in DRIVER}
    return {k: v for k, v in sorted(out.items()) if v}


class Expectations:
    """Changes made in Consul, and when the routing table first showed each one."""

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[int, int, float]] = {}  # service -> total, healthy, t0
        self.latencies: list[float] = []
        self.done = asyncio.Event()

    def expect(self, service: str, total: int, healthy: int) -> None:
        self.waiting[service] = (total, healthy, time.perf_counter())

    def on_table(self, table: RoutingTable) -> None:
        now = time.perf_counter()
        for service, (total, healthy, t0) in list(self.waiting.items()):
            route = table.get(ServiceKey(service))
            d = route.destination(CLUSTER) if route else None
            if d is not None and (d.total, d.healthy) == (total, healthy):
                self.latencies.append(now - t0)
                del self.waiting[service]
        if not self.waiting:
            self.done.set()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"p50 {statistics.median(ms):.1f} / p90 {pct(ms, 0.9):.1f} / p99 {pct(ms, 0.99):.1f}"
            f" / max {max(ms):.1f} ms (n={len(ms)})")


class Driver:
    """Changes made through Consul's HTTP API: a second instance of a service appears or goes,
    or an instance's check flips between passing and critical."""

    def __init__(self, client: Any, services: int, rng: random.Random) -> None:
        self.client, self.services, self.rng = client, services, rng
        self.extra: set[int] = set()
        self.critical: set[int] = set()

    async def change(self, exp: Expectations) -> None:
        n = self.rng.randrange(self.services)
        while f"svc{n}" in exp.waiting:
            n = self.rng.randrange(self.services)
        if self.rng.random() < 0.5:  # an instance added or removed
            node = f"extra-{n % 500}"
            if n in self.extra:
                self.extra.discard(n)
                exp.expect(f"svc{n}", 1, 0 if n in self.critical else 1)
                await self.client.catalog.deregister(node, service_id=f"svc{n}-x")
            else:
                self.extra.add(n)
                exp.expect(f"svc{n}", 2, 1 if n in self.critical else 2)
                await self.client.catalog.register(
                    node, f"10.200.{n % 500 // 250}.{n % 250 + 1}", skip_node_update=True,
                    service={"ID": f"svc{n}-x", "Service": f"svc{n}", "Port": 8080,
                             "Address": f"10.200.{n % 250}.{n % 200 + 1}",
                             "Meta": {"isthmus-port": "http"}})
        else:  # the first instance's check flips
            total = 2 if n in self.extra else 1
            status = "passing" if n in self.critical else "critical"
            (self.critical.discard if status == "passing" else self.critical.add)(n)
            exp.expect(f"svc{n}", total, total - (n in self.critical))
            await self.client.catalog.register(  # the node itself unchanged
                f"vm-{n % 500}-0", f"10.{n % 250}.0.{n % 200 + 1}", skip_node_update=True,
                check={"CheckID": f"service:svc{n}-0", "Name": "http", "Status": status,
                       "ServiceID": f"svc{n}-0"})


async def run(a: argparse.Namespace) -> None:
    rows: list[tuple[str, str]] = []
    wait = parse_duration(a.wait)
    with StandInProcess(a.services) as standin:
        options = ConsulOptions(
            address=standin.address, wait=wait, max_connections=a.max_connections,
            startup_timeout=900.0, kv_prefix=f"isthmus/{CLUSTER}",
            rules=MappingRules(cluster=CLUSTER))
        catalog = ConsulCatalog(options, data_dir=None, vip_cidr="10.96.0.0/16")
        holder = TableHolder()
        builder = TableBuilder(catalog, holder, cluster=CLUSTER, trust_domain="bench.test",
                               locality=Locality("us-east", "us-east-1"))
        session = aiohttp.ClientSession()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            host, port = split_host_port(standin.address.removeprefix("http://"))
            client = consul.aio.Consul(host=host, port=port)
        try:
            t0 = time.perf_counter()
            await catalog.open()
            t_open = time.perf_counter() - t0
            await builder.start()
            t_table = time.perf_counter() - t0
            assert len(catalog.workloads()) == a.services, len(catalog.workloads())
            rows.append((f"start-up: {a.services:,} services read (one query each)",
                         f"{t_open:.1f} s"))
            rows.append(("start-up: ... and the routing table built", f"{t_table:.1f} s"))
            # at rest from here: every service has had its first read and its blocking query
            async with asyncio.timeout(max(300.0, 2 * wait)):
                while (await requests(session, standin.address))["GET health/service"] < \
                        2 * a.services:
                    await asyncio.sleep(0.5)

            before = await requests(session, standin.address)
            await asyncio.sleep(a.rest_seconds)
            rest = per_minute(before, await requests(session, standin.address), a.rest_seconds)
            rows.append((f"at rest, {a.rest_seconds:g} s: requests/min (all)",
                         f"{sum(rest.values()):,.0f}  {fmt_endpoints(rest)}"))

            exp = Expectations()
            holder.subscribe(exp.on_table)
            driver = Driver(client, a.services, random.Random(7))
            for _ in range(a.samples):  # one change at a time
                exp.done.clear()
                await driver.change(exp)
                async with asyncio.timeout(a.change_timeout):
                    await exp.done.wait()
            rows.append(("change -> routing table, one change at a time",
                         summary(exp.latencies)))

            if not a.churn_seconds:
                return
            exp.latencies.clear()
            before = await requests(session, standin.address)
            t0 = time.perf_counter()
            made = 0
            while time.perf_counter() - t0 < a.churn_seconds:
                await driver.change(exp)
                made += 1
                await asyncio.sleep(max(0.0, t0 + made / a.churn_rate - time.perf_counter()))
            elapsed = time.perf_counter() - t0
            churn = per_minute(before, await requests(session, standin.address), elapsed)
            async with asyncio.timeout(120):
                while exp.waiting:
                    await asyncio.sleep(0.1)
            rows.append((f"churn, {made / elapsed:.1f} changes/s for {elapsed:.0f} s: "
                         "requests/min (all)", f"{sum(churn.values()):,.0f}  "
                                               f"{fmt_endpoints(churn)}"))
            rows.append(("change -> routing table, under that churn", summary(exp.latencies)))
        finally:
            await builder.stop()
            await catalog.close()
            await client.close()
            await session.close()
            report(a, rows)


def report(a: argparse.Namespace, rows: list[tuple[str, str]]) -> None:
    print(f"\nconsul_bench against the Consul STAND-IN: {a.services:,} services, wait "
          f"{a.wait}, max_connections {a.max_connections}\n")
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


def fmt_endpoints(d: dict[str, float]) -> str:
    return "(" + ", ".join(f"{k}: {v:,.0f}" for k, v in d.items()) + ")"


class _Reasons(logging.Handler):
    """State changes of the catalog, with their reason, on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        reason = getattr(record, "reason", "")
        print(f"[{time.strftime('%H:%M:%S')}] {record.getMessage()} {reason}", file=sys.stderr)


def main() -> None:
    handler = _Reasons(logging.WARNING)
    logging.getLogger("discovery").addHandler(handler)
    logging.getLogger("discovery").propagate = False
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=5000)
    p.add_argument("--wait", default="5m", help="discovery.consul.wait")
    p.add_argument("--max-connections", type=int, default=192,
                   help="discovery.consul.max_connections")
    p.add_argument("--rest-seconds", type=float, default=120)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--churn-seconds", type=float, default=60)
    p.add_argument("--churn-rate", type=float, default=10, help="changes per second")
    p.add_argument("--change-timeout", type=float, default=60,
                   help="seconds a change may take to reach the routing table")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
