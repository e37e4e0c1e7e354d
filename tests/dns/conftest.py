"""Fixtures for the resolver tests: a routing-table holder and a server factory."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the tests import dns_helpers from here

from dns_helpers import sample_table

from dns.server import DnsServer
from federation.routing import TableHolder


@pytest.fixture
def holder() -> TableHolder:
    h = TableHolder()
    h.publish(sample_table())
    return h


ServerFactory = Callable[..., Awaitable[DnsServer]]


@pytest.fixture
async def make_server(holder: TableHolder) -> AsyncIterator[ServerFactory]:
    started: list[DnsServer] = []

    async def make(
        corefile: str | None,
        listen: str = "127.0.0.1:0",
        tables: TableHolder | None = None,
        **kw: object,
    ) -> DnsServer:
        server = DnsServer(corefile, listen, tables or holder, **kw)  # type: ignore[arg-type]
        await server.start()
        started.append(server)
        return server

    yield make
    for s in reversed(started):
        await s.stop()
