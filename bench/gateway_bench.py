"""Gateway data plane, side by side: Isthmus vs HAProxy vs the direct path, in one run.

    python bench/gateway_bench.py [--workers 1] [--duration 10] [--connections 32]
                                  [--bulk-mib 1024] [--skip-bulk] [--skip-connect]

Topology on loopback (each its own 127.x addresses), same certificates for both gateways
(issued by the project's CA code), same backend (nginx from Debian, answering a fixed 64-byte
body with keep-alive), same load generator (wrk, same threads and connections):

- direct:   wrk -> nginx
- isthmus:  wrk -> egress VIP (L7 engine, gateway/l7/) -> mTLS, SNI -> ingress (L4,
            SNI routing) -> nginx
- haproxy:  wrk -> egress HAProxy (mode http, server ssl crt+sni; see start_haproxy on verify)
                -> ingress HAProxy (mode tcp, bind ssl verify required client certs) -> nginx
Isthmus runs `workers` egress and `workers` ingress processes; HAProxy `nbthread workers` each.

Also: bulk TCP (1 GiB through the tunnel: client -> egress L4 -> mTLS -> ingress -> sink),
new connections per second to a remote service (Isthmus with and without the warm pool), and
CPU seconds of the gateway processes per 1,000 req/s. Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.names import ServiceKey
from federation.routing import Destination, Endpoint, RoutingTable, ServiceRoute
from federation.trust.bundle import TrustBundle
from federation.trust.ca import create_cluster_ca, create_root, issue_identity
from federation.trust.pemfiles import certs_pem, key_pem, write_bundle
from gateway.egress import EgressConfig
from gateway.ingress import IngressConfig
from gateway.l4.pool import PoolConfig
from gateway.l4.relay import RelayConfig
from gateway.probe import ProbeConfig
from gateway.proto.sni import service_sni
from gateway.worker import TlsPaths, WorkerPool, WorkerSpec

TD = "mesh.bench"
SERVICE = ServiceKey("reviews")
NGINX = ("127.0.60.10", 18080)
SINK = ("127.0.60.10", 18081)  # bulk: counts bytes, answers "done"
ECHO = ("127.0.60.10", 18082)  # new connections: answers one byte per connection
ISTHMUS_INGRESS = ("127.0.61.1", 15443)
ISTHMUS_VIP = "127.244.0.1"
HAP_INGRESS = ("127.0.62.1", 16443)
HAP_EGRESS = "127.0.62.2"
# "tcp-web" is nginx again under a non-HTTP port name: the same requests relayed at L4 (no
# parsing, no retries), to show what the L7 work costs on top of the tunnel.
PORTS = {"http": 9080, "tcp-bulk": 9081, "tcp-echo": 9082, "tcp-web": 9083}
BACKEND_PORTS = {"http": NGINX[1], "tcp-bulk": SINK[1], "tcp-echo": ECHO[1], "tcp-web": NGINX[1]}


# --- helper processes -----------------------------------------------------------------------

SINK_CODE = """
import socket, sys, threading
host, port, role = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(1024)
def sink(c):
    buf = bytearray(1 << 20); want = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "big"); got = 0
    while got < want:
        n = c.recv_into(buf)
        if not n: break
        got += n
    c.sendall(b"done"); c.close()
def echo(c):
    if c.recv(1): c.sendall(b"!")
    c.close()
h = sink if role == "sink" else echo
while True:
    c, _ = srv.accept(); threading.Thread(target=h, args=(c,), daemon=True).start()
"""

NGINX_CONF = """
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen {host}:{port} reuseport backlog=4096;
        location / {{ return 200 "{body}\\n"; }}
    }}
}}
"""

HAPROXY_EGRESS = """
global
    nbthread {threads}
    maxconn 8000
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend egress_http
    mode http
    bind {vip}:{http_port}
    default_backend west_http
backend west_http
    mode http
    http-reuse always
    retries 2
    option redispatch
    server west {ingress} {tls} sni str({sni_http}) alpn http/1.1
frontend egress_bulk
    mode tcp
    bind {vip}:{bulk_port}
    default_backend west_bulk
