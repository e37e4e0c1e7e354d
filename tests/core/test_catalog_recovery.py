"""A damaged catalog file: rows that do not validate are quarantined, a truncated file is
refused, and a write the writer thread cannot make fails that write instead of the thread."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from discovery.embedded import EmbeddedCatalog
from discovery.errors import StoreError
from discovery.names import ServiceKey
from discovery.schema import parse_workload

pytestmark = pytest.mark.timeout(60)


def wl(wid: str, service: str = "reviews", **body: object):
    base = {"service": service, "address": "10.0.0.5", "ports": {"http": 9080}}
    base.update(body)
    return parse_workload(base, wid, "east")


async def seed(path: Path) -> None:
    c = EmbeddedCatalog(path, "east")
    await c.open()
    await c.put(wl("good"))
    await c.put(wl("bad", service="ratings", check={"ttl": "30s"}))
    await c.close()


def sql(path: Path, statement: str, *args: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path / "catalog.db")
    try:
        with db:
            return list(db.execute(statement, args))
    finally:
        db.close()


async def open_bounded(path: Path) -> EmbeddedCatalog:
    """Today a bad row kills the writer thread and open() never returns: bound it."""
    c = EmbeddedCatalog(path, "east")
    async with asyncio.timeout(10):
        await c.open()
    return c


async def test_a_row_whose_ports_do_not_parse_is_quarantined(tmp_path: Path) -> None:
    await seed(tmp_path)
    sql(tmp_path, "UPDATE workloads SET body=json_set(body,'$.ports',json('[1]')) WHERE id='bad'")
    c = await open_bounded(tmp_path)
    try:
        assert [st.workload.id for st in c.workloads()] == ["good"]
        [row] = c.quarantined
        assert (row.table, row.key) == ("workloads", "bad")
        assert "ports" in row.reason
        # the id is free again: the workload can simply be registered anew
        await c.put(wl("bad", service="ratings"))
        assert c.get("bad").workload.service == ServiceKey("ratings")
    finally:
        await c.close()
    [(key, body, reason)] = sql(tmp_path, "SELECT key, body, reason FROM quarantine")
    assert key == "bad" and "[1]" in body and "ports" in reason
    c = await open_bounded(tmp_path)  # still reported after a restart, not quarantined twice
    try:
        assert [r.key for r in c.quarantined] == ["bad"]
        assert {st.workload.id for st in c.workloads()} == {"good", "bad"}
    finally:
        await c.close()


async def test_a_stored_infinite_ttl_is_quarantined_not_served(tmp_path: Path) -> None:
    """What an older release stored for `"ttl": "<400 nines>s"`: `Infinity` in the JSON."""
    await seed(tmp_path)
    [(body,)] = sql(tmp_path, "SELECT body FROM workloads WHERE id='bad'")
    record = json.loads(body)
    record["check"][4] = float("inf")
    sql(tmp_path, "UPDATE workloads SET body=? WHERE id='bad'", json.dumps(record))
    assert "Infinity" in sql(tmp_path, "SELECT body FROM workloads WHERE id='bad'")[0][0]
    c = await open_bounded(tmp_path)
    try:
        assert [r.key for r in c.quarantined] == ["bad"]
        assert "ttl" in c.quarantined[0].reason
        json.dumps([st.to_json() for st in c.workloads()], allow_nan=False)
    finally:
        await c.close()


async def test_a_corrupt_index_is_rebuilt_from_the_rows(tmp_path: Path) -> None:
    await seed(tmp_path)
    [(highest,)] = sql(tmp_path, "SELECT max(mod_index) FROM workloads")
    sql(tmp_path, "UPDATE meta SET value='abc' WHERE key='index'")
    c = await open_bounded(tmp_path)
    try:
        assert c.index == highest
        assert [(r.table, r.key) for r in c.quarantined] == [("meta", "index")]
        await c.put(wl("next"))
        assert c.index == highest + 1
    finally:
        await c.close()
    assert sql(tmp_path, "SELECT value FROM meta WHERE key='index'") == [(str(highest + 1),)]


async def test_a_truncated_catalog_file_is_refused_with_the_way_out(tmp_path: Path) -> None:
    await seed(tmp_path)
    (tmp_path / "catalog.db").write_bytes(b"")
    c = EmbeddedCatalog(tmp_path, "east")
    with pytest.raises(StoreError, match=r"catalog\.db is empty.*delete it"):
        async with asyncio.timeout(10):
            await c.open()
    assert (tmp_path / "catalog.db").stat().st_size == 0  # left as it was, for inspection


async def test_a_write_the_writer_cannot_make_fails_alone(tmp_path: Path) -> None:
    """A value no registration body can produce (ports not a mapping, a NaN weight) fails its
    own write with a StoreError; the writer thread lives on and serves the next one."""
    c = await open_bounded(tmp_path)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(StoreError, match="'broken'"):
                await c.put(dataclasses.replace(wl("broken"), ports=[1]))  # type: ignore[arg-type]
            with pytest.raises(StoreError, match="'nan'"):
                await c.put(dataclasses.replace(wl("nan"), weight=float("nan")))
            batch = [c.put(wl(f"ok{i}")) for i in range(5)]
            batch.append(c.put(dataclasses.replace(wl("broken2"), ports=[2])))  # type: ignore[arg-type]
            results = await asyncio.gather(*batch, return_exceptions=True)
            assert [type(r).__name__ for r in results[:5]] == ["WorkloadState"] * 5
            assert isinstance(results[5], StoreError)
            await c.put(wl("after"))
        assert {st.workload.id for st in c.workloads()} == {"after"} | {f"ok{i}" for i in range(5)}
    finally:
        await c.close()
    c = await open_bounded(tmp_path)
    try:
        assert not c.quarantined and len(c.workloads()) == 6
    finally:
        await c.close()
