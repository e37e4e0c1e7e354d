"""The L7 fast path: HTTP/1.1 forwarding on raw asyncio Protocols, without aiohttp.

Per request the client's head is parsed once (`h1.parse_request_head`), its header block
cleaned by dropping lines, and the request (head + buffered body) written to a keep-alive
upstream connection (`h1upstream`): plain TCP to a local endpoint, or a pooled mutual-TLS
tunnel to the remote ingress with the service SNI. The response head is parsed, cleaned and
written back, its body either collected (when small enough to allow a retry) or written to the
client as it arrives. Retries, the per-try timeout, the retry budget and outlier reports are
those of the aiohttp path (`http.HttpProxy`), with the same outcomes and metrics.

What the fast path does not handle is handed, with the bytes read so far, to the aiohttp
server of `http.HttpProxy` for the rest of the connection: HTTP/1.0, upgrades and CONNECT,
chunked request bodies and request bodies above the retry buffer. `Expect: 100-continue` is
answered by the proxy itself (the body is buffered here), and the field is not forwarded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from discovery.addresses import split_host_port
from federation.routing import RoutingTable
from gateway.balancer import Choice, FailureKind, Target
from gateway.errors import RoutingError, UpstreamError
from gateway.l7.upstream import Exchange, UpstreamConn, UpstreamKey, UpstreamPool
from gateway.metrics import Flow, GatewayKind, Outcome, flow
from gateway.proto.h1 import BodyKind, H1Error, RequestHead, parse_request_head
from gateway.proto.sni import service_sni
from gateway.vips import Resolved, resolve

if TYPE_CHECKING:
    from aiohttp import web


__all__ = ["FastServer", "error_response"]

log = logging.getLogger(__name__)

INLINE_BODY = 1 << 20  # response bodies up to this (with a length) are read whole: retriable
READ_LIMIT = 1 << 20  # bytes buffered from a client while a request is in flight
_CLOSE = b"Connection: close\r\n\r\n"


class _Retry(Exception):
    def __init__(self, outcome: Outcome, status: int, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.status = status


def error_response(status: int, detail: str, head_only: bool = False, close: bool = False) -> bytes:
    """An answer of the gateway itself, with the `x-isthmus-error` header."""
    body = f"isthmus: {detail}\n".encode()
    header = detail[:200].replace("\r", " ").replace("\n", " ").encode("ascii", "replace")
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Error"
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"x-isthmus-error: %s\r\n" % (status, reason, len(body), header)
    )
    head += b"Connection: close\r\n\r\n" if close else b"\r\n"
    return head if head_only else head + body


class _Client(asyncio.Protocol):
    """One client connection on a VIP listener."""

    __slots__ = (
        "buf", "close_after", "continued", "flight", "handed_off", "idle_since", "paused",
        "resolved", "server", "sockname", "streaming", "task", "transport",
    )  # fmt: skip

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.sockname: tuple[str, int] | None = None
        self.buf = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.flight: _Flight | None = None  # a request on the fast path (no task)
        self.paused = False
        self.close_after = False
        self.continued = False  # 100 Continue sent for the request being read
        self.handed_off = False
        self.streaming: UpstreamConn | None = None
        self.idle_since = time.monotonic()
        self.resolved: tuple[RoutingTable, Resolved | None] | None = None  # per table

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sockname = transport.get_extra_info("sockname")
        self.sockname = (sockname[0], sockname[1]) if sockname else None
        self.server.clients.add(self)

    @property
    def busy(self) -> bool:
        """A request is in flight (on the fast path or in a task)."""
        return self.task is not None or self.flight is not None

    def data_received(self, data: bytes) -> None:
        if not self.buf and self.task is None and self.flight is None and self._whole(data):
            return
        self.buf += data
        if self.task is None and self.flight is None:
            self._next()
        elif len(self.buf) > READ_LIMIT and not self.paused:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.close_after = True
        if not self.busy:
            self._next()
            if not self.busy and not self.handed_off:
                self.transport.close()  # type: ignore[union-attr]
        return True  # keep the write side open for the answer in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.clients.discard(self)
        if self.task is not None:
            self.task.cancel()
        if self.flight is not None:
            self.flight.cancel()

    def pause_writing(self) -> None:
        if self.streaming is not None:
            self.streaming.pause_reading()

    def resume_writing(self) -> None:
        if self.streaming is not None:
            self.streaming.resume_reading()

    # --- requests -------------------------------------------------------------------------

    def _whole(self, data: bytes) -> bool:
        """The usual read: exactly one bodiless request. Start it without buffering; False
        leaves `data` to the general path (which also reports errors)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.handed_off:
            return False
        try:
            head = parse_request_head(data, self.server.max_head)
        except H1Error:
            return False
        if (
            head is None or head.size != len(data) or head.body is not BodyKind.NONE
            or head.version != b"HTTP/1.1" or head.upgrade
        ):  # fmt: skip
            return False
        self._start(head, b"")
        return True

    def _next(self) -> None:
        """Start the next complete request in the buffer, if any."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.handed_off:
            return
        if not self.buf:
            self._resume()
            return
        try:
            head = parse_request_head(self.buf, self.server.max_head)
        except H1Error as err:
            self._refuse(err.status, str(err))
            return
        if head is None:
            self._resume()
            return
        if (
            head.version != b"HTTP/1.1" or head.upgrade
            or head.body is BodyKind.CHUNKED or head.length > self.server.max_buffered_body
        ):  # fmt: skip
            self._hand_off()
            return
        end = head.size + head.length
        if len(self.buf) < end:
            if head.expect_continue and not self.continued:
                # The body is buffered here (retries need it): ask for it now.
                self.continued = True
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._resume()
            return
        body = bytes(self.buf[head.size : end]) if head.length else b""
        del self.buf[:end]
        self._start(head, body)

    def _start(self, head: RequestHead, body: bytes) -> None:
        """Serve a complete request: on the fast path if it can, else in a task."""
        self.continued = False
        if not head.keep_alive or self.server.closing:
            self.close_after = True
        if not self.server.start_flight(self, head, body):
            self.run(self.server.forward(self, head, body))

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Serve the current request in a task (dialling, retries, big bodies)."""
        self.task = asyncio.get_running_loop().create_task(coro)
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("http fast path failed", extra={"error": repr(task.exception())})
            self.transport.abort()  # type: ignore[union-attr]
            return
        self.request_done()

    def request_done(self) -> None:
        """The response went out: close, or start the next request already buffered."""
        self.idle_since = time.monotonic()
        if self.close_after or self.server.closing:
            self.transport.close()  # type: ignore[union-attr]
            return
        self._next()

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _refuse(self, status: int, detail: str) -> None:
        self.transport.write(error_response(status, detail, close=True))  # type: ignore[union-attr]
        self.transport.close()  # type: ignore[union-attr]

    def _hand_off(self) -> None:
        """The rest of this connection goes to the aiohttp server."""
        transport = self.transport
        assert transport is not None
        self.handed_off = True
        self.server.clients.discard(self)
        protocol = self.server.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self.buf = bytes(self.buf), bytearray()
        self._resume()
        if data:
            protocol.data_received(data)

    def target(self, table: RoutingTable) -> Resolved | None:
        """What this connection's VIP and port are for, in `table` (cached per table)."""
        cached = self.resolved
        if cached is not None and cached[0] is table:
            return cached[1]
        target = resolve(table, *self.sockname) if self.sockname else None
        self.resolved = (table, target)
        return target

    def write_response(self, head: bytes, body: bytes = b"") -> None:
        """The response head (and body), in one write: one syscall per small response."""
        if self.close_after and not head.endswith(_CLOSE):
            head = head[:-2] + _CLOSE
        self.transport.write(head + body if body else head)  # type: ignore[union-attr]


