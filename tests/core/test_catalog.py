"""The embedded catalog on real SQLite files."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from discovery.embedded import MIGRATIONS, SCHEMA_VERSION, EmbeddedCatalog
from discovery.errors import NotFound, StoreError
from discovery.model import Health
from discovery.names import ServiceKey
from discovery.schema import parse_workload


def wl(wid: str, service: str = "reviews", **body: object):
    base = {"service": service, "address": "10.0.0.5", "ports": {"http": 9080}}
    base.update(body)
    return parse_workload(base, wid, "east")


async def opened(path: Path, cidr: str = "127.240.0.0/16") -> EmbeddedCatalog:
    c = EmbeddedCatalog(path, "east", cidr)
    await c.open()
    return c


async def test_put_get_list_delete_and_persist(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    st = await c.put(wl("a", labels={"version": "v2"}, locality={"region": "eu", "zone": "eu-1"}))
    assert st.health is Health.PASSING  # no check: passing
    await c.put(wl("b", check={"tcp": "10.0.0.5:9080"}))
    assert c.get("b").health is Health.UNKNOWN
    await c.put(wl("c", service="ratings"))
    assert [s.workload.id for s in c.workloads(ServiceKey("reviews"))] == ["a", "b"]
    await c.delete("c")
    with pytest.raises(NotFound):
        c.get("c")
    with pytest.raises(NotFound):
        await c.delete("c")
    await c.set_health("b", Health.CRITICAL, "refused")
    index = c.index
    vip = c.known_vip("reviews.default")
    await c.close()

    c2 = await opened(tmp_path)
    try:
        assert c2.index == index
        assert c2.get("a").workload.labels == {"version": "v2"}
        assert c2.get("a").workload.locality.zone == "eu-1"
        assert c2.get("b").health is Health.CRITICAL and c2.get("b").output == "refused"
        assert c2.known_vip("reviews.default") == vip
        assert [s.service.name for s in c2.services()] == ["reviews"]
    finally:
        await c2.close()
    mode = stat.S_IMODE(os.stat(tmp_path / "catalog.db").st_mode)
    assert mode == 0o600


async def test_replace_keeps_health_when_check_unchanged(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    try:
        await c.put(wl("a", check={"tcp": "10.0.0.5:9080"}))
        await c.set_health("a", Health.PASSING, "ok")
        await c.put(wl("a", check={"tcp": "10.0.0.5:9080"}, weight=5))
        assert c.get("a").health is Health.PASSING and c.get("a").workload.weight == 5
        await c.put(wl("a", check={"tcp": "10.0.0.5:9081"}))
        assert c.get("a").health is Health.UNKNOWN  # a new check starts over
    finally:
        await c.close()


async def test_vips_are_stable_unique_and_inside_the_range(tmp_path: Path) -> None:
    c = await opened(tmp_path, "10.99.0.0/29")  # 6 usable addresses
    try:
        vips = [await c.vip(f"s{i}.default") for i in range(6)]
        assert len(set(vips)) == 6
        net = ipaddress.ip_network("10.99.0.0/29")
        assert all(v in net and v not in (net.network_address, net.broadcast_address) for v in vips)
        assert await c.vip("s3.default") == vips[3]
        with pytest.raises(StoreError, match="exhausted"):
            await c.vip("s7.default")
    finally:
        await c.close()


async def test_concurrent_vip_requests_for_one_key_agree(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    try:
        vips = await asyncio.gather(*(c.vip("x.default") for _ in range(20)))
        assert len(set(vips)) == 1
    finally:
        await c.close()


async def test_changes_since_and_blocking_wait(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    try:
        await c.put(wl("a"))
        start = c.index
        waiter = asyncio.create_task(c.wait(start, 10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await c.put(wl("b"))
        assert await asyncio.wait_for(waiter, 5) == c.index
        assert c.changes_since(start) == {"b"}
        assert c.changes_since(c.index) == set()
        assert await c.wait(c.index, 0.05) == c.index  # times out, returns current index
    finally:
        await c.close()


async def test_listeners_see_every_change_in_order(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    seen: list[tuple[int, str, bool]] = []
    c.subscribe(lambda i, wid, st: seen.append((i, wid, st is not None)))
    try:
        await asyncio.gather(*(c.put(wl(f"w{i}")) for i in range(50)))
        await c.delete("w7")
        indexes = [i for i, _, _ in seen]
        assert indexes == sorted(indexes) and len(seen) == 51
        assert seen[-1][1:] == ("w7", False)
    finally:
        await c.close()


async def test_migrates_an_old_schema_and_refuses_a_newer_one(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    conn = sqlite3.connect(db)
    for stmt in MIGRATIONS[0]:
        conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    c = await opened(tmp_path)
    assert c.schema_version_found == 1
    await c.put(wl("a"))  # needs the v2 vips table
    await c.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this isthmus supports"):
        await opened(tmp_path)


async def test_a_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "catalog.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open catalog"):
        await opened(tmp_path)


async def test_writes_after_close_fail_cleanly(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    await c.close()
    with pytest.raises(StoreError, match="closed"):
        await c.put(wl("a"))


async def test_health_counts_follow_every_change(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    try:
        for i in range(6):
            await c.put(wl(f"w{i}", check={"tcp": "10.0.0.5:80"} if i % 2 else None))
        await c.set_health("w1", Health.CRITICAL)
        await c.set_health("w3", Health.PASSING)
        await c.delete("w0")
        await c.put(wl("w5"))  # check removed: passing
        recount = {h: sum(1 for s in c.workloads() if s.health is h) for h in Health}
        assert c.health_counts() == recount
        assert recount == {Health.PASSING: 4, Health.CRITICAL: 1, Health.UNKNOWN: 0}
    finally:
        await c.close()
