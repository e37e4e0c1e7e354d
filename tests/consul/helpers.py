"""Building a ConsulCatalog against the stand-in, and waiting for it (bounded)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from discovery.consul.client import ConsulOptions
from discovery.consul.mapping import MappingRules
from discovery.consul.store import ConsulCatalog
from discovery.schema import parse_workload
from tests.consul_standin.standin import ConsulStandIn

# Fast enough for tests: short waits, quick retries (the stand-in is on loopback).
FAST = dict(wait=30.0, request_timeout=1.0, liveness_interval=0.2, retry_max=0.4,
            query_min_interval=0.05, startup_timeout=5.0)


def options(s: ConsulStandIn, **overrides: Any) -> ConsulOptions:
    rules = overrides.pop("rules", MappingRules(cluster="east"))
    return ConsulOptions(address=s.address, rules=rules, **{**FAST, **overrides})


async def open_catalog(s: ConsulStandIn, data_dir: Path | None = None, **overrides: Any
                       ) -> ConsulCatalog:
    vip_cidr = overrides.pop("vip_cidr", "127.240.0.0/16")
    c = ConsulCatalog(options(s, **overrides), data_dir=data_dir, vip_cidr=vip_cidr)
    await c.open()
    return c


async def until(probe: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll a (sync or async) probe until it is truthy; fail naming `what`."""
    last = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = probe()
                if asyncio.iscoroutine(last):
                    last = await last
                if last:
                    return last
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never true within {timeout}s: {what} (last {last!r})") from None


def foreign(s: ConsulStandIn, node: str, sid: str, name: str, address: str, port: int,
            **service: Any) -> None:
    """A service registered in Consul by another node (not through Isthmus)."""
    meta = service.pop("node_meta", {})
    checks = service.pop("checks", [])
    s.register_entity({"Node": node, "Address": address, "NodeMeta": meta,
                       "Service": {"ID": sid, "Service": name, "Port": port, **service},
                       "Checks": checks})


def workload(wid: str, service: str = "api", source: str = "api", **body: Any):
    base = {"service": service, "address": "127.0.0.9", "ports": {"http": 8080}}
    return parse_workload({**base, **body}, wid, "east", source=source)


def replace_options(c: ConsulCatalog, **kw: Any) -> ConsulOptions:
    return dataclasses.replace(c.options, **kw)