backend west_bulk
    mode tcp
    server west {ingress} {tls} sni str({sni_bulk})
frontend egress_echo
    mode tcp
    bind {vip}:{echo_port}
    default_backend west_echo
backend west_echo
    mode tcp
    server west {ingress} {tls} sni str({sni_echo})
"""

HAPROXY_INGRESS = """
global
    nbthread {threads}
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend ingress
    bind {ingress} ssl crt {server_pem} ca-file {bundle} verify required
    tcp-request content accept
    use_backend http if {{ ssl_fc_sni -i {sni_http} }}
    use_backend bulk if {{ ssl_fc_sni -i {sni_bulk} }}
    use_backend echo if {{ ssl_fc_sni -i {sni_echo} }}
backend http
    server nginx {nginx}
backend bulk
    server sink {sink}
backend echo
    server echo {echo}
"""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        out = [self.popen.pid]
        with contextlib.suppress(FileNotFoundError, subprocess.CalledProcessError):
            kids = subprocess.run(["pgrep", "-P", str(self.popen.pid)], capture_output=True,
                                  text=True, check=False).stdout.split()  # fmt: skip
            out += [int(k) for k in kids]
        return out


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} did not open")


# --- measurements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p99_ms: float
    errors: int
    cpu: float  # gateway CPU seconds during the run

    @property
    def cpu_per_krps(self) -> float:
        return self.cpu / (self.rps / 1000.0) if self.rps else float("nan")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, args: argparse.Namespace, gateway_pids: list[int]) -> WrkResult:
    cmd = ["wrk", "-t", str(args.threads), "-c", str(args.connections),
           "-d", f"{args.duration}s", "--latency", url]  # fmt: skip
    # Warm up keep-alive pools and TLS sessions, then measure.
    subprocess.run([*cmd[:5], "-d", "2s", url], capture_output=True, check=True)
    before = cpu_seconds(gateway_pids)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu = (cpu_seconds(gateway_pids) - before) / args.duration
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    assert p99 is not None, out
    return WrkResult(rps, _ms(p99.group(1), p99.group(2)), errors, cpu)


def bulk(host: str, port: int, mib: int) -> float:
    """Push `mib` MiB through host:port to the sink; returns MB/s (decimal)."""
    size = mib << 20
    chunk = b"\0" * (1 << 20)
    with socket.create_connection((host, port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        started = time.monotonic()
        s.sendall(size.to_bytes(8, "big"))
        for _ in range(mib):
            s.sendall(chunk)
        assert s.recv(4) == b"done"
        elapsed = time.monotonic() - started
    return size / elapsed / 1e6


CONNECT_CLIENT = """
import asyncio, sys, time
host, port, seconds, conc = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
async def one(stop, counts):
    while time.monotonic() < stop:
        try:
            r, w = await asyncio.open_connection(host, port)
            w.write(b"?"); ok = await r.read(1) == b"!"; w.close()
            counts[0 if ok else 1] += 1
        except OSError:
            counts[1] += 1
async def main():
    counts = [0, 0]; start = time.monotonic(); stop = start + seconds
    await asyncio.gather(*(one(stop, counts) for _ in range(conc)))
    print(counts[0] / (time.monotonic() - start), counts[1])
try:
    import uvloop; uvloop.install()
except ImportError:
    pass
