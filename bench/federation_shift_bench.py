"""Traffic shifting and failover across three clusters (issue 6), with real egress, ingress
and backends on loopback.

  1. a `PUT .../traffic` on cluster a moves every cluster's traffic: time until a batch of
     requests through each cluster's egress all follow the new weights;
  2. every backend of cluster c dies under load from a: time until no request reaches c,
     and how many requests failed (goal: none).

    python3 bench/federation_shift_bench.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "federation"))

from conftest import Backend, Cluster, make_pki  # noqa: E402

from discovery.names import ServiceKey  # noqa: E402

NAMES = ("a", "b", "c")


async def batch(s: aiohttp.ClientSession, url: str, n: int) -> list[str]:
    async def one() -> str:
        try:
            async with s.get(url) as r:
                return await r.text() if r.status == 200 else f"HTTP {r.status}"
        except aiohttp.ClientError as e:
            return f"error {e}"

    return await asyncio.gather(*(one() for _ in range(n)))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        make_pki(base, list(NAMES))
        clusters = {
            n: Cluster(
                n,
                base,
                f"127.66.0.{i + 1}",
                "us",
                vip_cidr=f"127.{247 + i}.0.0/24",
                roles=("control", "ingress", "egress"),
            )
            for i, n in enumerate(NAMES)
        }
        for c in clusters.values():
            c.peers = {o.name: o.ingress for o in clusters.values() if o is not c}
        backends = {n: Backend(n, f"127.67.0.{i + 1}") for i, n in enumerate(NAMES)}
        for b in backends.values():
            await b.up()
        await asyncio.gather(*(c.start() for c in clusters.values()))
        try:
            for n, c in clusters.items():
                b = backends[n]
                await c.call(
                    "PUT",
                    f"/v1/workloads/r-{n}",
                    {
                        "service": "reviews",
                        "address": b.host,
                        "ports": {"http": b.port},
                        "check": {
                            "http": f"http://{b.host}:{b.port}/",
                            "interval": "500ms",
                            "timeout": "500ms",
                        },
                    },
                )
            while True:
                routes = [
                    c.app.holder.current.get(ServiceKey("reviews")) for c in clusters.values()
                ]
                if all(r and sum(d.healthy for d in r.destinations) == 3 for r in routes):
                    break
                await asyncio.sleep(0.1)
            urls = {
                n: f"http://{r.vip}:{next(iter(r.ports.values()))}/"
                for n, r in zip(NAMES, routes, strict=True)
            }
            a = clusters["a"]
            path = "/v1/services/default/reviews/traffic"
            results: dict[str, list[float]] = {n: [] for n in NAMES}
            async with aiohttp.ClientSession() as s:
                for rnd in range(args.rounds):
                    target = NAMES[rnd % 3]
                    weights = {n: (100 if n == target else 0) for n in NAMES}
                    t0 = time.perf_counter()
                    await a.call("PUT", path, {"weights": weights})
                    pending = set(NAMES)
                    while pending:
                        for n in list(pending):
                            got = await batch(s, urls[n], 20)
                            if all(g == target for g in got):
                                results[n].append(time.perf_counter() - t0)
                                pending.discard(n)
                        await asyncio.sleep(0.005)
                print(
                    "| cluster | PUT on a until 100 % of a batch of 20 requests follow "
                    f"(median of {args.rounds}) | max |\n|---|---|---|"
                )
                for n in NAMES:
                    print(
                        f"| {n} | {statistics.median(results[n]) * 1000:.0f} ms | "
                        f"{max(results[n]) * 1000:.0f} ms |"
                    )

                await a.call("PUT", path, {"weights": {"a": 0, "b": 50, "c": 50}})
                await asyncio.sleep(1.0)
                served: list[tuple[float, str]] = []
                stop = asyncio.Event()

                async def load() -> None:
                    while not stop.is_set():
                        for g in await batch(s, urls["a"], 4):
                            served.append((time.perf_counter(), g))

                workers = [asyncio.create_task(load()) for _ in range(4)]
                await asyncio.sleep(1.0)
                killed = time.perf_counter()
                await backends["c"].down()
                while a.app.holder.current.get(ServiceKey("reviews")).destination("c").healthy:
                    await asyncio.sleep(0.005)
                detected = time.perf_counter() - killed
                await asyncio.sleep(3.0)
                stop.set()
                await asyncio.gather(*workers)
                last_c = max((t for t, g in served if g == "c"), default=killed)
                failed = [g for _, g in served if g not in NAMES]
                after = sum(1 for t, _ in served if t > killed)
                print("\n| backends of c die under load from a | value |\n|---|---|")
                print(
                    f"| until the last request served by c (data plane: retries and "
                    f"outlier ejection) | {max(0.0, last_c - killed) * 1000:.0f} ms |"
                )
                print(
                    f"| until a's routing table shows c without healthy capacity (control "
                    f"plane: c's 500 ms health check, then the feed) | {detected * 1000:.0f} ms |"
                )
                print(f"| requests after the kill / failed | {after} / {len(failed)} |")
        finally:
            await asyncio.gather(*(c.close() for c in clusters.values()))
            for b in backends.values():
                await b.down()


if __name__ == "__main__":
    asyncio.run(main())
