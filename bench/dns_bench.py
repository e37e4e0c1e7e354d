"""Isthmus's resolver vs Unbound, side by side, one process/thread each, measured by dnsperf.

    python bench/dns_bench.py [--seconds 10] [--repeat 3] [--services 200] [--json out.json]

Scenarios:
  global     the same names answered by Isthmus's `global` plugin and by Unbound `local-data`
  forwarded  names forwarded to a backend (a third resolver, Unbound with local-data) and
             answered from each resolver's cache after a warm-up pass

For each: peak qps (dnsperf, 1 thread, 1 client socket, 100 outstanding), measured --repeat
times alternating Isthmus and Unbound so both see the same background load (the ratio reported
is the median of the per-round ratios), then a run rate-limited to 80 % of the median peak (-Q)
whose per-query latencies (dnsperf -v) give p50/p99. Isthmus runs in a process started the way
the appliance starts workers (dns.workers.worker_main, spawn, uvloop).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import multiprocessing
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from discovery.names import ServiceKey
from dns.workers import WorkerSpec, worker_main
from federation.routing import RoutingTable, ServiceRoute

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
DNSPERF = shutil.which("dnsperf") or "dnsperf"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_dns(host: str, port: int, timeout: float = 20.0) -> None:
    query = bytes.fromhex("123400000001000000000000000002" + "0001")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(query, (host, port))
                s.recv(512)
                return
            except OSError:
                time.sleep(0.05)
    raise TimeoutError(f"nothing answers on {host}:{port}")


def unbound_conf(
    work: Path, name: str, host: str, port: int, local: list[str], forward: str | None
) -> Path:
    lines = [
        "server:",
        f'  directory: "{work}"',
        '  username: ""',
        '  chroot: ""',
        '  pidfile: ""',
        "  use-syslog: no",
        "  do-daemonize: no",
        "  verbosity: 0",
        "  num-threads: 1",
        f"  interface: {host}",
        f"  port: {port}",
        "  do-ip6: no",
        "  access-control: 127.0.0.0/8 allow",
        '  module-config: "iterator"',
        "  so-reuseport: no",
        "  do-not-query-localhost: no",
        "  msg-cache-size: 64m",
        "  rrset-cache-size: 128m",
    ]
    if local:
        lines += ['  local-zone: "global." static', '  local-zone: "example.org." static']
        lines += [f'  local-data: "{d}"' for d in local]
    if forward:
        lines += ["forward-zone:", '  name: "."', f"  forward-addr: {forward}"]
    lines += ["remote-control:", "  control-enable: no"]
    path = work / f"{name}.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def dnsperf(
    host: str,
    port: int,
    datafile: Path,
    seconds: float,
    qps: float | None = None,
    verbose: bool = False,
) -> tuple[float, list[float], str]:
    cmd = [
        DNSPERF,
        "-s",
        host,
        "-p",
        str(port),
        "-d",
        str(datafile),
        "-l",
        str(seconds),
        "-T",
        "1",
        "-c",
        "1",
        "-q",
        "100",
        "-t",
        "2",
    ]
    if qps:
        cmd += ["-Q", str(int(qps))]
    if verbose:
        cmd += ["-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    lat = [float(x) for x in re.findall(r"^> \S+ .* ([\d.]+)$", out, re.M)] if verbose else []
    return (float(m.group(1)) if m else 0.0), lat, " ".join(cmd)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def latency(
    label: str, host: str, port: int, datafile: Path, seconds: float, peaks: list[float], cmd: str
) -> dict:
    peak = statistics.median(peaks)
    _, lat, cmd80 = dnsperf(host, port, datafile, seconds, qps=peak * 0.8, verbose=True)
    result = {
        "label": label,
        "peak_qps": round(peak),
        "peak_qps_runs": [round(p) for p in peaks],
        "p50_ms_at_80": round(pct(lat, 0.5) * 1e3, 3),
        "p99_ms_at_80": round(pct(lat, 0.99) * 1e3, 3),
        "samples": len(lat),
        "command": cmd,
        "command_80": cmd80,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="peak runs per resolver and scenario")
    ap.add_argument("--services", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dns-bench-"))
    routes = [
        ServiceRoute(
            ServiceKey(f"svc{i}", "default"),
            ipaddress.ip_address(f"240.240.{i // 250}.{i % 250 + 1}"),
            {"http": 8080},
            (),
        )
        for i in range(args.services)
    ]
    table = RoutingTable.build(1, "east", "bench", routes)
    names = [f"svc{i}.default.global" for i in range(args.services)]
    (work / "global.txt").write_text("".join(f"{n} A\n" for n in names))
    fwd_names = [f"host{i}.example.org" for i in range(args.services)]
    (work / "fwd.txt").write_text("".join(f"{n} A\n" for n in fwd_names))

    h_isthmus, h_unbound, h_backend = "127.0.50.1", "127.0.50.2", "127.0.50.3"
    p_backend = free_port(h_backend)
    procs: list = []
    results = []
    try:
        backend = unbound_conf(
            work,
            "backend",
            h_backend,
            p_backend,
            [f"{n}. 300 IN A 10.50.{i // 250}.{i % 250 + 1}" for i, n in enumerate(fwd_names)],
            None,
        )
        procs.append(subprocess.Popen([UNBOUND, "-d", "-c", str(backend)]))
        wait_dns(h_backend, p_backend)

        p_isthmus = free_port(h_isthmus)
        corefile = (
            f"global {{\n  global\n}}\n. {{\n  cache 3600\n"
            f"  forward . {h_backend}:{p_backend}\n}}\n"
        )
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        spec = WorkerSpec(corefile, f"{h_isthmus}:{p_isthmus}", {}, None, table, 30, True)
        proc = ctx.Process(target=worker_main, args=(spec, child), daemon=True)
        proc.start()
        procs.append(proc)
        if not parent.poll(30) or parent.recv()[0] != "ready":
            raise RuntimeError("isthmus did not start")

        p_unbound = free_port(h_unbound)
        ub = unbound_conf(
            work,
            "unbound",
            h_unbound,
            p_unbound,
            [f"{n}. 30 IN A {r.vip}" for n, r in zip(names, routes, strict=True)],
            f"{h_backend}@{p_backend}",
        )
        procs.append(subprocess.Popen([UNBOUND, "-d", "-c", str(ub)]))
        wait_dns(h_unbound, p_unbound)

        # Warm both caches with every forwarded name.
        for host, port in ((h_isthmus, p_isthmus), (h_unbound, p_unbound)):
            dnsperf(host, port, work / "fwd.txt", 2)

        for scenario, data in (("global", "global.txt"), ("forwarded", "fwd.txt")):
            datafile = work / data
            peaks: dict[str, list[float]] = {"isthmus": [], "unbound": []}
            cmds = {}
            for _ in range(max(args.repeat, 1)):
                for name, host, port in (
                    ("isthmus", h_isthmus, p_isthmus),
                    ("unbound", h_unbound, p_unbound),
                ):
                    qps, _, cmds[name] = dnsperf(host, port, datafile, args.seconds)
                    peaks[name].append(qps)
            pairs = zip(peaks["isthmus"], peaks["unbound"], strict=True)
            ratios = [i / max(u, 1) for i, u in pairs]
            a = latency(
                f"isthmus {scenario}",
                h_isthmus,
                p_isthmus,
                datafile,
                args.seconds,
                peaks["isthmus"],
                cmds["isthmus"],
            )
            b = latency(
                f"unbound {scenario}",
                h_unbound,
                p_unbound,
                datafile,
                args.seconds,
                peaks["unbound"],
                cmds["unbound"],
            )
            results.append(
                {
                    "scenario": scenario,
                    "isthmus": a,
                    "unbound": b,
                    "ratio": round(statistics.median(ratios), 3),
                    "ratio_runs": [round(r, 3) for r in ratios],
                }
            )
    finally:
        with contextlib.suppress(Exception):
            parent.send(None)
        for p in procs:
            if isinstance(p, subprocess.Popen):
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            else:
                p.join(10)
                if p.is_alive():
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(
        "\nscenario   isthmus_qps  unbound_qps  ratio  isthmus_p99@80%  unbound_p99@80%"
        "  ratio per round"
    )
    for r in results:
        print(
            f"{r['scenario']:<10} {r['isthmus']['peak_qps']:>11} {r['unbound']['peak_qps']:>12} "
            f"{r['ratio']:>6}  {r['isthmus']['p99_ms_at_80']:>13}ms  "
            f"{r['unbound']['p99_ms_at_80']:>13}ms  {r['ratio_runs']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
