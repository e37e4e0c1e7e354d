"""Helpers for the resolver tests: routing tables and running dig/kdig."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import subprocess

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
