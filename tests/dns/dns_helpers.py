"""Helpers for the resolver tests: routing tables and running dig/kdig."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from discovery.names import ServiceKey
from federation.routing import Destination, RoutingTable, ServiceRoute

DIG = shutil.which("dig")
KDIG = shutil.which("kdig")
needs_dig = pytest.mark.skipif(DIG is None, reason="dig (bind9-dnsutils) is not installed")
needs_kdig = pytest.mark.skipif(KDIG is None, reason="kdig (knot-dnsutils) is not installed")


def route(
    name: str,
    ns: str,
    vip: str,
    ports: dict[str, int] | None = None,
    cluster_vips: dict[str, str] | None = None,
) -> ServiceRoute:
    return ServiceRoute(
        service=ServiceKey(name, ns),
        vip=ipaddress.ip_address(vip),
        ports=ports or {"http": 9080},
        destinations=(Destination(cluster="east", local=True),),
        cluster_vips={c: ipaddress.ip_address(v) for c, v in (cluster_vips or {}).items()},
    )


def sample_table(version: int = 1) -> RoutingTable:
    return RoutingTable.build(
        version,
        "east",
        "mesh.example.org",
        [
            route(
                "reviews",
                "default",
                "240.240.0.5",
                {"http": 9080, "grpc": 9090},
                {"east": "240.240.1.5", "west": "240.240.2.5"},
            ),
            route("ratings", "default", "240.240.0.6"),
            route("billing", "payments", "fd00:240::7", {"tcp-db": 5432}),
        ],
    )


async def dig(port: int, *args: str, server: str = "127.0.0.1", tool: str | None = None) -> str:
    """Run dig (or kdig) against the server; returns stdout. Bounded by its own timeouts."""
    exe = tool or DIG
    assert exe is not None
    limits = ["+timeout=2", "+retry=0"] if exe == KDIG else ["+time=2", "+tries=1"]
    cmd = [exe, "-p", str(port), f"@{server}", *limits, *args]
    proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=20)
    return proc.stdout


def status(out: str) -> str:
    for line in out.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(f"no status in dig output:\n{out}")


def flags(out: str) -> set[str]:
    for line in out.splitlines():
        if line.startswith(";; flags:"):
            return set(line.split(":")[1].split(";")[0].split())
    raise AssertionError(f"no flags in dig output:\n{out}")


def section(out: str, name: str) -> list[str]:
    """Records of one section (ANSWER, AUTHORITY, ADDITIONAL) of dig's output."""
    lines = out.splitlines()
    header = f";; {name} SECTION:"
    if header not in lines:
        return []
    out_lines = []
    for line in lines[lines.index(header) + 1 :]:
        if not line.strip() or line.startswith(";;"):
            break
        out_lines.append(" ".join(line.split()))
    return out_lines


UNBOUND = shutil.which("unbound") or (
    "/usr/sbin/unbound" if Path("/usr/sbin/unbound").exists() else None
)
needs_unbound = pytest.mark.skipif(UNBOUND is None, reason="unbound is not installed")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on `host` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def unbound_config(
    workdir: Path, host: str, port: int, local_data: list[str], forward_to: str | None = None
) -> Path:
    lines = [
        "server:",
        f'    directory: "{workdir}"',
        '    username: ""',
        '    chroot: ""',
        '    pidfile: ""',
        "    use-syslog: no",
        "    do-daemonize: no",
        "    verbosity: 0",
        "    num-threads: 1",
        f"    interface: {host}",
        f"    port: {port}",
        "    do-ip6: no",
        "    access-control: 127.0.0.0/8 allow",
        '    module-config: "iterator"',
        "    so-reuseport: no",
        "    msg-cache-size: 16m",
        "    rrset-cache-size: 32m",
        '    local-zone: "example.org." static',
        '    local-zone: "global." static',
    ]
    lines += [f'    local-data: "{d}"' for d in local_data]
    if forward_to:
        lines += [
            "    do-not-query-localhost: no",
            "forward-zone:",
            '    name: "."',
            f"    forward-addr: {forward_to}",
        ]
    lines += ["remote-control:", "    control-enable: no"]
    path = workdir / "unbound.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_unbound(conf: Path) -> subprocess.Popen[bytes]:
    assert UNBOUND is not None
    return subprocess.Popen(
        [UNBOUND, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait_udp_dns(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something answers a DNS query on host:port (bounded)."""
    import time

    query = bytes.fromhex("12340000000100000000000000000200 01".replace(" ", ""))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(query, (host, port))
                s.recv(512)
                return
            except OSError:
                continue
    raise TimeoutError(f"nothing answers DNS on {host}:{port}")


class MisbehavingUpstream:
    """A fake upstream resolver that misbehaves on purpose (no real resolver does this on
    demand): `silent` never answers, `garbage` answers noise with the right ID, `truncate`
    sets TC on every reply over UDP and TCP alike."""

    def __init__(self, mode: str, host: str = "127.0.9.1") -> None:
        self.mode = mode
        self.host = host
        self.port = 0
        self.received = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def reply_to(self, query: bytes) -> bytes | None:
        self.received += 1
        if self.mode == "silent" or len(query) < 12:
            return None
        if self.mode == "garbage":
            return query[:2] + bytes(range(256))[7:90]
        # truncate: header echo with QR and TC, the question, nothing else
        return query[:2] + b"\x82\x00" + query[4:12] + query[12:]

    async def start(self) -> MisbehavingUpstream:
        loop = asyncio.get_running_loop()
        outer = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = outer.reply_to(data)
                if reply is not None:
                    self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    (n,) = struct.unpack(">H", await reader.readexactly(2))
                    reply = outer.reply_to(await reader.readexactly(n))
                    if reply is not None:
                        writer.write(struct.pack(">H", len(reply)) + reply)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.port = free_port(self.host)
        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, self.port))
        self._tcp = await asyncio.start_server(tcp, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


def query_bytes(name: str, qtype: int = 1, msg_id: int = 0x1234, rd: bool = True) -> bytes:
    from dns.wire import text_to_wire

    flags = 0x0100 if rd else 0
    return (
        struct.pack(">HHHHHH", msg_id, flags, 1, 0, 0, 0)
        + text_to_wire(name)
        + struct.pack(">HH", qtype, 1)
    )


async def udp_ask(host: str, port: int, payload: bytes, timeout: float = 8.0) -> bytes | None:
    """Send one datagram and wait (bounded) for one reply on a fresh socket."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not fut.done():
                fut.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(P, remote_addr=(host, port))
    try:
        transport.sendto(payload)
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        return None
    finally:
        transport.close()
