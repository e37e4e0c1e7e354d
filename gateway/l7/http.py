"""L7 egress for HTTP/1.1 ports: an aiohttp server on the VIP, an aiohttp client upstream.

Per request: learn the service from the local address, strip hop-by-hop and `x-isthmus-*`
headers (nothing from the app may pose as gateway metadata), pick a destination, send. Local
endpoints are reached in plain HTTP, remote clusters over mutual TLS to their ingress with the
service SNI; both through keep-alive pools (aiohttp's connector keys connections by host, port,
TLS context and SNI, so a pooled connection is never reused for another service).

Retries (`retry.RetryPolicy`): an idempotent request whose body can be sent again is tried on
another target (the balancer's `exclude`) after a connect error, a connection that closed before
the response, a per-try timeout, or a 502/503/504 — at most `attempts` tries and within the
`RetryBudget`. Failures and 5xx answers are reported to the balancer for outlier detection.
Response bodies stream back once the headers are in; nothing is retried after that.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from federation.routing import TableHolder
from gateway.balancer import Balancer, Choice, FailureKind, Target
from gateway.errors import RoutingError
from gateway.l7.h1proxy import FastServer
from gateway.l7.upstream import UpstreamPool
from gateway.metrics import Flow, GatewayKind, Outcome, flow
from gateway.proto.sni import service_sni
from gateway.retry import RetryBudget, RetryPolicy
from gateway.tlsclient import ClientContexts
from gateway.tunnel.client import TunnelClient
from gateway.vips import resolve

__all__ = ["HttpConfig", "HttpProxy", "clean_request_headers", "clean_response_headers"]

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 hop-by-hop fields, plus the proxy ones; never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
RESERVED_PREFIX = "x-isthmus-"
STREAM_CHUNK = 1 << 16
INLINE_BODY = 1 << 20  # response bodies up to this (with a length) are read whole


@dataclass(frozen=True, slots=True)
class HttpConfig:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    budget_percent: float = 0.2
    budget_min_per_second: float = 10.0
    budget_ttl: float = 10.0
    connect_timeout: float = 5.0
    keepalive_timeout: float = 30.0  # idle upstream connections are closed after this
    max_connections: int = 0  # upstream connections overall; 0 = no limit
    client_keepalive_timeout: float = 75.0  # idle client connections to the VIP
    max_request_line: int = 8190
    max_field_size: int = 8190
    fast_path: bool = True  # h1proxy: raw Protocols; False: every request through aiohttp
    handshake_timeout: float = 10.0  # TLS to a remote ingress (fast path)


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    return {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}


def clean_request_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Forwardable request headers: no hop-by-hop, none named by Connection, no x-isthmus-*."""
    drop = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in HOP_BY_HOP or lk in drop or lk.startswith(RESERVED_PREFIX):
            continue
        out.add(k, v)
    return out


def clean_response_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
) -> CIMultiDict[str]:
    drop = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in HOP_BY_HOP or lk in drop:
            continue
        out.add(k, v)
    return out


