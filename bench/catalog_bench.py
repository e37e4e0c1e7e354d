"""Catalog benchmarks (issue 2): registration rate, 100,000-workload catalog, health-check CPU.

Runs the real appliance (`isthmus run`) as a subprocess on loopback and measures it from the
outside:
  1. registrations per second through the API (concurrent clients, keep-alive);
  2. a catalog of N workloads over N/10 services: RSS, restart time, latency of
     GET /v1/services;
  3. CPU of health checking every workload (TCP checks, 10 s interval) on one core.

    python3 bench/catalog_bench.py --workloads 100000 --check-seconds 30

Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import yaml

HOST = "127.88.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Appliance:
    def __init__(self, tmp: Path, max_checks: int) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.raw = {
            "cluster": "bench",
            "trust_domain": "bench.example",
            "roles": ["control"],
            "data_dir": str(tmp / "data"),
            "api": {"listen": f"{HOST}:{self.port}", "token_file": str(tmp / "token")},
            "metrics": {"listen": f"{HOST}:{self.metrics_port}"},
            "log": {"level": "warning"},
            "trust": {"bundle": str(tmp / "no-pki" / "bundle.pem")},  # catalog only: no mTLS
            # capacity, not the default probe rate (1,000/s), is what this bench measures
            "discovery": {"max_concurrent_checks": max_checks,
                          "max_checks_per_second": 1_000_000},
        }
        tmp.mkdir(parents=True, exist_ok=True)
        self.cfg = tmp / "c.yaml"
        self.cfg.write_text(yaml.safe_dump(self.raw))
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.perf_counter()
        with open(self.tmp / "log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "isthmus.cli", "run", "--config", str(self.cfg)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        while True:
            assert self.proc.poll() is None, (self.tmp / "log").read_text()
            try:
                with socket.create_connection((HOST, self.port), 0.1):
                    return time.perf_counter() - t0
            except OSError:
                time.sleep(0.01)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def token(self) -> str:
        return (self.tmp / "token").read_text().strip()


async def register(app: Appliance, n: int, concurrency: int, check: dict | None) -> float:
    headers = {"Authorization": f"Bearer {app.token}"}
    ids = iter(range(n))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in ids:
            body = {
                "service": f"svc{i % max(1, n // 10)}",
                "address": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                "ports": {"http": 8080},
                "labels": {"version": "v1"},
                "locality": {"region": "r1", "zone": "z1"},
            }
            if check:
                body["check"] = check
            async with session.put(f"{app.url}/v1/workloads/w{i}", json=body, headers=headers) as r:
                assert r.status in (200, 201), await r.text()

    t0 = time.perf_counter()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def fill_catalog(app: Appliance, n: int, ports: list[int], interval: str) -> None:
    from discovery.embedded import EmbeddedCatalog
    from discovery.schema import parse_workload

    cat = EmbeddedCatalog(app.tmp / "data", "bench", "127.240.0.0/16")
    await cat.open()
    batch = []
    for i in range(n):
        port = ports[i % len(ports)]
        body = {
            "service": f"svc{i % max(1, n // 10)}",
            "address": "127.88.0.2",
            "ports": {"tcp": port},
            "check": {"tcp": f"127.88.0.2:{port}", "interval": interval, "timeout": "2s"},
        }
        batch.append(cat.put(parse_workload(body, f"w{i}", "bench")))
        if len(batch) == 1000:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    await cat.close()


async def until_checked(app: Appliance, n: int, timeout: float) -> None:
    headers = {"Authorization": f"Bearer {app.token}"}
    async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{app.url}/v1/status", headers=headers) as r:
                health = (await r.json())["catalog"]["health"]
            if health["unknown"] == 0 and health["passing"] + health["critical"] >= n:
                return
            await asyncio.sleep(1)


async def checks_done(app: Appliance) -> float:
    """Sum of isthmus_health_checks_total, from the appliance's metrics endpoint."""
    url = f"http://{HOST}:{app.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("isthmus_health_checks_total{")
    )


async def services_latency(app: Appliance, rounds: int) -> tuple[float, float]:
    headers = {"Authorization": f"Bearer {app.token}"}
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(rounds):
            t0 = time.perf_counter()
            async with session.get(f"{app.url}/v1/services", headers=headers) as r:
                await r.read()
            times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times) * 1000, times[int(len(times) * 0.99) - 1] * 1000


