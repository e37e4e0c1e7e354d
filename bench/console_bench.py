"""The web console's costs (issue 16): time to first render, page weight, server CPU at rest.

Three real appliances (`isthmus run` processes, cluster a, b and c, peered over mTLS on
loopback), each registering N services (the same names, so every cluster exports all N);
Debian's chromium driven by Playwright opens a's console:

  1. time to first render of the topology: from navigation start until the graph shows all
     three clusters and every card lists its N services (a fresh browser profile per run:
     nothing cached; then a reload in the same profile: files revalidated by ETag);
  2. the page's weight: every file it loads, as served;
  3. the server CPU one open console costs at rest: a's CPU time (utime + stime from
     /proc/PID/stat) over a minute with no console open, and over a minute with one console
     open on the topology view and nothing changing (alternating windows), and the API
     requests the page made.

    python3 bench/console_bench.py --services 500 --idle 60 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from isthmus.console import load_console  # noqa: E402
from tests.console.conftest import CHROMIUM, FLAGS  # noqa: E402
from tests.federation.conftest import Cluster, make_pki  # noqa: E402

NAMES = ("a", "b", "c")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_for(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = await probe()
            if got:
                return got
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"timed out: {what}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of each CPU window")
    ap.add_argument("--rounds", type=int, default=3, help="CPU windows with and without")
    args = ap.parse_args()
    n = args.services
    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    make_pki(tmp, list(NAMES))
    clusters = {c: Cluster(c, tmp, f"127.68.0.{i + 1}", "us" if c != "c" else "eu")
                for i, c in enumerate(NAMES)}  # fmt: skip
    for c in clusters.values():
        c.peers = {o.name: o.ingress for o in clusters.values() if o is not c}
    isthmus = Path(sys.executable).parent / "isthmus"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for c in clusters.values():
            cfg = c.config()
            cfg["discovery"] = {"min_check_interval": "1s"}
            path = tmp / f"{c.name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            with open(tmp / f"{c.name}.log", "wb") as log:
                procs[c.name] = subprocess.Popen(
                    [str(isthmus), "run", "--config", str(path), "--log-level", "warning"],
                    stdout=subprocess.DEVNULL, stderr=log,
                )  # fmt: skip
        async with aiohttp.ClientSession() as http:
            tokens = {}
            for c in clusters.values():
                tok = await wait_for(
                    lambda c=c: asyncio.to_thread(
                        lambda: (c.dir / "api-token").exists()
                        and (c.dir / "api-token").read_text().strip()
                    ),
                    60, f"{c.name}'s token",
                )  # fmt: skip
                tokens[c.name] = tok

                async def up(c: Cluster = c) -> bool:
                    async with http.get(f"http://{c.api_listen}/v1/health") as r:
                        return r.status == 200

                await wait_for(up, 60, f"{c.name} up")

            async def register(c: Cluster, i: int) -> None:
                body = {"service": f"svc-{i:04d}", "address": "127.0.0.1",
                        "ports": {"http": 8000 + i % 1000}, "labels": {"team": f"t{i % 7}"}}
                async with http.put(
                    f"http://{c.api_listen}/v1/workloads/{c.name}-{i}", json=body,
                    headers={"Authorization": f"Bearer {tokens[c.name]}"},
                ) as r:
                    assert r.status in (200, 201), await r.text()  # fmt: skip

            for c in clusters.values():
                for start in range(0, n, 50):
                    batch = range(start, min(n, start + 50))
                    await asyncio.gather(*(register(c, i) for i in batch))
            a = clusters["a"]
            auth = {"Authorization": f"Bearer {tokens['a']}"}

            async def converged() -> bool:
                async with http.get(f"http://{a.api_listen}/v1/status", headers=auth) as r:
                    st = await r.json()
                return (
                    len(st["services"]) >= n
                    and all(len(s["clusters"]) == 3 for s in st["services"])
                    and all(p["state"] == "connected" for p in st["peers"])
                )

            await wait_for(converged, 120, "a sees every service in all three clusters")
            async with http.get(f"http://{a.api_listen}/v1/status", headers=auth) as r:
                status_bytes = len(await r.read())

        console = load_console()
        rows: list[tuple[str, str]] = []
        rows.append(("services per cluster / clusters", f"{n} / 3"))
        rows.append(("GET /v1/status body (a)", f"{status_bytes / 1024:.0f} KiB"))
        rows.append(("page weight, all files", f"{console.weight / 1024:.1f} KiB "
                     f"({len(console.assets)} files, uncompressed)"))  # fmt: skip
        from playwright.async_api import async_playwright

        url = f"http://{a.api_listen}/ui/"
        rendered = (
            "() => document.querySelector('[data-testid=node-c]') && "
            f"['a','b','c'].every(c => document.querySelectorAll("
            f"`[data-testid=card-${{c}}] li`).length >= {n})"
        )
        cold, warm = [], []
        async with async_playwright() as pw:
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as profile:
                    ctx = await pw.chromium.launch_persistent_context(
                        profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                        viewport={"width": 1280, "height": 900},
                    )  # fmt: skip
                    await ctx.add_init_script(
                        f"sessionStorage.setItem('isthmus.token', {tokens['a']!r})"
                    )
                    page = await ctx.new_page()
                    await page.goto(url)
                    await page.wait_for_function(rendered, timeout=60_000)
                    cold.append(await page.evaluate("performance.now()"))
                    await page.reload()
                    await page.wait_for_function(rendered, timeout=60_000)
                    warm.append(await page.evaluate("performance.now()"))
                    await ctx.close()
            rows.append(("first render of the topology, fresh profile (median / max)",
                         f"{statistics.median(cold):.0f} ms / {max(cold):.0f} ms"))
            rows.append(("first render after a reload (median / max)",
                         f"{statistics.median(warm):.0f} ms / {max(warm):.0f} ms"))

            # CPU at rest, with and without one open console, in alternating windows (the
            # machine is shared: alternating spreads its noise over both)
            pid = procs["a"].pid
            without: list[float] = []
            with_console: list[float] = []
            requests: list[str] = []
            with tempfile.TemporaryDirectory() as profile:
                ctx = await pw.chromium.launch_persistent_context(
                    profile, executable_path=CHROMIUM, headless=True, args=FLAGS
                )
                await ctx.add_init_script(
                    f"sessionStorage.setItem('isthmus.token', {tokens['a']!r})"
                )
                for _ in range(args.rounds):
                    await asyncio.sleep(3)
                    c0 = cpu_seconds(pid)
                    await asyncio.sleep(args.idle)
                    without.append(cpu_seconds(pid) - c0)
                    page = await ctx.new_page()
                    await page.goto(url)
                    await page.wait_for_function(rendered, timeout=60_000)
                    await asyncio.sleep(3)
                    page.on("request", lambda r: requests.append(r.url))
                    c0 = cpu_seconds(pid)
                    await asyncio.sleep(args.idle)
                    with_console.append(cpu_seconds(pid) - c0)
                    await page.close()
                await ctx.close()
        per_min = 60.0 / args.idle
        rows.append(("appliance a CPU at rest, no console (median of windows)",
                     f"{statistics.median(without) * per_min * 1000:.0f} ms/min "
                     f"({', '.join(f'{x * per_min * 1000:.0f}' for x in without)})"))
        rows.append(("appliance a CPU at rest, one console open (median)",
                     f"{statistics.median(with_console) * per_min * 1000:.0f} ms/min "
                     f"({', '.join(f'{x * per_min * 1000:.0f}' for x in with_console)})"))
        rows.append(("API requests the open console made at rest",
                     f"{len(requests)} in {args.rounds * args.idle:.0f} s"))  # fmt: skip
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    asyncio.run(main())
