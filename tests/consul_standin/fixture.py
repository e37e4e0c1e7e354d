"""The `standin` pytest fixture: a Consul stand-in on its own loopback address, and helpers to
reach it with py-consul's asyncio client (imported by the conftest of each folder using it)."""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import AsyncIterator

import consul.aio
import pytest

from tests.consul_standin.standin import ConsulStandIn

_hosts = itertools.count(1)


def standin_host() -> str:
    """A fresh 127.78.x.y per call (and per process)."""
    n = next(_hosts) + 200 * (os.getpid() % 250)
    return f"127.78.{(n // 250) % 250}.{n % 250 + 1}"


def client_for(s: ConsulStandIn, token: str | None = None, **kwargs: object) -> consul.aio.Consul:
    """py-consul's asyncio client, pointed at the stand-in."""
    with warnings.catch_warnings():  # py-consul 1.8 passes aiohttp's deprecated ssl_context
        warnings.simplefilter("ignore", DeprecationWarning)
        c = consul.aio.Consul(host=s.host, port=s.port, scheme="http", **kwargs)
    c.token = token  # never CONSUL_HTTP_TOKEN from the environment
    return c


@pytest.fixture
async def standin() -> AsyncIterator[ConsulStandIn]:
    s = ConsulStandIn(standin_host())
    await s.start()
    try:
        yield s
    finally:
        s.hang(False)
        await s.stop()