def accept_forever(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.5)
    while not stop.is_set():
        try:
            c, _ = sock.accept()
            c.close()
        except TimeoutError:
            continue
        except OSError:
            return


class Rows(list):
    """Prints each figure as soon as it is measured (a long run still reports what it got)."""

    def __init__(self) -> None:
        super().__init__()
        print("| measure | value |\n|---|---|", flush=True)

    def append(self, row: tuple[str, str]) -> None:
        super().append(row)
        print(f"| {row[0]} | {row[1]} |", flush=True)


async def api_phase(tmp: Path, args: argparse.Namespace, rows: list) -> None:
    """Registration rate, memory, listing latency and start-up of a big catalog."""
    app = Appliance(tmp / "a", 2048)
    app.start()
    try:
        rate = await register(app, args.workloads, args.concurrency, None)
        rows.append(
            (
                "registrations/s through the API "
                f"({args.concurrency} clients, {args.workloads:,} workloads)",
                f"{rate:,.0f}",
            )
        )
        assert app.proc
        rows.append(
            (
                f"RSS with {args.workloads:,} workloads / {args.workloads // 10:,} services",
                f"{rss_mb(app.proc.pid):.0f} MB",
            )
        )
        p50, p99 = await services_latency(app, 30)
        rows.append(("GET /v1/services latency p50 / p99", f"{p50:.1f} / {p99:.1f} ms"))
    finally:
        app.stop()
    startup = app.start()
    try:
        assert app.proc
        rows.append(
            (
                f"start-up with {args.workloads:,} workloads (to API listening)",
                f"{startup:.2f} s",
            )
        )
        rows.append(("RSS after restart", f"{rss_mb(app.proc.pid):.0f} MB"))
    finally:
        app.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--check-seconds", type=float, default=30.0)
    ap.add_argument("--check-interval", default="10s")
    ap.add_argument("--only-checks", action="store_true", help="skip the API and start-up part")
    args = ap.parse_args()
    rows = Rows()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # 1 + 2: registration rate and the big catalog (no checks: passing)
        if not args.only_checks:
            await api_phase(tmp, args, rows)

        # 3: health-check CPU. Targets: listeners that accept and close, in threads of this
        # process (a tight accept loop in C costs little beside the appliance).
        sockets, stop = [], threading.Event()
        for _ in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.88.0.2", 0))
            s.listen(4096)
            sockets.append(s)
            threading.Thread(target=accept_forever, args=(s, stop), daemon=True).start()
        app2 = Appliance(tmp / "b", 2048)
        try:
            # The checked catalog is written straight into the appliance's data directory (the
            # same store code, in process): registering 100,000 workloads through the API while
            # their checks already saturate a core is slow, and that is not what is measured.
            port_of = [s.getsockname()[1] for s in sockets]
            await fill_catalog(app2, args.workloads, port_of, args.check_interval)
            app2.start()  # first checks spread over the interval from a cold start
            assert app2.proc
            # steady state: every first check done (each is a health transition to store)
            await until_checked(app2, args.workloads, timeout=300)
            n0 = await checks_done(app2)
            c0, t0 = cpu_seconds(app2.proc.pid), time.perf_counter()
            await asyncio.sleep(args.check_seconds)
            c1, t1 = cpu_seconds(app2.proc.pid), time.perf_counter()
            cpu = (c1 - c0) / (t1 - t0)
            rate = (await checks_done(app2) - n0) / (t1 - t0)
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"{app2.url}/v1/status", headers={"Authorization": f"Bearer {app2.token}"}
                ) as r,
            ):
                st = await r.json()
            rows.append(
                (
                    f"CPU checking {args.workloads:,} workloads (TCP, {args.check_interval})",
                    f"{cpu * 100:.0f} % of one core",
                )
            )
            rows.append(
                (f"checks run per second (due: {args.workloads / 10:,.0f} at 10 s)", f"{rate:,.0f}")
            )
            rows.append(
                (
                    "health after the run (passing/critical/unknown)",
                    "/".join(
                        str(st["catalog"]["health"][k]) for k in ("passing", "critical", "unknown")
                    ),
                )
            )
            rows.append(("RSS with checks running", f"{rss_mb(app2.proc.pid):.0f} MB"))
        finally:
            stop.set()
            app2.stop()
            for s in sockets:
                s.close()


if __name__ == "__main__":
    asyncio.run(main())
