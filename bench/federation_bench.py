"""Federation costs (issue 6): full sync and incremental updates of 10,000 exported services.

Two parts:
  1. sans-IO: the export feed's snapshot and delta for N services — build, encode, decode,
     apply — and the routing-table rebuild an importer does with N imported services;
  2. end to end: two real appliances peering over mTLS on loopback; cluster `a` exports N
     services; time until `b`'s routing table holds all of them (full sync), then the time
     from one health change in `a` until `b`'s table shows it (incremental).

    python3 bench/federation_bench.py --services 10000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.embedded import EmbeddedCatalog
from discovery.model import Health, Locality
from discovery.names import ServiceKey
from discovery.schema import parse_workload
from federation.feed import ExportedService, ExportFeed, MessageDecoder, apply_message, encode_frame
from federation.routing import TableHolder
from federation.table import Imports, TableBuilder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "federation"))


def timed(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def sans_io(n: int, rows: list[tuple[str, str]]) -> None:
    services = {f"s{i}.default": ExportedService(f"s{i}", "default", {"http": 8080}, 2, 3)
                for i in range(n)}
    feed = ExportFeed("a", {"region": "us"}, ["127.0.0.1:15443"])
    t = timed(lambda: ExportFeed("a", {}, []).set_services(services), 3)
    rows.append((f"publisher: index {n:,} services", f"{t * 1000:.1f} ms"))
    feed.set_services(services)
    frame = encode_frame(feed.snapshot())
    t = timed(lambda: encode_frame(feed.snapshot()))
    rows.append(("snapshot frame: size / encode", f"{len(frame) / 1e6:.2f} MB / {t * 1000:.1f} ms"))
    t = timed(lambda: apply_message(None, MessageDecoder().feed(frame)[0]))
    rows.append(("snapshot: decode + apply at the subscriber", f"{t * 1000:.1f} ms"))
    state = apply_message(None, MessageDecoder().feed(frame)[0])
    v = feed.version
    changed = dict(services)
    changed["s7.default"] = ExportedService("s7", "default", {"http": 8080}, 1, 3)
    t_set = timed(lambda: feed.set_services(changed), 1)
    delta = encode_frame(feed.since(feed.epoch, v))
    t = timed(lambda: apply_message(state, MessageDecoder().feed(delta)[0]))
    rows.append(("one service changes: diff at the publisher",
                 f"{t_set * 1000:.1f} ms"))
    rows.append(("one service changes: delta size / decode + apply",
                 f"{len(delta)} B / {t * 1000:.2f} ms"))

    with tempfile.TemporaryDirectory() as d:
        cat = EmbeddedCatalog(d, "b")
        await cat.open()
        holder = TableHolder()
        imports = Imports()
        imports.feeds["a"] = ("127.0.0.1:15443", state)
        builder = TableBuilder(cat, holder, cluster="b", trust_domain="td",
                               locality=Locality("us"), imports=imports,
                               known_clusters=lambda: frozenset({"a", "b"}))
        t0 = time.perf_counter()
        await builder.start()  # allocates and persists 2 VIPs per service the first time
        first = time.perf_counter() - t0
        rows.append((f"importer: first table with {n:,} remote services (VIPs allocated)",
                     f"{first * 1000:.0f} ms"))
        times = []
        for _ in range(5):
            builder.invalidate()
            t0 = time.perf_counter()
            await builder.rebuild()
            times.append(time.perf_counter() - t0)
        rows.append(("importer: table rebuild after a peer update",
                     f"{statistics.median(times) * 1000:.0f} ms"))
        await builder.stop()
        await cat.close()


async def end_to_end(n: int, rows: list[tuple[str, str]]) -> None:
    from conftest import Cluster, make_pki  # tests/federation/conftest.py

    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        make_pki(base, ["a", "b"])
        a = Cluster("a", base, "127.61.0.1", "us")
        b = Cluster("b", base, "127.61.0.2", "us")
        a.peers = {"b": b.ingress}
        b.peers = {"a": a.ingress}
        await a.start()
        assert a.app and a.app.catalog
        cat = a.app.catalog
        t0 = time.perf_counter()
        await asyncio.gather(*(cat.put(parse_workload(
            {"service": f"s{i}", "address": "10.0.0.1", "ports": {"http": 8080}},
            f"w{i}", "a")) for i in range(n)))
        rows.append((f"registering {n:,} workloads in a (catalog, group commit)",
                     f"{time.perf_counter() - t0:.2f} s"))
        while len(a.app.holder.current.services) < n:
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await b.start()
        assert b.app
        while len(b.app.holder.current.services) < n:
            await asyncio.sleep(0.01)
        rows.append((f"full sync: b starts until its table holds a's {n:,} services",
                     f"{time.perf_counter() - t0:.2f} s"))
        lat = []
        for i in range(5):
            wid = f"w{i * 13}"
            key = ServiceKey(f"s{i * 13}")
            t0 = time.perf_counter()
            await cat.set_health(wid, Health.CRITICAL, "bench")
            while b.app.holder.current.get(key).destination("a").healthy != 0:
                await asyncio.sleep(0.001)
            lat.append(time.perf_counter() - t0)
        rows.append(("incremental: health change in a until b's table shows it (median of 5)",
                     f"{statistics.median(lat) * 1000:.0f} ms"))
        await b.close()
        await a.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10_000)
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    await sans_io(args.services, rows)
    await end_to_end(args.services, rows)
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