class _Retry(Exception):
    """This try failed in a way another target may fix."""

    def __init__(self, outcome: Outcome, status: int, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.status = status


class HttpProxy:
    """The request handler behind every L7 VIP listener of one egress."""

    def __init__(
        self,
        config: HttpConfig,
        tables: TableHolder,
        balancer: Balancer,
        contexts: ClientContexts,
        source_cluster: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
        tunnels: TunnelClient | None = None,
    ) -> None:
        self.config = config
        self._tables = tables
        self.balancer = balancer
        self._contexts = contexts
        self._source = source_cluster
        self.budget = RetryBudget(
            config.budget_percent, config.budget_min_per_second, config.budget_ttl, clock
        )
        self._session: aiohttp.ClientSession | None = None
        self.retries = 0  # retries sent (for status and tests)
        self.upstreams = UpstreamPool(
            contexts,
            config.connect_timeout,
            config.handshake_timeout,
            config.keepalive_timeout,
            tunnels=tunnels,
        )
        self._servers: weakref.WeakSet[FastServer] = weakref.WeakSet()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def tables(self) -> TableHolder:
        return self._tables

    def source_cluster(self) -> str:
        return self._source()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            cfg = self.config
            connector = aiohttp.TCPConnector(
                limit=cfg.max_connections,
                limit_per_host=0,
                keepalive_timeout=cfg.keepalive_timeout,
                use_dns_cache=False,
                enable_cleanup_closed=False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        self.upstreams.close()
        if self._session is not None:
            await self._session.close()

    def drop_gateway(self, gateway: str) -> None:
        """Close idle keep-alive connections to `gateway` (it failed a probe)."""
        self.upstreams.drop_gateway(gateway)

    def make_server(self) -> FastServer | web.Server:
        """The protocol factory of one L7 listener (with `shutdown(timeout)` for its drain)."""
        if not self.config.fast_path:
            return self.make_aiohttp_server()
        server = FastServer(self, self.upstreams, self.make_aiohttp_server)
        self._servers.add(server)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        return server

    async def _sweep_loop(self) -> None:
        cfg = self.config
        period = max(0.5, min(cfg.client_keepalive_timeout, cfg.keepalive_timeout) / 4)
        while True:
            await asyncio.sleep(period)
            for server in list(self._servers):
                server.sweep(cfg.client_keepalive_timeout)
            self.upstreams.sweep()

    def make_aiohttp_server(self) -> web.Server:
        cfg = self.config
        return web.Server(
            self.handle,
            keepalive_timeout=cfg.client_keepalive_timeout,
            max_line_size=cfg.max_request_line,
            max_field_size=cfg.max_field_size,
            access_log=None,
        )

    # --- one request ----------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        table = self._tables.current
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        target = resolve(table, sockname[0], sockname[1]) if sockname else None
        if target is None:
            return _error(404, "no service on this address")
        service = str(target.service)
        policy = self.config.retry
        headers = clean_request_headers(request.headers)
        body: bytes | aiohttp.StreamReader | None = None
        replayable = True
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= policy.max_buffered_body:
                body = await request.read()
            else:
                body, replayable = request.content, False
        retriable = policy.retriable_request(request.method, replayable)
        self.budget.record_request()
        tried: frozenset[Target] = frozenset()
        failure = _Retry(Outcome.NO_HEALTHY_DESTINATION, 503, "no destination")
        for attempt in range(policy.attempts):
            if attempt and not (retriable and self.budget.try_withdraw()):
                break
            try:
                choice = self.balancer.pick(target.route, target.pinned_cluster, exclude=tried)
            except RoutingError as err:
                failure = _Retry(Outcome.NO_HEALTHY_DESTINATION, 503, str(err))
                break
            if attempt:
                self.retries += 1
            tried |= {choice.target}
            try:
                return await self._try(request, choice, target.port_name, headers, body, started)
            except _Retry as retry:
                failure = retry
                log.info(
                    "http try failed",
                    extra={"service": service, "cluster": choice.cluster,
                           "target": choice.target.ident, "attempt": attempt + 1,
                           "outcome": retry.outcome.value, "detail": str(retry)},
                )  # fmt: skip
        source = self._source()
        cluster = target.pinned_cluster or "none"
        flow(GatewayKind.EGRESS, source, service, cluster).request(
            failure.outcome, time.monotonic() - started
        )
        return _error(failure.status, str(failure))

    async def _try(
        self,
        request: web.BaseRequest,
        choice: Choice,
        port_name: str,
        headers: CIMultiDict[str],
        body: bytes | aiohttp.StreamReader | None,
        started: float,
    ) -> web.StreamResponse:
        url, ctx, sni = self._upstream(choice, port_name, request.path_qs)
        balancer = self.balancer
        balancer.begin(choice)
        try:
            try:
                async with asyncio.timeout(self.config.retry.per_try_timeout):
                    upstream = await self.session().request(
                        request.method, url, headers=headers, data=body,
                        allow_redirects=False, ssl=ctx if ctx is not None else True,
                        server_hostname=sni, compress=None, chunked=None,
                    )  # fmt: skip
            except TimeoutError as exc:
                balancer.report_failure(choice, FailureKind.CONNECT)
                raise _Retry(Outcome.CONNECT_TIMEOUT, 504, "upstream timed out") from exc
            except (aiohttp.ClientError, OSError) as exc:
                balancer.report_failure(choice, FailureKind.CONNECT)
                raise _Retry(Outcome.CONNECT_ERROR, 502, f"upstream failed: {exc!r}") from exc
            status = upstream.status
            if status >= 500:
                balancer.report_failure(choice, FailureKind.HTTP_5XX)
                if self.config.retry.retriable_status(status):
                    upstream.release()
                    raise _Retry(Outcome.HTTP_5XX, status, f"upstream answered {status}")
            length = upstream.content_length
            inline = (
                request.method == "HEAD"
                or status in (204, 304)
                or (length is not None and length <= INLINE_BODY)
            )
            data = b""
            if inline and request.method != "HEAD":
                # Nothing went to the client yet: a body cut short may still be retried.
                try:
                    data = await upstream.read()
                except (aiohttp.ClientError, OSError) as exc:
                    upstream.release()
                    balancer.report_failure(choice, FailureKind.CONNECT)
                    raise _Retry(Outcome.RESET, 502, f"upstream body failed: {exc!r}") from exc
            if status < 500:
                balancer.report_success(choice)
            sent = len(body) if isinstance(body, bytes) else 0
            if inline:
                upstream.release()
                return self._inline(upstream, data, choice, sent, started)
            return await self._stream(request, upstream, choice, sent, started)
        finally:
            balancer.end(choice)

    def _upstream(
        self, choice: Choice, port_name: str, path_qs: str
    ) -> tuple[str, ssl.SSLContext | None, str | None]:
        if choice.endpoint is not None:
            ep = choice.endpoint
            port = ep.ports.get(port_name)
            if port is None:
                raise _Retry(Outcome.NO_HEALTHY_DESTINATION, 503, f"{ep.workload_id}: no port")
            host = f"[{ep.address}]" if ":" in ep.address else ep.address
            return f"http://{host}:{port}{path_qs}", None, None
        gateway = choice.gateway
        assert gateway is not None
        table = self._tables.current
        sni = service_sni(port_name, choice.route.service, choice.cluster, table.trust_domain)
        return f"https://{gateway}{path_qs}", self._contexts.for_gateway(gateway), sni

    def _flow_and_outcome(self, choice: Choice, status: int) -> tuple[Flow, Outcome]:
        f = flow(GatewayKind.EGRESS, self._source(), str(choice.route.service), choice.cluster)
        if status < 400:
            return f, Outcome.OK
        return f, Outcome.HTTP_4XX if status < 500 else Outcome.HTTP_5XX

    def _inline(
        self,
        upstream: aiohttp.ClientResponse,
        data: bytes,
        choice: Choice,
        sent: int,
        started: float,
    ) -> web.Response:
        f, outcome = self._flow_and_outcome(choice, upstream.status)
        headers = clean_response_headers(upstream.headers)
        response = web.Response(status=upstream.status, reason=upstream.reason, headers=headers)
        if data:
            response.body = data
        f.request(outcome, time.monotonic() - started)
        if sent:
            f.sent.inc(sent)
        if data:
            f.received.inc(len(data))
        return response

    async def _stream(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        choice: Choice,
        sent: int,
        started: float,
    ) -> web.StreamResponse:
        f, outcome = self._flow_and_outcome(choice, upstream.status)
        headers = clean_response_headers(upstream.headers)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=headers)  # fmt: skip
        received = 0
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(STREAM_CHUNK):
                received += len(chunk)
                await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # The response broke after its headers went out: too late to retry.
            f.request(Outcome.RESET, time.monotonic() - started)
            log.info(
                "http response broke",
                extra={"service": str(choice.route.service), "cluster": choice.cluster,
                       "error": repr(exc)},
            )  # fmt: skip
            raise
        finally:
            upstream.release()
        f.request(outcome, time.monotonic() - started)
        f.sent.inc(sent)
        f.received.inc(received)
        return response


def _error(status: int, detail: str) -> web.Response:
    return web.Response(
        status=status,
        text=f"isthmus: {detail}\n",
        headers={"x-isthmus-error": detail[:200].replace("\r", " ").replace("\n", " ")},
    )
