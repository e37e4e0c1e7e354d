"""The HTTP/1.1 engine of the egress's L7 ports, sans-IO: events in, commands out.

One `H1Engine` serves one client connection, in the manner of h11's `_state.py` and
mitmproxy's proxy layers: every event (bytes from the client or the upstream, an upstream
that connected or failed, an end of either side, the clock passing a deadline) is a method
that returns the commands to carry out, as tuples whose first item is a `Cmd`:

    (Cmd.WRITE_CLIENT, data)        (Cmd.OPEN_UPSTREAM, key)       (Cmd.WRITE_UPSTREAM, data)
    (Cmd.RELEASE_UPSTREAM, reusable) (Cmd.CLOSE_CLIENT, abort)     (Cmd.ARM_DEADLINE, when)
    (Cmd.PAUSE_CLIENT,)  (Cmd.RESUME_CLIENT,)  (Cmd.EOF_CLIENT,)  (Cmd.EOF_UPSTREAM,)

It never touches a socket, a loop or a timer; time comes from the injected clock, and a
deadline is a number the shell (`gateway.l7.shell`) compares the clock with. A connection
has at most one upstream at a time, so the commands need no connection ids: OPEN_UPSTREAM
is answered by `upstream_connected` or `upstream_failed`, and after RELEASE_UPSTREAM the
shell delivers nothing more from that upstream.

The engine alone owns, for every request on the egress's HTTP ports:
- framing (`gateway.proto.h1`) and keep-alive, pipelining, HTTP/1.0 (served, then closed);
- `Expect: 100-continue` (answered by the proxy; the field is not forwarded);
- retries: an idempotent request with a buffered body is tried again on another target
  after a connect failure, a broken response before anything went to the client, a per-try
  timeout (connect + response head + a body read whole), or a 502/503/504; at most
  `retry.attempts` tries and within the `RetryBudget`;
- bodies that cannot be retried: chunked request bodies and bodies above
  `retry.max_buffered_body` stream to the upstream as they come, tried once;
- upgrades: `Connection: upgrade` is forwarded with its `Upgrade`; after a 101 the
  connection is relayed as bytes both ways (L4). CONNECT is refused (501);
- outlier outcomes (the balancer's begin/end, success, failure), the request metrics, the
  stripping of hop-by-hop and `x-isthmus-*` fields, and the gateway's error answers (with
  `x-isthmus-error`).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import NamedTuple

from discovery.addresses import split_host_port
from federation.routing import RoutingTable, TableHolder
from gateway.balancer import Balancer, Choice, FailureKind, Target
from gateway.errors import RoutingError
from gateway.l7.config import HttpConfig
from gateway.metrics import Flow, GatewayKind, Outcome, flow
from gateway.proto.h1 import (
    BodyKind,
    BodyScanner,
    H1Error,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
    upgrade_forward,
)
from gateway.proto.sni import service_sni
from gateway.retry import RetryBudget
from gateway.vips import Resolved, resolve

__all__ = ["Cmd", "Command", "H1Engine", "H1Proxy", "Phase", "UpstreamKey", "error_response"]

log = logging.getLogger(__name__)


class Cmd(enum.Enum):
    WRITE_CLIENT = "write_client"  # (cmd, bytes)
    OPEN_UPSTREAM = "open_upstream"  # (cmd, UpstreamKey): an idle one or a new one
    WRITE_UPSTREAM = "write_upstream"  # (cmd, bytes)
    RELEASE_UPSTREAM = "release_upstream"  # (cmd, reusable): back to the pool, or closed
    CLOSE_CLIENT = "close_client"  # (cmd, abort): after flushing, or now
    ARM_DEADLINE = "arm_deadline"  # (cmd, when | None): call `timer` once the clock is past
    PAUSE_CLIENT = "pause_client"  # (cmd,): stop reading the client
    RESUME_CLIENT = "resume_client"  # (cmd,)
    EOF_CLIENT = "eof_client"  # (cmd,): no more bytes to the client (upgraded connections)
    EOF_UPSTREAM = "eof_upstream"  # (cmd,)


Command = tuple  # (Cmd, *args): plain tuples, built at the speed of a tuple display


class Phase(enum.Enum):
    IDLE = "idle"  # no request: reading a request head
    BODY = "body"  # reading a request body that is buffered (so the request can be retried)
    CONNECTING = "connecting"  # a try opens its upstream
    WAITING = "waiting"  # the request went upstream; waiting for the response head
    COLLECTING = "collecting"  # reading a small response body whole: still retriable
    RELAYING = "relaying"  # the response head went to the client; its body follows
    TUNNEL = "tunnel"  # after 101 Switching Protocols: bytes both ways
    CLOSED = "closed"


class UpstreamKey(NamedTuple):  # a dict key on every request: hashed in C
    host: str
    port: int
    gateway: str | None = None  # "host:port" of a remote ingress (TLS), None for plain TCP
    sni: str | None = None
    cluster: str | None = None
    trust_domain: str | None = None


_CLOSE = b"Connection: close\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HTTP11 = b"HTTP/1.1"
_NONE = BodyKind.NONE
_LENGTH = BodyKind.LENGTH
_UNTIL_CLOSE = BodyKind.UNTIL_CLOSE
(
    WRITE_CLIENT, OPEN_UPSTREAM, WRITE_UPSTREAM, RELEASE_UPSTREAM, CLOSE_CLIENT, ARM_DEADLINE,
    PAUSE_CLIENT, RESUME_CLIENT, EOF_CLIENT, EOF_UPSTREAM,
) = tuple(Cmd)  # fmt: skip
IDLE, BODY, CONNECTING, WAITING, COLLECTING, RELAYING, TUNNEL, CLOSED = tuple(Phase)


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
    head += _CLOSE if close else b"\r\n"
    return head if head_only else head + body


def _outcome(status: int) -> Outcome:
    if status < 400:
        return Outcome.OK
    return Outcome.HTTP_4XX if status < 500 else Outcome.HTTP_5XX


class _NoPort(Exception):
    """The chosen endpoint has no port of that name: a failed try (503)."""


class H1Proxy:
    """What every connection's engine on one egress shares (sans-IO as well): the settings,
    the routing tables, the balancer, the retry budget, the clock, and where each target is
    reached (cached per routing table)."""

    def __init__(
        self,
        config: HttpConfig,
        tables: TableHolder,
        balancer: Balancer,
        source_cluster: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.tables = tables
        self.balancer = balancer
        self.source_cluster = source_cluster
        self.clock = clock
        self.budget = RetryBudget(
            config.budget_percent, config.budget_min_per_second, config.budget_ttl, clock
        )
        self.policy = config.retry
        self.max_head = config.max_request_line + config.max_field_size
        self.retries = 0  # retries sent (for status and tests)
        self._keys: dict[tuple[Target, str], tuple[UpstreamKey, Flow]] = {}
        self._keys_table: RoutingTable | None = None

    def key(self, choice: Choice, port_name: str) -> tuple[UpstreamKey, Flow]:
        """Where `choice` is reached, and its metrics (cached per routing table: SNIs and
        addresses follow the table). Raises _NoPort."""
        table = self.tables.current
        if table is not self._keys_table:
            self._keys.clear()
            self._keys_table = table
        found = self._keys.get((choice.target, port_name))
        if found is None:
            f = flow(GatewayKind.EGRESS, self.source_cluster(), str(choice.route.service),
                     choice.cluster)  # fmt: skip
            found = (self._make_key(choice, port_name, table), f)
            self._keys[(choice.target, port_name)] = found
        return found

    @staticmethod
    def _make_key(choice: Choice, port_name: str, table: RoutingTable) -> UpstreamKey:
        if choice.endpoint is not None:
            ep = choice.endpoint
            port = ep.ports.get(port_name)
            if port is None:
                raise _NoPort(f"{ep.workload_id} has no port {port_name}")
            return UpstreamKey(ep.address, port)
        gateway = choice.gateway
        assert gateway is not None
        sni = service_sni(port_name, choice.route.service, choice.cluster, table.trust_domain)
        host, port = split_host_port(gateway)
        return UpstreamKey(host, port, gateway, sni, choice.cluster, table.trust_domain)


class H1Engine:
    """One client connection on an L7 VIP listener (see the module docstring)."""

    __slots__ = (
        "_resolved", "attempt", "body", "buf", "choice", "close_after", "continued", "deadline",
        "eof", "failure", "flow", "head", "local", "parts", "paused", "phase", "proxy", "rbuf",
        "received", "request", "retriable", "reusable", "rhead", "scanner", "started",
        "tried", "tunnel_eof", "up_body",
    )  # fmt: skip

    def __init__(self, proxy: H1Proxy, local: tuple[str, int] | None) -> None:
        self.proxy = proxy
        self.local = local  # the VIP and port the client connected to: what it wants
        self._resolved: tuple[RoutingTable, Resolved | None] | None = None
        self.phase = IDLE
        self.buf = bytearray()  # client bytes not taken yet
        self.eof = False  # the client sent its EOF
        self.close_after = False  # close the client once the current answer is out
        self.paused = False  # PAUSE_CLIENT in force
        self.deadline: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.head: RequestHead | None = None
        self.body = b""  # the buffered request body
        self.request = b""  # what each try sends: the cleaned head and the buffered body
        self.up_body: BodyScanner | None = None  # a request body that streams upstream
        self.continued = False  # 100 Continue sent for this request
        self.retriable = False
        self.started = 0.0
        self.attempt = 0
        self.tried: frozenset[Target] = frozenset()
        self.choice: Choice | None = None
        self.flow: Flow | None = None
        self.failure = (Outcome.NO_HEALTHY_DESTINATION, 503, "no destination")
        self._reset_response()
        self.tunnel_eof = 0  # after a 101: 1 client EOF, 2 upstream EOF, 3 both

    def _reset_response(self) -> None:
        self.rbuf = bytearray()
        self.rhead: ResponseHead | None = None
        self.scanner: BodyScanner | None = None
        self.parts: list[bytes] = []
        self.received = 0
        self.reusable = True  # no bytes beyond the response, no upgrade

    # --- events from the client -----------------------------------------------------------

    def start(self) -> list[Command]:
        """The client connected: a request head must come within the keep-alive timeout."""
        proxy = self.proxy
        self.deadline = proxy.clock() + proxy.config.client_keepalive_timeout
        return [(ARM_DEADLINE, self.deadline)]

    def client_data(self, data: bytes) -> list[Command]:
        phase = self.phase
        if phase is IDLE:
            if not self.buf:
                # The usual read: exactly one bodiless request, parsed where it lies.
                try:
                    head = parse_request_head(data, self.proxy.max_head)
                except H1Error as err:
                    return self._refuse(err.status, str(err))
                if (
                    head is not None and head.size == len(data) and head.body is _NONE
                    and not head.upgrade
                ):  # fmt: skip
                    return self._begin(head, b"", data)
            self.buf += data
            return self._next()
        if phase is TUNNEL:
            return [(WRITE_UPSTREAM, data)]
        if phase is CLOSED:
            return []
        up_body = self.up_body
        if up_body is not None and phase is not CONNECTING:
            return self._stream_up(data)
        self.buf += data
        if phase is BODY:
            return self._next()
        if len(self.buf) > self.proxy.config.read_limit and not self.paused:
            self.paused = True
            return [(PAUSE_CLIENT,)]
        return []

    def client_eof(self) -> list[Command]:
        self.eof = True
        self.close_after = True
        phase = self.phase
        if phase is TUNNEL:
            return self._tunnel_eof(1, [(EOF_UPSTREAM,)])
        if phase is IDLE:
            out = self._next()
            if self.phase is IDLE:
                out.append((CLOSE_CLIENT, False))
                self.phase = CLOSED
            return out
        if phase is BODY:  # the request cannot be complete
            self.phase = CLOSED
            return [(CLOSE_CLIENT, False)]
        if self.up_body is not None and not self.up_body.done and phase is not CONNECTING:
            return self._abandon("the client closed inside its request body", blame=False)
        return []  # the request is complete: its answer goes out, then the connection closes

    def client_lost(self) -> list[Command]:
        """The client connection is gone: give up whatever is in flight."""
        out: list[Command] = []
        if self.choice is not None:
            self.proxy.balancer.end(self.choice)
            self.choice = None
            out.append((RELEASE_UPSTREAM, False))
        elif self.phase is TUNNEL:
            out.append((RELEASE_UPSTREAM, False))
        self.phase = CLOSED
        return out

    def drain(self) -> list[Command]:
        """The listener is shutting down: close now if idle, else after this answer."""
        self.close_after = True
        if self.phase is IDLE and not self.buf:
            self.phase = CLOSED
            return [(CLOSE_CLIENT, False)]
        return []

    def timer(self, now: float) -> list[Command]:
        deadline = self.deadline
        if deadline is None or now < deadline:
            return []
        self.deadline = None
        phase = self.phase
        if phase is IDLE or phase is BODY:
            self.phase = CLOSED
            return [(CLOSE_CLIENT, False)]
        if phase is CONNECTING or phase is WAITING or phase is COLLECTING:
            if self.up_body is not None:  # a streamed request: nothing can be tried again
                return self._abandon("upstream timed out", Outcome.CONNECT_TIMEOUT, 504)
            return self._try_failed(Outcome.CONNECT_TIMEOUT, 504, "upstream timed out")
        return []

    # --- events from the upstream ---------------------------------------------------------

    def upstream_connected(self) -> list[Command]:
        if self.phase is not CONNECTING:
            return [(RELEASE_UPSTREAM, False)]
        self.phase = WAITING
        if self.up_body is None:
            return [(WRITE_UPSTREAM, self.request)]
        head = self.head
        assert head is not None
        out: list[Command] = [(WRITE_UPSTREAM, self.request)]
        if head.expect_continue and not self.continued:
            self.continued = True
            out.append((WRITE_CLIENT, _CONTINUE))
        buffered, self.buf = bytes(self.buf), bytearray()
        if buffered:
            out += self._stream_up(buffered)
        if not self.up_body.done:
            if self.eof:  # the client closed before its body was complete
                return out + self._abandon("the client closed inside its request body",
                                           blame=False)  # fmt: skip
            # However long the body takes to come, it is not the upstream's time: the per-try
            # deadline starts once the body is all sent (`_stream_up`).
            self.deadline = None
            out.append((ARM_DEADLINE, None))
        if self.paused and len(self.buf) <= self.proxy.config.read_limit:
            self.paused = False
            out.append((RESUME_CLIENT,))
        return out

    def upstream_failed(self, detail: str) -> list[Command]:
        """The upstream could not be opened (refused, timed out, TLS failed)."""
        if self.phase is not CONNECTING:
            return []
        if self.up_body is not None:
            return self._abandon(f"upstream failed: {detail}", Outcome.CONNECT_ERROR, 502,
                                 release=False)  # fmt: skip
        return self._try_failed(Outcome.CONNECT_ERROR, 502, f"upstream failed: {detail}",
                                release=False)  # fmt: skip

    def upstream_data(self, data: bytes) -> list[Command]:
        phase = self.phase
        if phase is TUNNEL:
            return [(WRITE_CLIENT, data)]
        if phase is COLLECTING or phase is RELAYING:
            return self._body(data)
        if phase is not WAITING:
            return [(RELEASE_UPSTREAM, False)]  # nothing was asked: out of step
        head = self.head
        assert head is not None
        # Usually the whole head (and body) is in this one chunk: parse it where it lies.
        src: bytes | bytearray = data
        if self.rbuf:
            self.rbuf += data
            src = self.rbuf
        try:
            while True:
                rhead = parse_response_head(src, head.method)
                if rhead is None:
                    if src is data:
                        self.rbuf = bytearray(data)
                    return []
                if rhead.interim and rhead.status != 101:  # 100 Continue, 103: skip
                    if src is data:
                        src = self.rbuf = bytearray(data)
                    del self.rbuf[: rhead.size]
                    continue
                break
        except H1Error as err:
            return self._broken(f"upstream failed: {err!r}")
        self.rhead = rhead
        if rhead.status == 101:
            return self._upgraded(rhead, bytes(src[: rhead.size]), bytes(src[rhead.size :]))
        rest = src[rhead.size :] if src is data else bytes(src[rhead.size :])
        self.rbuf = bytearray()
        return self._response_head(rhead, rest)

    def upstream_eof(self) -> list[Command]:
        phase = self.phase
        if phase is TUNNEL:
            return self._tunnel_eof(2, [(EOF_CLIENT,)])
        scanner = self.scanner
        if scanner is not None and scanner.kind is _UNTIL_CLOSE and not scanner.done:
            scanner.done = True
            self.reusable = False  # the body ended with the connection
            return self._complete()
        return self.upstream_lost("the destination closed before the response was complete")

    def upstream_lost(self, error: str | None = None) -> list[Command]:
        """The upstream connection is gone (`error`: why, None for a clean close)."""
        phase = self.phase
        if phase is TUNNEL:
            self.phase = CLOSED
            return [(RELEASE_UPSTREAM, False), (CLOSE_CLIENT, False)]
        if error is None:
            scanner = self.scanner
            if scanner is not None and scanner.kind is _UNTIL_CLOSE and not scanner.done:
                return self.upstream_eof()
            error = "connection lost"
        if phase is WAITING or phase is COLLECTING or phase is RELAYING:
            return self._broken(error)
        return []

    # --- requests ------------------------------------------------------------------------

    def _next(self) -> list[Command]:
        """Take the next request from the buffer, if a whole one is there (its body too when
        it is to be buffered)."""
        buf = self.buf
        out: list[Command] = []
        if not buf:
            return self._resume(out)
        try:
            head = parse_request_head(buf, self.proxy.max_head)
        except H1Error as err:
            return self._refuse(err.status, str(err))
        if head is None:
            return self._resume(out)
        if head.method == "CONNECT":
            return self._refuse(501, "CONNECT is not supported on a service address")
        body = head.body
        policy = self.proxy.policy
        if body is BodyKind.CHUNKED or head.length > policy.max_buffered_body:
            raw = bytes(buf[: head.size])
            del buf[: head.size]
            return self._resume(out) + self._begin(head, b"", raw, stream=True)
        end = head.size + head.length
        if len(buf) < end:
            self.phase = BODY
            if head.expect_continue and not self.continued:
                # The body is buffered here (retries need it): ask for it now.
                self.continued = True
                out.append((WRITE_CLIENT, _CONTINUE))
            self.deadline = self.proxy.clock() + self.proxy.config.client_keepalive_timeout
            out.append((ARM_DEADLINE, self.deadline))
            return self._resume(out)
        raw = bytes(buf[: head.size]) if head.upgrade else b""
        payload = bytes(buf[head.size : end]) if head.length else b""
        del buf[:end]
        self.phase = IDLE
        return self._resume(out) + self._begin(head, payload, raw)

    def _resume(self, out: list[Command]) -> list[Command]:
        if self.paused and len(self.buf) <= self.proxy.config.read_limit:
            self.paused = False
            out.append((RESUME_CLIENT,))
        return out

    def _begin(
        self, head: RequestHead, body: bytes, raw: bytes, stream: bool = False
    ) -> list[Command]:
        """A request to serve: `body` buffered whole, or (`stream`) to follow from the client."""
        proxy = self.proxy
        self.head = head
        self.body = body
        self.started = proxy.clock()
        if not head.keep_alive or head.version != _HTTP11:
            self.close_after = True  # HTTP/1.0: served, then closed
        target = self._target()
        if target is None:
            self.close_after = True
            self.phase = IDLE
            return self._answer_error(404, "no service on this address")
        forward = head.forward
        if head.upgrade:
            forward = upgrade_forward(raw, forward)
        self.request = forward + body if body else forward
        if stream:
            self.up_body = BodyScanner(head.body, head.length)
            self.retriable = False
        else:
            self.retriable = proxy.policy.retriable_request(head.method, True)
        proxy.budget.record_request()
        return self._try(target)

    def _target(self) -> Resolved | None:
        """What this connection's VIP and port are for, in the current table (cached)."""
        table = self.proxy.tables.current
        cached = self._resolved
        if cached is not None and cached[0] is table:
            return cached[1]
        target = resolve(table, *self.local) if self.local else None
        self._resolved = (table, target)
        return target

    def _try(self, target: Resolved | None = None) -> list[Command]:
        proxy = self.proxy
        if target is None:
            target = self._target()
            if target is None:
                return self._give_up()
        balancer = proxy.balancer
        while True:
            try:
                choice = balancer.pick(target.route, target.pinned_cluster, exclude=self.tried)
            except RoutingError as err:
                self.failure = (Outcome.NO_HEALTHY_DESTINATION, 503, str(err))
                return self._give_up()
            if self.attempt:
                proxy.retries += 1
            try:
                key, f = proxy.key(choice, target.port_name)
            except _NoPort as err:
                self.tried |= {choice.target}
                self.failure = (Outcome.NO_HEALTHY_DESTINATION, 503, str(err))
                if not self._may_retry():
                    return self._give_up()
                continue
            break
        balancer.begin(choice)
        self.choice = choice
        self.flow = f
        self.phase = CONNECTING
        now = proxy.clock() if self.attempt else self.started
        self.deadline = now + proxy.policy.per_try_timeout
        return [(OPEN_UPSTREAM, key), (ARM_DEADLINE, self.deadline)]

    def _may_retry(self) -> bool:
        self.attempt += 1
        proxy = self.proxy
        return (
            self.attempt < proxy.policy.attempts and self.retriable
            and proxy.budget.try_withdraw()
        )  # fmt: skip

    def _try_failed(
        self, outcome: Outcome, status: int, detail: str, kind: FailureKind = FailureKind.CONNECT,
        release: bool = True,
    ) -> list[Command]:  # fmt: skip
        """This try failed before anything went to the client: try elsewhere, or answer."""
        choice = self.choice
        assert choice is not None
        balancer = self.proxy.balancer
        if kind is FailureKind.CONNECT:  # a 5xx was reported when its head came
            balancer.report_failure(choice, kind)
        balancer.end(choice)
        self.choice = None
        self.tried |= {choice.target}
        out: list[Command] = [(RELEASE_UPSTREAM, False)] if release else []
        log.info(
            "http try failed",
            extra={"service": str(choice.route.service), "cluster": choice.cluster,
                   "target": choice.target.ident, "attempt": self.attempt + 1,
                   "outcome": outcome.value, "detail": detail},
        )  # fmt: skip
        self.failure = (outcome, status, detail)
        self._reset_response()
        if self._may_retry():
            return out + self._try()
        return out + self._give_up()

    def _give_up(self) -> list[Command]:
        """No (more) tries: answer with the last failure."""
        outcome, status, detail = self.failure
        proxy = self.proxy
        target = self._target()
        service = str(target.service) if target is not None else "unknown"
        cluster = (target.pinned_cluster if target is not None else None) or "none"
        flow(GatewayKind.EGRESS, proxy.source_cluster(), service, cluster).request(
            outcome, proxy.clock() - self.started
        )
        return self._answer_error(status, detail)

    def _answer_error(self, status: int, detail: str) -> list[Command]:
        head = self.head
        head_only = head is not None and head.method == "HEAD"
        if self.up_body is not None and not self.up_body.done:
            self.close_after = True  # the rest of the body would be read as requests
        out: list[Command] = [(WRITE_CLIENT, error_response(status, detail, head_only,
                                                            self.close_after))]  # fmt: skip
        return out + self._done()

    def _refuse(self, status: int, detail: str) -> list[Command]:
        """Bytes that are no request we can forward: answer and close."""
        self.phase = CLOSED
        self.buf = bytearray()
        return [(WRITE_CLIENT, error_response(status, detail, close=True)), (CLOSE_CLIENT, False)]

    def _done(self, now: float | None = None) -> list[Command]:
        """The answer went out: close, or on to the next request."""
        self._reset()
        if self.close_after:
            self.phase = CLOSED
            self.deadline = None
            return [(CLOSE_CLIENT, False)]
        self.phase = IDLE
        proxy = self.proxy
        if now is None:
            now = proxy.clock()
        self.deadline = now + proxy.config.client_keepalive_timeout
        out: list[Command] = [(ARM_DEADLINE, self.deadline)]
        if self.buf:
            out += self._next()
        elif self.paused:
            self.paused = False
            out.append((RESUME_CLIENT,))
        return out

    def _stream_up(self, data: bytes) -> list[Command]:
        """Client bytes while a request body streams upstream."""
        up_body = self.up_body
        assert up_body is not None
        if up_body.done:
            self.buf += data  # the next request, read once this one is answered
            if len(self.buf) > self.proxy.config.read_limit and not self.paused:
                self.paused = True
                return [(PAUSE_CLIENT,)]
            return []
        try:
            n = up_body.scan(data)
        except H1Error as err:
            return self._abandon(str(err), Outcome.RESET, err.status)
        out: list[Command] = [(WRITE_UPSTREAM, data if n == len(data) else data[:n])]
        if n < len(data):
            self.buf += data[n:]
        if up_body.done and self.phase is WAITING:
            proxy = self.proxy
            self.deadline = proxy.clock() + proxy.policy.per_try_timeout
            out.append((ARM_DEADLINE, self.deadline))
        return out

    def _abandon(
        self, detail: str, outcome: Outcome = Outcome.RESET, status: int = 502,
        release: bool = True, blame: bool = True,
    ) -> list[Command]:  # fmt: skip
        """A request whose body streamed (or was to stream) failed: no retry. Answer if no
        answer started, else cut the connection. `blame`: the upstream failed (an outlier
        report), not the client."""
        choice = self.choice
        if choice is not None:
            if blame:
                self.proxy.balancer.report_failure(choice, FailureKind.CONNECT)
            self.proxy.balancer.end(choice)
            self.choice = None
        out: list[Command] = [(RELEASE_UPSTREAM, False)] if release else []
        self.close_after = True
        if self.phase is RELAYING or self.eof:
            if self.flow is not None:
                self.flow.request(Outcome.RESET, self.proxy.clock() - self.started)
            self.phase = CLOSED
            return [*out, (CLOSE_CLIENT, True)]
        self.failure = (outcome, status, detail)
        return out + self._give_up()

    # --- responses -----------------------------------------------------------------------

    def _response_head(self, rhead: ResponseHead, rest: bytes | bytearray) -> list[Command]:
        proxy = self.proxy
        status = rhead.status
        if status >= 500:
            choice = self.choice
            assert choice is not None
            proxy.balancer.report_failure(choice, FailureKind.HTTP_5XX)
            if self.up_body is None and proxy.policy.retriable_status(status):
                return self._try_failed(Outcome.HTTP_5XX, status, f"upstream answered {status}",
                                        FailureKind.HTTP_5XX)  # fmt: skip
        if rhead.body is _UNTIL_CLOSE or (self.up_body is not None and not self.up_body.done):
            self.close_after = True  # (an answer before the request body ended: RFC 9112 9.6)
        self.scanner = BodyScanner(rhead.body, rhead.length)
        kind = rhead.body
        if self.up_body is None and (
            kind is _NONE or (kind is _LENGTH and rhead.length <= proxy.config.inline_body)
        ):
            self.phase = COLLECTING
            if rest or self.scanner.done:
                return self._body(rest)
            return []
        self.phase = RELAYING
        self.deadline = None
        out: list[Command] = [(WRITE_CLIENT, self._head_out(rhead.forward)), (ARM_DEADLINE, None)]
        if rest or self.scanner.done:
            out += self._body(rest)
        return out

    def _head_out(self, head: bytes) -> bytes:
        if self.close_after and not head.endswith(_CLOSE):
            return head[:-2] + _CLOSE
        return head

    def _body(self, data: bytes | bytearray) -> list[Command]:
        scanner = self.scanner
        assert scanner is not None
        if scanner.done:
            if data:
                self.reusable = False
            return self._complete()
        try:
            n = scanner.scan(data)
        except H1Error as err:
            return self._broken(f"upstream body failed: {err!r}")
        if n < len(data):
            self.reusable = False  # bytes beyond the response: out of step
            data = data[:n]
        out: list[Command] = []
        if data:
            self.received += len(data)
            if self.phase is RELAYING:
                out.append((WRITE_CLIENT, data))
            else:
                self.parts.append(data)
        if scanner.done:
            return out + self._complete() if out else self._complete()
        return out

    def _complete(self) -> list[Command]:
        """The response is complete."""
        rhead = self.rhead
        head = self.head
        choice = self.choice
        f = self.flow
        assert rhead is not None and head is not None and choice is not None and f is not None
        proxy = self.proxy
        status = rhead.status
        balancer = proxy.balancer
        if status < 500:
            balancer.report_success(choice)
        out: list[Command]
        if self.phase is COLLECTING:
            parts = self.parts
            if head.method == "HEAD" or not parts:
                data = self._head_out(rhead.forward)
            else:
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                data = self._head_out(rhead.forward) + body
            out = [(WRITE_CLIENT, data)]
        else:
            out = []
        if self.up_body is not None and not self.up_body.done:
            self.close_after = True  # answered before the request body ended
            self.reusable = False
        now = proxy.clock()
        f.request(_outcome(status), now - self.started, len(self.body), self.received)
        balancer.end(choice)
        self.choice = None
        out.append((RELEASE_UPSTREAM, self.reusable and rhead.keep_alive))
        return out + self._done(now)

    def _broken(self, detail: str) -> list[Command]:
        """The upstream broke (closed, reset, bad bytes) before its response was complete."""
        phase = self.phase
        if phase is RELAYING or self.up_body is not None:
            if phase is not RELAYING:
                return self._abandon(detail)
            # The response broke after its head went out: too late to retry.
            choice = self.choice
            assert choice is not None and self.flow is not None
            balancer = self.proxy.balancer
            balancer.report_failure(choice, FailureKind.CONNECT)
            balancer.end(choice)
            self.choice = None
            self.flow.request(Outcome.RESET, self.proxy.clock() - self.started)
            log.info(
                "http response broke",
                extra={"service": str(choice.route.service), "cluster": choice.cluster,
                       "detail": detail},
            )  # fmt: skip
            self.phase = CLOSED
            return [(RELEASE_UPSTREAM, False), (CLOSE_CLIENT, True)]
        if self.rhead is not None:
            return self._try_failed(Outcome.RESET, 502, f"upstream body failed: {detail}")
        return self._try_failed(Outcome.CONNECT_ERROR, 502, detail)

    # --- upgrades --------------------------------------------------------------------------

    def _upgraded(self, rhead: ResponseHead, raw: bytes, rest: bytes) -> list[Command]:
        head = self.head
        choice = self.choice
        assert head is not None and choice is not None and self.flow is not None
        if not head.upgrade:
            return self._broken("upstream switched protocols unasked")
        proxy = self.proxy
        proxy.balancer.report_success(choice)
        proxy.balancer.end(choice)
        self.choice = None
        self.flow.request(Outcome.OK, proxy.clock() - self.started, len(self.body))
        self.phase = TUNNEL
        self.deadline = None
        out: list[Command] = [(WRITE_CLIENT, raw + rest if rest else raw), (ARM_DEADLINE, None)]
        if self.buf:  # the client spoke the new protocol already
            out.append((WRITE_UPSTREAM, bytes(self.buf)))
            self.buf = bytearray()
        if self.paused:
            self.paused = False
            out.append((RESUME_CLIENT,))
        if self.eof:
            out += self._tunnel_eof(1, [(EOF_UPSTREAM,)])
        return out

    def _tunnel_eof(self, side: int, out: list[Command]) -> list[Command]:
        self.tunnel_eof |= side
        if self.tunnel_eof == 3:
            self.phase = CLOSED
            out += [(RELEASE_UPSTREAM, False), (CLOSE_CLIENT, False)]
        return out
