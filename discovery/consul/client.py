"""How the store reaches Consul: its options, py-consul's asyncio client built from them, and
every request bounded, counted and translated into the catalog's errors at this boundary.

The ACL token lives in `ConsulOptions.token` (never in its repr) and goes out only in the
`X-Consul-Token` header; no message built here contains it.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio
from prometheus_client import Counter

from discovery.consul.mapping import MappingRules
from discovery.errors import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUESTS = Counter(
    "isthmus_consul_requests_total",
    "Requests to Consul, by endpoint and outcome (ok, unavailable, refused)",
    ["endpoint", "outcome"],
)


class ConsulUnavailable(StoreError):
    """Consul did not answer, or answered 5xx: the catalog serves its last-known state."""


class ConsulRefused(StoreError):
    """Consul answered 4xx (an ACL denial, a request it does not accept)."""


@dataclass(frozen=True, slots=True)
class ConsulOptions:
    address: str = "http://127.0.0.1:8500"
    token: str | None = field(default=None, repr=False)
    datacenter: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    stale_reads: bool = False
    wait: float = 300.0  # a blocking query's wait
    request_timeout: float = 10.0  # any other request; also the margin over `wait`
    max_connections: int = 192
    liveness_interval: float = 10.0
    retry_max: float = 30.0
    query_min_interval: float = 1.0
    startup_timeout: float = 10.0
    kv_prefix: str = ""  # "" -> isthmus/<cluster>
    ignore_services: tuple[str, ...] = ("consul",)
    rules: MappingRules = field(default_factory=lambda: MappingRules(cluster=""))

    def prefix(self) -> str:
        return (self.kv_prefix or f"isthmus/{self.rules.cluster}").strip("/")


def make_client(o: ConsulOptions) -> consul.aio.Consul:
    """py-consul's asyncio client for `o` (TLS, datacenter, consistency, connection limit)."""
    url = urlsplit(o.address)
    scheme = url.scheme or "http"
    host = url.hostname or "127.0.0.1"
    port = url.port or (8501 if scheme == "https" else 8500)
    verify: bool | str = o.ca_file if (scheme == "https" and o.ca_file) else True
    cert = (o.cert_file, o.key_file) if o.cert_file else None
    with warnings.catch_warnings():  # py-consul 1.8 still passes aiohttp's deprecated ssl_context
        warnings.simplefilter("ignore", DeprecationWarning)
        client = consul.aio.Consul(
            host=f"[{host}]" if ":" in host else host,
            port=port,
            scheme=scheme,
            dc=o.datacenter,
            verify=verify,
            cert=cert,
            consistency="stale" if o.stale_reads else "default",
            connections_limit=o.max_connections,
            # aiohttp's default session timeout (300 s in total) would cut a blocking query
            # of the default 5 minutes plus Consul's jitter: every request is bounded by
            # `call` instead, and this only has to outlast the longest of them.
            connections_timeout=o.wait + o.wait / 16 + o.request_timeout + 60.0,
        )
    # py-consul reads CONSUL_HTTP_TOKEN over the token it is given: the config decides alone.
    client.token = o.token
    return client


async def call(endpoint: str, request: Awaitable[T], timeout: float) -> T:
    """Await one request within `timeout`, counted, its failure translated."""
    try:
        async with asyncio.timeout(timeout):
            out = await request
    except TimeoutError:
        REQUESTS.labels(endpoint, "unavailable").inc()
        raise ConsulUnavailable(f"{endpoint}: no answer within {timeout:g}s") from None
    except (consul.ACLPermissionDenied, consul.ACLDisabled) as e:
        REQUESTS.labels(endpoint, "refused").inc()
        raise ConsulRefused(f"{endpoint}: ACL: {_body(e)} (check discovery.consul.token_file "
                            "and the token's policy)") from None
    except consul.ConsulException as e:
        # py-consul raises the base class for 5xx and undecodable answers, subclasses for 4xx
        kind = ConsulUnavailable if type(e) is consul.ConsulException else ConsulRefused
        REQUESTS.labels(endpoint, "unavailable" if kind is ConsulUnavailable else "refused").inc()
        raise kind(f"{endpoint}: {_body(e)}") from None
    except (aiohttp.ClientError, OSError) as e:
        REQUESTS.labels(endpoint, "unavailable").inc()
        raise ConsulUnavailable(f"{endpoint}: {_reason(e)}") from None
    REQUESTS.labels(endpoint, "ok").inc()
    return out


def _body(e: Exception) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _reason(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect to {e.host}:{e.port}: {e.os_error.strerror or e.os_error}"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "Consul closed the connection"
    return _body(e)


def index_of(raw: Any) -> int:
    """X-Consul-Index as an integer; ConsulUnavailable when it is not one."""
    text = str(raw)
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise ConsulUnavailable(f"X-Consul-Index {text[:40]!r} is not an index")
    return int(text)
