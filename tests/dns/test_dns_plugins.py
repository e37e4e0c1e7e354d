"""Plugins through a real server: cache TTLs, hosts reload, rewrite, health/ready/metrics,
the default Corefile and worker processes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest
from dns_helpers import dig, needs_dig, query_bytes, route, sample_table, section, status
from dnslib import DNSRecord
from prometheus_client import REGISTRY

from dns.plugins.cache import CachePlugin
from dns.plugins.hosts import HostsPlugin
from dns.server import DnsServer
from dns.wire import parse_query
from dns.workers import DnsWorkers
from federation.routing import RoutingTable, TableHolder

pytestmark = [needs_dig, pytest.mark.timeout(90)]


async def wait_for(predicate, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_cache_counts_ttls_down_and_caps_them(make_server) -> None:
    up = await make_server("global {\n  global {\n    ttl 600\n  }\n}", listen="127.0.30.1:0")
    fwd = await make_server(
        f". {{\n  cache 100\n  forward . 127.0.30.1:{up.port}\n}}", listen="127.0.30.2:0"
    )
    out = await dig(fwd.port, "reviews.default.global", server="127.0.30.2")
    assert section(out, "ANSWER") == ["reviews.default.global. 600 IN A 240.240.0.5"]
    cache = next(p for p in fwd.plugins if isinstance(p, CachePlugin))
    req = parse_query(query_bytes("REVIEWS.default.global", msg_id=7), "udp")
    entry = cache.success.entries[req.key]
    assert entry.ttl == 100  # capped
    # Rendered 42 s later (explicit clock, no sleeping): TTLs counted down, ID and case kept.
    reply = DNSRecord.parse(entry.render_at(req, entry.stored + 42.5))
    assert reply.header.id == 7 and str(reply.q.qname) == "REVIEWS.default.global."
    assert reply.rr[0].ttl == 600 - 42


async def test_cache_capacity_is_bounded(make_server) -> None:
    up = await make_server("global {\n  global\n}", listen="127.0.31.1:0")
    fwd = await make_server(
        f". {{\n  cache {{\n    denial 3\n  }}\n  forward . 127.0.31.1:{up.port}\n}}",
        listen="127.0.31.2:0",
    )
    for i in range(6):
        out = await dig(fwd.port, f"n{i}.default.global", server="127.0.31.2")
        assert status(out) == "NXDOMAIN"
    cache = next(p for p in fwd.plugins if isinstance(p, CachePlugin))
    assert len(cache.denial.entries) == 3


async def test_cache_prefetch_refreshes_a_popular_entry(make_server) -> None:
    up = await make_server("global {\n  global {\n    ttl 10\n  }\n}", listen="127.0.32.1:0")
    fwd = await make_server(
        f". {{\n  cache {{\n    prefetch 1 1m 50%\n  }}\n  forward . 127.0.32.1:{up.port}\n}}",
        listen="127.0.32.2:0",
    )
    await dig(fwd.port, "reviews.default.global", server="127.0.32.2")
    cache = next(p for p in fwd.plugins if isinstance(p, CachePlugin))
    req = parse_query(query_bytes("reviews.default.global"), "udp")
    first = cache.success.entries[req.key]
    first.stored -= 6  # as if stored 6 s ago: under 50 % of its TTL is left
    first.expires -= 6
    await dig(fwd.port, "reviews.default.global", server="127.0.32.2")

    async def refreshed() -> bool:
        return cache.success.entries[req.key] is not first

    await wait_for(refreshed)


async def test_hosts_file_is_reloaded_on_change(make_server, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("10.3.3.3 app.example.org\n")
    server = await make_server(
        f"example.org {{\n  hosts {hosts} {{\n    reload 50ms\n  }}\n}}", listen="127.0.33.1:0"
    )
    out = await dig(server.port, "app.example.org", server="127.0.33.1")
    assert section(out, "ANSWER") == ["app.example.org. 3600 IN A 10.3.3.3"]
    out = await dig(server.port, "app.example.org", "AAAA", server="127.0.33.1")
    assert status(out) == "NOERROR" and section(out, "ANSWER") == []
    out = await dig(server.port, "-x", "10.3.3.3", server="127.0.33.1")
    hosts.write_text("10.4.4.4 app.example.org\n10.5.5.5 new.example.org\n")
    st = hosts.stat()
    os.utime(hosts, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    async def reloaded() -> bool:
        out = await dig(server.port, "new.example.org", server="127.0.33.1")
        return status(out) == "NOERROR" and bool(section(out, "ANSWER"))

    await wait_for(reloaded)
    out = await dig(server.port, "app.example.org", server="127.0.33.1")
    assert section(out, "ANSWER") == ["app.example.org. 3600 IN A 10.4.4.4"]
    plugin = next(p for p in server.plugins if isinstance(p, HostsPlugin))
    assert plugin.load() is False  # unchanged file: not re-read


async def test_rewrite_answers_under_the_original_name(make_server) -> None:
    server = await make_server(
        "svc.local global {\n"
        "  rewrite name suffix .svc.local. .default.global. answer auto\n"
        "  global\n}",
        listen="127.0.34.1:0",
    )
    out = await dig(server.port, "Reviews.svc.local", server="127.0.34.1")
    assert ";Reviews.svc.local." in out
    assert section(out, "ANSWER") == ["Reviews.svc.local. 30 IN A 240.240.0.5"]


async def test_health_ready_and_metrics_endpoints(tmp_path: Path) -> None:
    holder = TableHolder()
    server = DnsServer(
        "global {\n  health 127.0.35.1:0\n  ready 127.0.35.1:0\n  prometheus 127.0.35.2:0\n"
        "  global\n}",
        "127.0.35.1:0",
        holder,
    )
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            hp = server.http_port("127.0.35.1", 0)
            async with http.get(f"http://127.0.35.1:{hp}/health") as r:
                assert r.status == 200 and await r.text() == "OK"
            async with http.get(f"http://127.0.35.1:{hp}/ready") as r:
                assert r.status == 503 and "global" in await r.text()  # no table yet
            holder.publish(sample_table(1))
            async with http.get(f"http://127.0.35.1:{hp}/ready") as r:
                assert r.status == 200
            await dig(server.port, "reviews.default.global", server="127.0.35.1")
            mp = server.http_port("127.0.35.2", 0)
            async with http.get(f"http://127.0.35.2:{mp}/metrics") as r:
                text = await r.text()
        label = f'server="dns://127.0.35.1:{server.port}"'
        assert "isthmus_dns_requests_total{" in text and label in text
        assert (
            REGISTRY.get_sample_value(
                "isthmus_dns_responses_total",
                {
                    "server": f"dns://127.0.35.1:{server.port}",
                    "zone": "global.",
                    "rcode": "NOERROR",
                },
            )
            == 1
        )
    finally:
        await server.stop()


async def test_default_corefile_forwards_to_resolv_conf(make_server, tmp_path: Path) -> None:
    up = await make_server(
        "example.org {\n  hosts {\n    10.8.8.8 www.example.org\n  }\n}",
        listen="127.0.36.1:53" if os.geteuid() == 0 else "127.0.36.1:0",
    )
    if up.port != 53:
        pytest.skip("resolv.conf nameservers are on port 53: needs root to bind it")
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.36.1\nnameserver 127.0.36.2\n")
    # 127.0.36.2:53 is this resolver itself (agent mode): it must not forward to itself.
    server = await make_server(None, listen="127.0.36.2:53", resolv_conf=str(conf))
    assert "forward . 127.0.36.1:53\n" in server.corefile
    out = await dig(53, "www.example.org", server="127.0.36.2")
    assert section(out, "ANSWER") == ["www.example.org. 3600 IN A 10.8.8.8"]
    out = await dig(53, "reviews.default.global", server="127.0.36.2")
    assert section(out, "ANSWER") == ["reviews.default.global. 30 IN A 240.240.0.5"]


def test_default_corefile_text(tmp_path: Path) -> None:
    from dns.defaults import default_corefile

    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# test\nnameserver 127.0.0.1\nnameserver 192.0.2.53\nnameserver ::1\n"
        "search example\nnameserver 2001:db8::53\n"
    )
    text = default_corefile(("0.0.0.0",), 53, str(conf))
    assert "forward . 192.0.2.53:53 [2001:db8::53]:53\n" in text
    assert "global {\n" in text and "cache 30" in text
    text = default_corefile(("127.0.0.1",), 5353, str(conf))
    assert "forward . 127.0.0.1:53 192.0.2.53:53 [::1]:53 [2001:db8::53]:53\n" in text
    assert ". {" not in default_corefile(("0.0.0.0",), 53, str(tmp_path / "missing"))


@pytest.mark.timeout(120)
async def test_worker_processes_share_the_port_and_get_new_tables(holder) -> None:
    server = DnsServer("global {\n  global\n}", "127.0.37.1:0", holder)
    await server.start()
    workers = DnsWorkers(server, holder, count=1)
    try:
        await workers.start()
        assert all(p.is_alive() for p, _ in workers.procs)
        holder.publish(RoutingTable.build(5, "east", "td", [route("new", "ns", "240.240.7.7")]))

        async def everyone_has_it() -> bool:
            # Many source ports: SO_REUSEPORT hashes them over both processes' sockets.
            outs = await asyncio.gather(
                *(
                    dig(server.port, "new.ns.global", "+short", server="127.0.37.1")
                    for _ in range(12)
                )
            )
            return all(o.strip() == "240.240.7.7" for o in outs)

        await wait_for(everyone_has_it, timeout=30)
    finally:
        t0 = time.monotonic()
        await workers.stop()
        await server.stop()
        assert time.monotonic() - t0 < 60
