"""Ownership is decided inside the write's own transaction on the embedded catalog: of two
writers racing for one new workload id, exactly one wins and the other gets a Conflict.

The attack: two agents registering the same 200 new ids at once both got OK for 195 of them,
and the stored owners then split between them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from discovery.embedded import EmbeddedCatalog
from discovery.errors import Conflict, NotFound
from discovery.model import Workload
from discovery.schema import parse_workload

pytestmark = pytest.mark.timeout(60)

A = "spiffe://mesh.test/cluster/east/agent/vm-1"
B = "spiffe://mesh.test/cluster/east/agent/vm-2"


def wl(wid: str, source: str, address: str = "10.0.0.5") -> Workload:
    body = {"service": "web", "address": address, "ports": {"http": 9080}}
    return parse_workload(body, wid, "east", source)


async def opened(path: Path) -> EmbeddedCatalog:
    c = EmbeddedCatalog(path, "east", "127.240.0.0/16")
    await c.open()
    return c


async def test_two_owners_racing_for_new_ids_one_wins_each(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    try:
        ids = [f"w{i}" for i in range(200)]
        puts = []
        for wid in ids:  # both claims are queued before either commits
            puts.append(c.put(wl(wid, A, "10.0.0.1"), owners={A}))
            puts.append(c.put(wl(wid, B, "10.0.0.2"), owners={B}))
        results = await asyncio.gather(*puts, return_exceptions=True)
        for wid, a, b in zip(ids, results[::2], results[1::2], strict=True):
            won = [r for r in (a, b) if not isinstance(r, BaseException)]
            lost = [r for r in (a, b) if isinstance(r, BaseException)]
            assert len(won) == 1 and len(lost) == 1, (wid, a, b)
            assert isinstance(lost[0], Conflict), lost[0]
            stored = c.get(wid).workload
            assert stored == won[0].workload
            assert f"belongs to {stored.source}" in str(lost[0])
        index = c.index
    finally:
        await c.close()
    c = await opened(tmp_path)  # what is durable says the same
    try:
        assert c.index == index == len(ids) + 0  # one committed write per id, no more
        assert {c.get(w).workload.source for w in ids} <= {A, B}
    finally:
        await c.close()


async def test_owner_may_replace_its_own_and_others_are_refused(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    try:
        await c.put(wl("x", A), owners={A})
        st = await c.put(wl("x", A, "10.0.0.9"), owners={A})  # the owner replaces it
        assert st.workload.address == "10.0.0.9"
        index = c.index
        with pytest.raises(Conflict, match=f"belongs to {A}"):
            await c.put(wl("x", B, "10.6.6.6"), owners={B})
        with pytest.raises(Conflict, match=f"belongs to {A}"):
            await c.delete("x", owners={B})
        assert c.get("x").workload.address == "10.0.0.9" and c.index == index
        # a legacy owner name is accepted when the caller lists it, and the record moves on
        await c.put(wl("old", "agent:vm-1"))
        await c.put(wl("old", A), owners={A, "agent:vm-1"})
        assert c.get("old").workload.source == A
        # unconditional writes (config, operators) are unchanged
        await c.put(wl("x", "config"))
        assert c.get("x").workload.source == "config"
        await c.delete("x", owners={"config"})
        with pytest.raises(NotFound):
            await c.delete("x", owners={"config"})
    finally:
        await c.close()


async def test_a_refused_write_in_a_batch_leaves_the_others(tmp_path: Path) -> None:
    c = await opened(tmp_path)
    try:
        await c.put(wl("taken", A), owners={A})
        results = await asyncio.gather(
            c.put(wl("free-1", B), owners={B}),
            c.put(wl("taken", B), owners={B}),
            c.put(wl("free-2", B), owners={B}),
            return_exceptions=True,
        )
        assert isinstance(results[1], Conflict)
        assert c.get("free-1").workload.source == B and c.get("free-2").workload.source == B
        assert c.get("taken").workload.source == A
    finally:
        await c.close()