class FastServer:
    """Protocol factory for the L7 VIP listeners of one egress, and their drain."""

    def __init__(
        self,
        proxy: Any,  # gateway.l7.http.HttpProxy (not imported: no cycle)
        upstreams: UpstreamPool,
        fallback: Callable[[], web.Server],
    ) -> None:
        self.proxy = proxy
        self.upstreams = upstreams
        self._fallback_factory = fallback
        self._fallback: web.Server | None = None
        cfg = proxy.config
        self.max_head = cfg.max_request_line + cfg.max_field_size
        self.max_buffered_body = cfg.retry.max_buffered_body
        self.clients: set[_Client] = set()
        self.closing = False
        self._keys: dict[tuple[Target, str], tuple[UpstreamKey, Flow]] = {}
        self._keys_table: RoutingTable | None = None
        self.flights: set[_Flight] = set()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._tick = min(1.0, cfg.retry.per_try_timeout / 4)

    def __call__(self) -> _Client:
        return _Client(self)

    def fallback(self) -> asyncio.Protocol:
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        return self._fallback()  # type: ignore[no-any-return]

    def sweep(self, keepalive_timeout: float) -> None:
        """Close client connections idle (or stuck in a partial head) for too long."""
        now = time.monotonic()
        for client in list(self.clients):
            if not client.busy and now - client.idle_since > keepalive_timeout:
                if client.transport is not None:
                    client.transport.close()
                self.clients.discard(client)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now; requests in flight get `timeout` seconds."""
        self.closing = True
        for client in list(self.clients):
            if not client.busy and client.transport is not None:
                client.transport.close()
        waits = []
        if self._fallback is not None:
            waits.append(self._fallback.shutdown(timeout))
        waits.append(self._wait_clients(timeout))
        await asyncio.gather(*waits, return_exceptions=True)

    async def _wait_clients(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(c.busy for c in self.clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for client in list(self.clients):
            if client.task is not None:
                client.task.cancel()
            if client.flight is not None:
                client.flight.cancel()
            if client.transport is not None:
                client.transport.abort()
        self.clients.clear()

    # --- one request, fast path ---------------------------------------------------------

    def start_flight(self, client: _Client, head: RequestHead, body: bytes) -> bool:
        """Send the request on an idle keep-alive connection, driven by callbacks (no task,
        no future, no timer of its own). False: not possible here (no idle connection to the
        chosen target, nothing routable): the caller runs `forward` in a task instead."""
        proxy = self.proxy
        target = client.target(proxy.tables.current)
        if target is None:
            return False
        balancer = proxy.balancer
        try:
            choice = balancer.pick(target.route, target.pinned_cluster)
            key, f = self._key(choice, target.port_name)
        except (RoutingError, _Retry):
            return False
        conn = self.upstreams.take(key)
        if conn is None:
            return False
        proxy.budget.record_request()
        balancer.begin(choice)
        flight = _Flight(self, client, head, body, choice, conn, f)
        client.flight = flight
        self.flights.add(flight)
        if self._deadline_timer is None:
            self._deadline_timer = asyncio.get_running_loop().call_later(
                self._tick, self._check_deadlines
            )
        flight.ex = conn.start(head.method, head.forward + body if body else head.forward, flight)
        return True

    def _check_deadlines(self) -> None:
        """Per-try timeouts of fast-path requests, checked a few times per timeout period."""
        self._deadline_timer = None
        now = time.monotonic()
        for flight in [f for f in self.flights if f.deadline < now and not f.streaming]:
            flight.timed_out()
        if self.flights:
            self._deadline_timer = asyncio.get_running_loop().call_later(
                self._tick, self._check_deadlines
            )

    # --- one request ----------------------------------------------------------------------

    async def forward(
        self,
        client: _Client,
        head: RequestHead,
        body: bytes,
        started: float | None = None,
        first: tuple[Target, _Retry] | None = None,
    ) -> None:
        """Serve one request with retries; `first` is a try that already failed (fast path)."""
        started = time.monotonic() if started is None else started
        proxy = self.proxy
        table = proxy.tables.current
        target = client.target(table)
        head_only = head.method == "HEAD"
        if target is None:
            client.close_after = True
            client.transport.write(  # type: ignore[union-attr]
                error_response(404, "no service on this address", head_only, True)
            )
            return
        policy = proxy.config.retry
        retriable = policy.retriable_request(head.method, True)
        tried: frozenset[Target] = frozenset()
        failure = _Retry(Outcome.NO_HEALTHY_DESTINATION, 503, "no destination")
        if first is None:
            proxy.budget.record_request()
        else:
            tried, failure = frozenset({first[0]}), first[1]
        for attempt in range(0 if first is None else 1, policy.attempts):
            if attempt and not (retriable and proxy.budget.try_withdraw()):
                break
            try:
                choice = proxy.balancer.pick(target.route, target.pinned_cluster, exclude=tried)
            except RoutingError as err:
                failure = _Retry(Outcome.NO_HEALTHY_DESTINATION, 503, str(err))
                break
            if attempt:
                proxy.retries += 1
            tried |= {choice.target}
            try:
                await self._try(client, head, body, choice, target.port_name, started)
                return
            except _Retry as retry:
                failure = retry
                log.info(
                    "http try failed",
                    extra={"service": str(target.service), "cluster": choice.cluster,
                           "target": choice.target.ident, "attempt": attempt + 1,
                           "outcome": retry.outcome.value, "detail": str(retry)},
                )  # fmt: skip
        source = proxy.source_cluster()
        cluster = target.pinned_cluster or "none"
        flow(GatewayKind.EGRESS, source, str(target.service), cluster).request(
            failure.outcome, time.monotonic() - started
        )
        client.transport.write(  # type: ignore[union-attr]
            error_response(failure.status, str(failure), head_only, client.close_after)
        )

    def _key(self, choice: Choice, port_name: str) -> tuple[UpstreamKey, Flow]:
        """Where `choice` is reached, and its metrics (cached per routing table)."""
        table = self.proxy.tables.current
        if table is not self._keys_table:  # SNIs and addresses follow the table
            self._keys.clear()
            self._keys_table = table
        found = self._keys.get((choice.target, port_name))
        if found is None:
            f = flow(GatewayKind.EGRESS, self.proxy.source_cluster(), str(choice.route.service),
                     choice.cluster)  # fmt: skip
            found = (self._make_key(choice, port_name, table), f)
            self._keys[(choice.target, port_name)] = found
        return found

    def _make_key(self, choice: Choice, port_name: str, table: RoutingTable) -> UpstreamKey:
        if choice.endpoint is not None:
            ep = choice.endpoint
            port = ep.ports.get(port_name)
            if port is None:
                raise _Retry(Outcome.NO_HEALTHY_DESTINATION, 503, f"{ep.workload_id}: no port")
            return UpstreamKey(ep.address, port)
        gateway = choice.gateway
        assert gateway is not None
        sni = service_sni(port_name, choice.route.service, choice.cluster, table.trust_domain)
        host, port = split_host_port(gateway)
        return UpstreamKey(host, port, gateway, sni, choice.cluster, table.trust_domain)

    async def _try(
        self,
        client: _Client,
        head: RequestHead,
        body: bytes,
        choice: Choice,
        port_name: str,
        started: float,
    ) -> None:
        key, f = self._key(choice, port_name)
        proxy = self.proxy
        balancer = proxy.balancer
        upstreams = self.upstreams
        balancer.begin(choice)
        conn: UpstreamConn | None = None
        ex: Exchange | None = None
        try:
            try:
                async with asyncio.timeout(proxy.config.retry.per_try_timeout):
                    conn = upstreams.take(key) or await upstreams.dial(key)
                    ex = conn.start(head.method, head.forward + body if body else head.forward)
                    rhead = await ex.head_ready
                    inline = rhead.body is BodyKind.NONE or (
                        rhead.body is BodyKind.LENGTH and rhead.length <= INLINE_BODY
                    )
                    if rhead.status >= 500:
                        balancer.report_failure(choice, FailureKind.HTTP_5XX)
                        if proxy.config.retry.retriable_status(rhead.status):
                            raise _Retry(Outcome.HTTP_5XX, rhead.status,
                                         f"upstream answered {rhead.status}")  # fmt: skip
                    data = await ex.collect() if inline else b""
            except TimeoutError as exc:
                balancer.report_failure(choice, FailureKind.CONNECT)
                raise _Retry(Outcome.CONNECT_TIMEOUT, 504, "upstream timed out") from exc
            except (UpstreamError, H1Error, OSError) as exc:
                balancer.report_failure(choice, FailureKind.CONNECT)
                if ex is not None and ex.head is not None:  # the body broke
                    raise _Retry(Outcome.RESET, 502, f"upstream body failed: {exc!r}") from exc
                raise _Retry(Outcome.CONNECT_ERROR, 502, f"upstream failed: {exc!r}") from exc
            status = rhead.status
            if status < 500:
                balancer.report_success(choice)
            outcome = (
                Outcome.OK if status < 400
                else Outcome.HTTP_4XX if status < 500 else Outcome.HTTP_5XX
            )  # fmt: skip
            if rhead.body is BodyKind.UNTIL_CLOSE:
                client.close_after = True
            if inline:
                client.write_response(rhead.forward, data if head.method != "HEAD" else b"")
            else:
                client.write_response(rhead.forward)
                client.streaming = conn
                try:
                    complete = await ex.stream_to(client.transport)  # type: ignore[arg-type]
                finally:
                    client.streaming = None
                if not complete:
                    # The response broke after its head went out: too late to retry.
                    f.request(Outcome.RESET, time.monotonic() - started)
                    log.info(
                        "http response broke",
                        extra={"service": str(choice.route.service), "cluster": choice.cluster},
                    )
                    client.close_after = True
                    client.transport.abort()  # type: ignore[union-attr]
                    return
            f.request(outcome, time.monotonic() - started, len(body), ex.received)
        finally:
            balancer.end(choice)
            if conn is not None:
                upstreams.release(conn, ex is not None and ex.reusable)


def _outcome(status: int) -> Outcome:
    if status < 400:
        return Outcome.OK
    return Outcome.HTTP_4XX if status < 500 else Outcome.HTTP_5XX


class _Flight:
    """One request on the fast path: the exchange's callbacks drive it to its end.

    Anything but a plain success leaves the fast path: a failure or a retriable 5xx before
    the response went out hands the request to `FastServer.forward` (in a task) as a first
    try that failed, so retries, the budget and the final error answer are the slow path's."""

    __slots__ = (
        "body", "choice", "client", "conn", "deadline", "ex", "flow", "head", "server", "started",
        "streaming",
    )  # fmt: skip

    def __init__(
        self,
        server: FastServer,
        client: _Client,
        head: RequestHead,
        body: bytes,
        choice: Choice,
        conn: UpstreamConn,
        f: Flow,
    ) -> None:
        self.server = server
        self.flow = f
        self.client = client
        self.head = head
        self.body = body
        self.choice = choice
        self.conn = conn
        self.ex: Exchange | None = None
        self.started = time.monotonic()
        self.deadline = self.started + server.proxy.config.retry.per_try_timeout
        self.streaming = False  # the response head went out; its body follows as it comes

    # --- exchange callbacks ---------------------------------------------------------------

    def on_head(self, ex: Exchange) -> None:
        rhead = ex.head
        assert rhead is not None
        proxy = self.server.proxy
        if rhead.status >= 500:
            proxy.balancer.report_failure(self.choice, FailureKind.HTTP_5XX)
            if proxy.config.retry.retriable_status(rhead.status):
                ex.abandon()
                self._retry(_Retry(Outcome.HTTP_5XX, rhead.status,
                                   f"upstream answered {rhead.status}"))  # fmt: skip
                return
        if rhead.body is BodyKind.UNTIL_CLOSE:
            self.client.close_after = True
        inline = rhead.body is BodyKind.NONE or (
            rhead.body is BodyKind.LENGTH and rhead.length <= INLINE_BODY
        )
        if not inline:
            client = self.client
            client.write_response(rhead.forward)
            self.streaming = True
            client.streaming = self.conn
            ex.set_sink(client.transport)

    def on_done(self, ex: Exchange, complete: bool) -> None:
        if not complete:
            self.on_fail(ex, UpstreamError("the response body was cut short"))
            return
        rhead = ex.head
        assert rhead is not None
        client = self.client
        proxy = self.server.proxy
        choice = self.choice
        if rhead.status < 500:
            proxy.balancer.report_success(choice)
        if self.streaming:
            client.streaming = None
            ex.set_sink(None)
        else:
            client.write_response(
                rhead.forward, ex.take_body() if self.head.method != "HEAD" else b""
            )
        self.flow.request(
            _outcome(rhead.status), time.monotonic() - self.started, len(self.body), ex.received
        )
        self._end(ex.reusable)
        client.request_done()

    def on_fail(self, ex: Exchange, exc: Exception) -> None:
        self.server.proxy.balancer.report_failure(self.choice, FailureKind.CONNECT)
        if self.streaming:
            self._broke()
            return
        if ex.head is not None:
            self._retry(_Retry(Outcome.RESET, 502, f"upstream body failed: {exc!r}"))
        else:
            self._retry(_Retry(Outcome.CONNECT_ERROR, 502, f"upstream failed: {exc!r}"))

    # --- endings ----------------------------------------------------------------------------

    def timed_out(self) -> None:
        if self.ex is not None:
            self.ex.abandon()
        self.server.proxy.balancer.report_failure(self.choice, FailureKind.CONNECT)
        self._retry(_Retry(Outcome.CONNECT_TIMEOUT, 504, "upstream timed out"))

    def cancel(self) -> None:
        """The client went away."""
        if self.ex is not None:
            self.ex.abandon()
        self._end(False)

    def _broke(self) -> None:
        """The response broke after its head went out: too late to retry."""
        client = self.client
        client.streaming = None
        choice = self.choice
        self.flow.request(Outcome.RESET, time.monotonic() - self.started)
        log.info(
            "http response broke",
            extra={"service": str(choice.route.service), "cluster": choice.cluster},
        )
        self._end(False)
        client.close_after = True
        client.transport.abort()  # type: ignore[union-attr]

    def _retry(self, failure: _Retry) -> None:
        if self.client.flight is not self:
            return  # the client went away meanwhile
        choice = self.choice
        log.info(
            "http try failed",
            extra={"service": str(choice.route.service), "cluster": choice.cluster,
                   "target": choice.target.ident, "attempt": 1,
                   "outcome": failure.outcome.value, "detail": str(failure)},
        )  # fmt: skip
        self._end(False)
        client = self.client
        if client.transport is None or client.transport.is_closing():
            return
        client.run(self.server.forward(client, self.head, self.body, self.started,
                                       (choice.target, failure)))  # fmt: skip

    def _end(self, reusable: bool) -> None:
        server = self.server
        if self.client.flight is not self:
            return  # ended already
        self.client.flight = None
        server.flights.discard(self)
        server.proxy.balancer.end(self.choice)
        server.upstreams.release(self.conn, reusable)
