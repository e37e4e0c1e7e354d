"""Forwarding against real resolvers on loopback: another instance of ours and Unbound,
failover and health checks, TCP retry, and upstreams that misbehave."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from dns_helpers import (
    MisbehavingUpstream,
    dig,
    flags,
    free_port,
    needs_dig,
    needs_unbound,
    query_bytes,
    section,
    start_unbound,
    status,
    udp_ask,
    unbound_config,
    wait_udp_dns,
)
from prometheus_client import REGISTRY

from dns.plugins.forward import ForwardPlugin

pytestmark = [needs_dig, pytest.mark.timeout(90)]

UPSTREAM = """
global {
    global
}
example.org {
    hosts {
        10.0.0.80 www.example.org
        %s
    }
}
"""


def _big_hosts(n: int) -> str:
    return "\n        ".join(f"10.2.{i // 250}.{i % 250 + 1} big.example.org" for i in range(n))


def forwarder(server) -> ForwardPlugin:
    return next(p for p in server.plugins if isinstance(p, ForwardPlugin))


async def wait_for(predicate, timeout: float = 15.0) -> None:
    """Poll a condition (bounded); used for background state, never to assert on timing."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_forward_and_cache_through_a_second_instance(make_server) -> None:
    up = await make_server(UPSTREAM % "", listen="127.0.4.1:0")
    fwd = await make_server(
        f". {{\n  forward . 127.0.4.1:{up.port}\n  cache 30\n}}\n", listen="127.0.4.2:0"
    )
    out = await dig(fwd.port, "reviews.default.global", server="127.0.4.2")
    assert section(out, "ANSWER") == ["reviews.default.global. 30 IN A 240.240.0.5"]
    assert "aa" in flags(out)  # the upstream's flags pass through, as a proxy should
    out = await dig(fwd.port, "nosuch.default.global", server="127.0.4.2")
    assert status(out) == "NXDOMAIN"
    assert section(out, "AUTHORITY")[0].startswith("global. ")
    await up.stop()
    # The upstream is gone: both the answer and the denial now come from the cache.
    out = await dig(fwd.port, "RevIews.default.global", server="127.0.4.2")
    assert ";RevIews.default.global." in out
    assert section(out, "ANSWER")[0].endswith("IN A 240.240.0.5")
    assert "aa" not in flags(out)  # a cached answer is not authoritative
    out = await dig(fwd.port, "nosuch.default.global", server="127.0.4.2")
    assert status(out) == "NXDOMAIN"
    label = f"dns://127.0.4.2:{fwd.port}"
    hits = REGISTRY.get_sample_value(
        "isthmus_dns_cache_hits_total", {"server": label, "type": "success"}
    )
    denials = REGISTRY.get_sample_value(
        "isthmus_dns_cache_hits_total", {"server": label, "type": "denial"}
    )
    assert hits == 1 and denials == 1


@needs_unbound
async def test_forward_to_unbound(make_server, tmp_path: Path) -> None:
    port = free_port("127.0.5.1")
    conf = unbound_config(tmp_path, "127.0.5.1", port, ["www.example.org. 60 IN A 10.9.9.9"])
    proc = start_unbound(conf)
    try:
        await asyncio.to_thread(wait_udp_dns, "127.0.5.1", port)
        fwd = await make_server(
            f"example.org {{\n  forward . 127.0.5.1:{port}\n}}\n", listen="127.0.5.2:0"
        )
        out = await dig(fwd.port, "www.example.org", server="127.0.5.2")
        assert section(out, "ANSWER") == ["www.example.org. 60 IN A 10.9.9.9"]
        out = await dig(fwd.port, "other.example.org", server="127.0.5.2")
        assert status(out) == "NXDOMAIN"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_failover_and_health_check_recovery(make_server) -> None:
    dead_port = free_port("127.0.6.1")
    good = await make_server(UPSTREAM % "", listen="127.0.6.2:0")
    fwd = await make_server(
        f""". {{
            forward . 127.0.6.1:{dead_port} 127.0.6.2:{good.port} {{
                policy sequential
                max_fails 1
                health_check 100ms
            }}
        }}""",
        listen="127.0.6.3:0",
    )
    out = await dig(fwd.port, "www.example.org", server="127.0.6.3")
    assert section(out, "ANSWER") == ["www.example.org. 3600 IN A 10.0.0.80"]
    plugin = forwarder(fwd)
    assert plugin.upstreams[0].down and not plugin.upstreams[1].down
    # Queries now skip the dead upstream; bring it back and the health check notices.
    out = await dig(fwd.port, "reviews.default.global", server="127.0.6.3")
    assert status(out) == "NOERROR"
    revived = await make_server(UPSTREAM % "", listen=f"127.0.6.1:{dead_port}")
    await wait_for(lambda: not plugin.upstreams[0].down)
    assert revived.port == dead_port


