"""The traffic policy store (`federation.db`) on a damaged disk: rows that do not parse are
quarantined and reported, a truncated file is refused with the way out."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from discovery.errors import StoreError
from discovery.names import ServiceKey
from federation.hlc import HybridClock
from federation.policy import PolicyStore

pytestmark = pytest.mark.timeout(60)


async def seeded(path: Path) -> None:
    store = PolicyStore(path, HybridClock("east"))
    await store.open()
    await store.set(ServiceKey("reviews"), {"east": 1, "west": 3}, True)
    await store.set(ServiceKey("ratings"), {"east": 1}, False)
    await store.close()


def sql(path: Path, statement: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path / "federation.db")
    try:
        with db:
            return list(db.execute(statement))
    finally:
        db.close()


@pytest.mark.parametrize(
    "damage, word",
    [
        ("UPDATE policies SET service='Not a service' WHERE service='ratings.default'", "service"),
        ("UPDATE policies SET weights='{not json' WHERE service='ratings.default'", "weights"),
        ("UPDATE policies SET weights='{\"east\": -4}' WHERE service='ratings.default'", "weights"),
        ("UPDATE policies SET stamp='yesterday' WHERE service='ratings.default'", "version"),
    ],
)
async def test_a_row_that_does_not_parse_is_quarantined(
    tmp_path: Path, damage: str, word: str
) -> None:
    await seeded(tmp_path)
    sql(tmp_path, damage)
    store = PolicyStore(tmp_path, HybridClock("east"))
    async with asyncio.timeout(10):
        await store.open()
    try:
        assert [str(p.service) for p in store.all()] == ["reviews.default"]
        [row] = store.quarantined
        assert row.table == "policies" and word in row.reason
        # the service can get a policy again
        await store.set(ServiceKey("ratings"), {"east": 2}, True)
    finally:
        await store.close()
    assert len(sql(tmp_path, "SELECT * FROM quarantine")) == 1
    assert {s for (s,) in sql(tmp_path, "SELECT service FROM policies")} == {
        "reviews.default", "ratings.default"}


async def test_a_truncated_federation_file_is_refused_with_the_way_out(tmp_path: Path) -> None:
    await seeded(tmp_path)
    (tmp_path / "federation.db").write_bytes(b"")
    store = PolicyStore(tmp_path, HybridClock("east"))
    with pytest.raises(StoreError, match=r"federation\.db is empty.*delete it"):
        await store.open()
    assert (tmp_path / "federation.db").stat().st_size == 0