asyncio.run(main())
"""


def new_connections(host: str, port: int, seconds: float, concurrency: int) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, "-c", CONNECT_CLIENT, host, str(port), str(seconds), str(concurrency)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return float(out[0]), int(out[1])


# --- setup ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    bundle: Path
    east_cert: Path
    east_key: Path
    west_cert: Path
    west_key: Path
    east_haproxy: Path  # chain + key in one file
    west_haproxy: Path


def make_pki(d: Path) -> Pem:
    root = create_root(TD)
    east = issue_identity(create_cluster_ca(root, "east"), "gateway", "east-gw")
    west = issue_identity(create_cluster_ca(root, "west"), "gateway", "west-gw")
    write_bundle(d / "bundle.pem", TrustBundle.of([root.cert]))
    files = {}
    for name, ident in (("east", east), ("west", west)):
        (d / f"{name}.pem").write_bytes(certs_pem(ident.chain))
        (d / f"{name}.key").write_bytes(key_pem(ident.key))
        (d / f"{name}.key").chmod(0o600)
        (d / f"{name}-haproxy.pem").write_bytes(certs_pem(ident.chain) + key_pem(ident.key))
        files[name] = ident
    return Pem(d / "bundle.pem", d / "east.pem", d / "east.key", d / "west.pem", d / "west.key",
               d / "east-haproxy.pem", d / "west-haproxy.pem")  # fmt: skip


def tables() -> tuple[RoutingTable, RoutingTable]:
    gateway = f"{ISTHMUS_INGRESS[0]}:{ISTHMUS_INGRESS[1]}"
    east_route = ServiceRoute(
        SERVICE, ipaddress.ip_address(ISTHMUS_VIP), PORTS,
        (Destination("west", False, healthy=1, total=1, gateways=(gateway,)),),
    )  # fmt: skip
    ep = Endpoint("nginx", NGINX[0], BACKEND_PORTS)
    west_route = ServiceRoute(
        SERVICE, ipaddress.ip_address("127.245.0.1"), PORTS,
        (Destination("west", True, healthy=1, total=1, endpoints=(ep,)),), exported=True,
    )  # fmt: skip
    clusters = frozenset({"east", "west"})
    return (
        RoutingTable.build(1, "east", TD, [east_route], clusters),
        RoutingTable.build(1, "west", TD, [west_route], clusters),
    )


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.popen.terminate()
        for p in procs:
            try:
                p.popen.wait(5)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


def spawn(procs: list[Proc], name: str, cmd: list[str]) -> Proc:
    proc = Proc(name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    procs.append(proc)
    return proc


async def start_isthmus(pem: Pem, args: argparse.Namespace) -> tuple[WorkerPool, WorkerPool]:
    east_table, west_table = tables()
    ingress = WorkerPool(
        WorkerSpec(
            TlsPaths(str(pem.west_cert), str(pem.west_key), str(pem.bundle)), "west",
            ingress=IngressConfig(host=ISTHMUS_INGRESS[0], port=ISTHMUS_INGRESS[1],
                                  relay=RelayConfig(idle_timeout=120)),
        ),
        args.workers,
    )  # fmt: skip
    await ingress.start(west_table)
    egress_cfg = EgressConfig(
        vip_cidr="127.244.0.0/16",
        probe=ProbeConfig(interval=5.0),
        relay=RelayConfig(idle_timeout=120),
    )
    egress = WorkerPool(
        WorkerSpec(TlsPaths(str(pem.east_cert), str(pem.east_key), str(pem.bundle)), "east",
                   egress=egress_cfg),
        args.workers,
    )  # fmt: skip
    await egress.start(east_table)
    wait_port(ISTHMUS_VIP, PORTS["http"])
    return egress, ingress


def start_haproxy(procs: list[Proc], pem: Pem, d: Path, args: argparse.Namespace) -> list[Proc]:
    snis = {
        "sni_http": service_sni("http", SERVICE, "west", TD),
        "sni_bulk": service_sni("tcp-bulk", SERVICE, "west", TD),
        "sni_echo": service_sni("tcp-echo", SERVICE, "west", TD),
    }
    ingress_cfg = d / "haproxy-ingress.cfg"
    ingress_cfg.write_text(HAPROXY_INGRESS.format(
        threads=args.workers, ingress=f"{HAP_INGRESS[0]}:{HAP_INGRESS[1]}",
        server_pem=pem.west_haproxy, bundle=pem.bundle, nginx=f"{NGINX[0]}:{NGINX[1]}",
        sink=f"{SINK[0]}:{SINK[1]}", echo=f"{ECHO[0]}:{ECHO[1]}", **snis,
    ))  # fmt: skip
    egress_cfg = d / "haproxy-egress.cfg"
    # The egress HAProxy does not verify the ingress certificate: with `sni` set, HAProxy 2.6
    # checks the server certificate's DNS names against the SNI and cannot be told otherwise,
    # and our certificates carry only a SPIFFE URI SAN. Isthmus verifies the chain and the
    # SPIFFE ID both ways, so this leaves HAProxy with less work, not more.
    egress_cfg.write_text(HAPROXY_EGRESS.format(
        threads=args.workers, vip=HAP_EGRESS, http_port=PORTS["http"], bulk_port=PORTS["tcp-bulk"],
        echo_port=PORTS["tcp-echo"],
        ingress=f"{HAP_INGRESS[0]}:{HAP_INGRESS[1]}",
        tls=f"ssl crt {pem.east_haproxy} ca-file {pem.bundle} verify none", **snis,
    ))  # fmt: skip
    out = []
    for name, cfg in (("haproxy-ingress", ingress_cfg), ("haproxy-egress", egress_cfg)):
        subprocess.run(["haproxy", "-c", "-f", str(cfg)], check=True, capture_output=True)
        out.append(spawn(procs, name, ["haproxy", "-db", "-f", str(cfg)]))
    wait_port(HAP_EGRESS, PORTS["http"])
    return out


# --- main ------------------------------------------------------------------------------------


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=1, help="Isthmus workers = HAProxy nbthread")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--bulk-mib", type=int, default=1024)
    p.add_argument("--connect-seconds", type=float, default=5.0)
    p.add_argument("--connect-concurrency", type=int, default=16)
    p.add_argument("--skip-bulk", action="store_true")
    p.add_argument("--skip-connect", action="store_true")
    args = p.parse_args()
    for tool in ("wrk", "haproxy", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian packages wrk, haproxy, nginx-light)")
    print(f"cores={os.cpu_count()} workers={args.workers} wrk -t{args.threads} "
          f"-c{args.connections} -d{args.duration}s; backend: nginx (64-byte body)")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="isthmus-bench-") as tmp, processes() as procs:
        d = Path(tmp)
        pem = make_pki(d)
        body = ("0123456789abcdef" * 4)[:63]  # + newline: 64 bytes
        conf = NGINX_CONF.format(workers=1, dir=d, host=NGINX[0], port=NGINX[1], body=body)
        (d / "nginx.conf").write_text(conf)
        spawn(procs, "nginx", ["nginx", "-c", str(d / "nginx.conf"), "-g", "daemon off;"])
        spawn(procs, "sink", [sys.executable, "-c", SINK_CODE, SINK[0], str(SINK[1]), "sink"])
        spawn(procs, "echo", [sys.executable, "-c", SINK_CODE, ECHO[0], str(ECHO[1]), "echo"])
        for host, port in (NGINX, SINK, ECHO):
            wait_port(host, port)
        haproxy = start_haproxy(procs, pem, d, args)
        hap_pids = [pid for h in haproxy for pid in h.pids()]
        egress, ingress = await start_isthmus(pem, args)
        isthmus_pids = egress.pids + ingress.pids
        try:
            results = {
                "direct": run_wrk(f"http://{NGINX[0]}:{NGINX[1]}/", args, []),
                "isthmus": run_wrk(f"http://{ISTHMUS_VIP}:{PORTS['http']}/", args, isthmus_pids),
                "haproxy": run_wrk(f"http://{HAP_EGRESS}:{PORTS['http']}/", args, hap_pids),
                "isthmus-l4": run_wrk(
                    f"http://{ISTHMUS_VIP}:{PORTS['tcp-web']}/", args, isthmus_pids
                ),
            }
            print("\nHTTP keep-alive, cross-cluster (client -> egress -> mTLS -> ingress -> nginx)")
            print(f"{'path':<12}{'req/s':>12}{'p99 ms':>10}{'errors':>8}{'gw CPU/1k rps':>16}")
            for name, r in results.items():
                cpu = f"{r.cpu_per_krps:.3f}" if name != "direct" else "-"
                print(f"{name:<12}{r.rps:>12.0f}{r.p99_ms:>10.2f}{r.errors:>8}{cpu:>16}")
            i, h = results["isthmus"], results["haproxy"]
            print(f"isthmus/haproxy req/s = {i.rps / h.rps:.2f}x, p99 = {i.p99_ms / h.p99_ms:.2f}x,"
                  f" isthmus/direct req/s = {i.rps / results['direct'].rps:.2f}x")  # fmt: skip
            if not args.skip_bulk:
                mib = args.bulk_mib
                print(f"\nBulk TCP, {mib} MiB through the tunnel (MB/s)")
                direct = bulk(SINK[0], SINK[1], mib)
                isth = bulk(ISTHMUS_VIP, PORTS["tcp-bulk"], mib)
                hap = bulk(HAP_EGRESS, PORTS["tcp-bulk"], mib)
                print(f"direct {direct:.0f}  isthmus {isth:.0f}  haproxy {hap:.0f}  "
                      f"isthmus/haproxy = {isth / hap:.2f}x")  # fmt: skip
            if not args.skip_connect:
                secs, conc = args.connect_seconds, args.connect_concurrency
                direct_c, _ = new_connections(ECHO[0], ECHO[1], secs, conc)
                mux_c, mux_err = new_connections(ISTHMUS_VIP, PORTS["tcp-echo"], secs, conc)
                hap_c, hap_err = new_connections(HAP_EGRESS, PORTS["tcp-echo"], secs, conc)
        finally:
            await egress.stop(drain=0)
        if not args.skip_bulk:
            # The same bulk transfer through an egress that gives each connection its own TLS
            # connection (multiplex: false): what the tunnel's framing and windows cost.
            egress, _unused = await start_isthmus_egress_only(pem, args, 8)
            try:
                own = bulk(ISTHMUS_VIP, PORTS["tcp-bulk"], args.bulk_mib)
            finally:
                await egress.stop(drain=0)
            print(f"isthmus with one TLS connection per client connection {own:.0f}  "
                  f"multiplexed/own = {isth / own:.2f}x")  # fmt: skip
        if not args.skip_connect:
            per_conn = {}
            for label, size in (("warm pool", 8), ("unpooled", 0)):
                egress, _unused = await start_isthmus_egress_only(pem, args, size)
                try:
                    per_conn[label] = new_connections(ISTHMUS_VIP, PORTS["tcp-echo"], secs, conc)
                finally:
                    await egress.stop(drain=0)
            pool_c, pool_err = per_conn["warm pool"]
            cold_c, cold_err = per_conn["unpooled"]
            print(f"\nNew connections/s to a remote service ({conc} concurrent, 1-byte echo)")
            print(f"direct {direct_c:.0f}  haproxy {hap_c:.0f} (errors {hap_err})\n"
                  f"isthmus multiplexed {mux_c:.0f} (errors {mux_err})  "
                  f"one TLS connection each: warm pool {pool_c:.0f} (errors {pool_err}), "
                  f"unpooled {cold_c:.0f} (errors {cold_err})\n"
                  f"multiplexed/unpooled = {mux_c / cold_c:.2f}x, "
                  f"isthmus multiplexed/haproxy = {mux_c / hap_c:.2f}x")  # fmt: skip
        await ingress.stop(drain=0)


async def start_isthmus_egress_only(
    pem: Pem, args: argparse.Namespace, pool_size: int
) -> tuple[WorkerPool, None]:
    """An egress with one TLS connection per client connection (multiplexing off) and a warm
    pool of `pool_size`, in front of the ingress still running."""
    east_table, _ = tables()
    cfg = EgressConfig(vip_cidr="127.244.0.0/16", probe=ProbeConfig(interval=5.0),
                       multiplex=False, pool=PoolConfig(size=pool_size))  # fmt: skip
    egress = WorkerPool(
        WorkerSpec(TlsPaths(str(pem.east_cert), str(pem.east_key), str(pem.bundle)), "east",
                   egress=replace(cfg)),
        args.workers,
    )  # fmt: skip
    await egress.start(east_table)
    wait_port(ISTHMUS_VIP, PORTS["tcp-echo"])
    return egress, None


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