async def test_truncated_upstream_reply_is_retried_over_tcp(make_server) -> None:
    up = await make_server(UPSTREAM % _big_hosts(60), listen="127.0.7.1:0")
    fwd = await make_server(f". {{\n  forward . 127.0.7.1:{up.port}\n}}\n", listen="127.0.7.2:0")
    # No EDNS: the upstream's UDP reply is truncated, the forwarder retries over TCP, and
    # the client (512 bytes over UDP) gets TC and retries over TCP itself.
    out = await dig(fwd.port, "+noedns", "big.example.org", server="127.0.7.2")
    assert len(section(out, "ANSWER")) == 60
    tcp = REGISTRY.get_sample_value(
        "isthmus_dns_forward_requests_total",
        {"server": f"dns://127.0.7.2:{fwd.port}", "to": f"127.0.7.1:{up.port}", "proto": "tcp"},
    )
    assert tcp is not None and tcp >= 1


async def test_silent_upstream_cannot_exhaust_the_server(make_server) -> None:
    bad = await MisbehavingUpstream("silent", "127.0.8.1").start()
    try:
        fwd = await make_server(
            f"""global {{
                global
            }}
            . {{
                forward . 127.0.8.1:{bad.port} {{
                    max_concurrent 5
                    timeout 500ms
                    max_fails 0
                }}
            }}""",
            listen="127.0.8.2:0",
        )
        queries = [
            udp_ask("127.0.8.2", fwd.port, query_bytes(f"q{i}.example.net", msg_id=i))
            for i in range(20)
        ]
        # While those hang upstream, the global zone still answers at once.
        answer = await udp_ask("127.0.8.2", fwd.port, query_bytes("reviews.default.global"))
        replies = await asyncio.gather(*queries)
        assert answer is not None and answer[3] & 0x0F == 0
        rcodes = sorted(r[3] & 0x0F for r in replies if r is not None)
        assert len(rcodes) == 20  # every query got an answer, none was left hanging
        assert rcodes.count(5) >= 15  # REFUSED beyond max_concurrent
        assert set(rcodes) <= {2, 5}  # the rest SERVFAIL after the timeout
        await wait_for(lambda: forwarder(fwd).inflight == 0)
    finally:
        await bad.stop()


@pytest.mark.parametrize("mode", ["garbage", "truncate"])
async def test_garbage_and_endless_truncation_fail_cleanly(make_server, mode: str) -> None:
    host = "127.0.10.1" if mode == "garbage" else "127.0.11.1"
    bad = await MisbehavingUpstream(mode, host).start()
    try:
        fwd = await make_server(
            f"""global {{
                global
            }}
            . {{
                errors
                forward . {host}:{bad.port} {{
                    timeout 500ms
                }}
            }}""",
            listen=host[:-1] + "2:0",
        )
        out = await dig(fwd.port, "www.example.net", server=host[:-1] + "2")
        assert status(out) == "SERVFAIL"
        out = await dig(fwd.port, "reviews.default.global", server=host[:-1] + "2")
        assert status(out) == "NOERROR"
        assert bad.received >= 1
    finally:
        await bad.stop()


async def test_except_zones_are_not_forwarded(make_server) -> None:
    up = await make_server(UPSTREAM % "", listen="127.0.12.1:0")
    fwd = await make_server(
        f""". {{
            hosts {{
                10.7.7.7 www.example.org
                fallthrough
            }}
            forward . 127.0.12.1:{up.port} {{
                except example.org
            }}
        }}""",
        listen="127.0.12.2:0",
    )
    out = await dig(fwd.port, "reviews.default.global", server="127.0.12.2")
    assert status(out) == "NOERROR"  # forwarded
    out = await dig(fwd.port, "www.example.org", server="127.0.12.2")
    assert section(out, "ANSWER") == ["www.example.org. 3600 IN A 10.7.7.7"]  # local hosts
    out = await dig(fwd.port, "nope.example.org", server="127.0.12.2")
    assert status(out) == "SERVFAIL"  # excepted and nothing behind forward answers it
