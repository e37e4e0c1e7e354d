"""Client TLS for the egress: contexts per remote gateway with TLS session resumption, and
`dial_gateway`, which makes a verified mutual-TLS "gateway connection" to a remote ingress
under a given SNI (a service, `tunnel.` for a multiplexed tunnel, `probe.` for a probe).

asyncio (and uvloop) build each connection's `SSLObject` through `SSLContext.wrap_bio`, which
has no way to pass a saved session. A context's `sslobject_class` hook does: the class below
offers the newest session this context saw for the same server name, so a reconnect to a
gateway skips the certificate exchange and signatures (TLS 1.3 PSK resumption).

A session belongs to the `SSLContext` that made it, and a ticket only resumes on the server that
issued it, so every remote gateway gets its own context and cache. Contexts are rebuilt when the
node's credentials change (a new identity or bundle); connections already open keep theirs.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from discovery.addresses import split_host_port
from federation.trust.contexts import client_context
from federation.trust.credentials import TlsCredentials
from federation.trust.errors import TrustError
from federation.trust.observe import classify, record_failure
from federation.trust.spiffe import SpiffeId
from federation.trust.verify import verify_peer
from gateway.errors import ConnectFailed
from gateway.metrics import Outcome

__all__ = ["ClientContexts", "GatewayConn", "IdleWatch", "SessionCache", "dial_gateway"]


class SessionCache:
    """The newest resumable session per server name, for one context.

    Reading `SSLObject.session` costs ~0.3 ms in CPython 3.11 with OpenSSL 3 (it duplicates the
    session through DER, peer certificates included), as much as a third of a resumed
    handshake's client CPU; so a session is read once and offered again until it is
    `refresh` seconds old (OpenSSL servers accept a stateless TLS 1.3 ticket more than once),
    or sooner when a connection offered it and did not resume (the server's ticket keys
    changed, e.g. after its credentials were renewed)."""

    def __init__(self, refresh: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        # Tickets arrive after the handshake, so keep the newest SSLObject and read its session
        # when the next connection starts; fall back to the last session read.
        self.refresh = refresh
        self._clock = clock
        self._latest: dict[str, weakref.ref[ssl.SSLObject]] = {}
        self._sessions: dict[str, tuple[ssl.SSLSession, float]] = {}
        self.reads = 0  # sessions read from a connection (the costly part)

    def session_for(self, server_name: str) -> ssl.SSLSession | None:
        ref = self._latest.get(server_name)
        obj = ref() if ref is not None else None
        cached = self._sessions.get(server_name)
        now = self._clock()
        if cached is not None and now - cached[1] < self.refresh and not _missed(obj):
            return cached[0]
        if obj is not None:
            try:
                session = obj.session
            except (ValueError, AttributeError):  # torn down before a session existed
                session = None
            self.reads += 1
            if session is not None and session.has_ticket:
                self._sessions[server_name] = (session, now)
                return session
        return cached[0] if cached is not None else None

    def track(self, server_name: str, obj: ssl.SSLObject) -> None:
        self._latest[server_name] = weakref.ref(obj)

    def forget(self, server_name: str) -> None:
        self._latest.pop(server_name, None)
        self._sessions.pop(server_name, None)

    def install(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        """Make `ctx` resume sessions from this cache (ctx must be used only with this cache)."""
        cache = self

        class _ResumingSSLObject(ssl.SSLObject):
            @classmethod
            def _create(  # type: ignore[override]
                cls,
                incoming: ssl.MemoryBIO,
                outgoing: ssl.MemoryBIO,
                server_side: bool = False,
                server_hostname: str | None = None,
                session: ssl.SSLSession | None = None,
                context: Any = None,
            ) -> ssl.SSLObject:
                if session is None and not server_side and server_hostname:
                    session = cache.session_for(server_hostname)
                obj: ssl.SSLObject = super()._create(  # type: ignore[misc]
                    incoming, outgoing, server_side, server_hostname, session, context
                )
                if server_hostname and not server_side:
                    cache.track(server_hostname, obj)
                return obj

        ctx.sslobject_class = _ResumingSSLObject
        return ctx


def _missed(obj: ssl.SSLObject | None) -> bool:
    """`obj` finished its handshake without resuming: the session it was offered is stale."""
    if obj is None:
        return False
    try:
        return obj.version() is not None and not obj.session_reused
    except (ValueError, AttributeError):
        return False


class ClientContexts:
    """Per-gateway client contexts that follow the node's credentials."""

    def __init__(self, credentials: TlsCredentials, resumption: bool = True) -> None:
        self.credentials = credentials
        self.resumption = resumption
        self._generation = -1
        self._contexts: dict[str, ssl.SSLContext] = {}

    def for_gateway(self, gateway: str) -> ssl.SSLContext:
        """The context for new connections to `gateway` ("host:port")."""
        creds = self.credentials
        if creds.generation != self._generation:
            self._contexts.clear()  # new identity or bundle: old sessions carry the old identity
            self._generation = creds.generation
        ctx = self._contexts.get(gateway)
        if ctx is None:
            ctx = client_context(creds.identity, creds.bundle)
            if self.resumption:
                SessionCache().install(ctx)
            self._contexts[gateway] = ctx
        return ctx

    def retain(self, gateways: set[str]) -> None:
        """Forget contexts of gateways no longer in the routing table."""
        for g in [g for g in self._contexts if g not in gateways]:
            del self._contexts[g]


class IdleWatch(asyncio.Protocol):
    """Protocol of a gateway connection until its user sets its own (e.g. while it waits in a
    warm pool): bytes that come unasked or the connection's end make it useless."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.on_lost: collections.abc.Callable[[IdleWatch], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # Nothing was asked yet: the stream is no longer at its start, so it is useless.
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost(self)


@dataclass(frozen=True, slots=True)
class GatewayConn:
    """An established, verified mutual-TLS connection to a remote ingress (a "gateway
    connection"); its protocol watches it until a user sets its own."""

    transport: asyncio.Transport
    protocol: IdleWatch
    peer: SpiffeId
    gateway: str
    sni: str
    born: float
    generation: int
    resumed: bool

    @property
    def alive(self) -> bool:
        return not self.protocol.lost and not self.transport.is_closing()


async def dial_gateway(
    contexts: ClientContexts,
    gateway: str,
    sni: str,
    cluster: str,
    connect_timeout: float,
    handshake_timeout: float,
) -> GatewayConn:
    """Connect to `gateway` with `sni`, handshake and verify that it is `cluster`'s gateway.

    Raises ConnectFailed with the outcome to count (failures are logged by the caller, TLS
    refusals are also counted and logged by the trust library)."""
    loop = asyncio.get_running_loop()
    host, port = split_host_port(gateway)
    generation = contexts.credentials.generation
    ctx = contexts.for_gateway(gateway)
    started = time.monotonic()
    try:
        async with asyncio.timeout(connect_timeout + handshake_timeout):
            transport, protocol = await loop.create_connection(
                IdleWatch, host, port, ssl=ctx, server_hostname=sni,
                ssl_handshake_timeout=handshake_timeout,
            )  # fmt: skip
    except TimeoutError as exc:
        connected = time.monotonic() - started > connect_timeout
        outcome = Outcome.HANDSHAKE_TIMEOUT if connected else Outcome.CONNECT_TIMEOUT
        raise ConnectFailed(f"{gateway}: timed out", outcome) from exc
    except ssl.SSLError as exc:
        record_failure(classify(exc), side="client", peer=gateway)
        msg = f"{gateway}: TLS handshake failed: {exc}"
        raise ConnectFailed(msg, Outcome.HANDSHAKE_ERROR) from exc
    except (OSError, EOFError) as exc:
        raise ConnectFailed(f"{gateway}: {exc!r}", Outcome.CONNECT_ERROR) from exc
    ssl_object = transport.get_extra_info("ssl_object")
    creds = contexts.credentials
    try:
        if ssl_object is None:
            raise classify(ssl.SSLError("no TLS session after the handshake"))
        peer = verify_peer(ssl_object, creds.bundle, creds.trust_domain, expected_cluster=cluster)
    except TrustError as err:
        record_failure(err, side="client", peer=gateway)
        transport.abort()
        raise ConnectFailed(f"{gateway}: {err}", Outcome.HANDSHAKE_ERROR) from err
    return GatewayConn(
        transport,  # type: ignore[arg-type]
        protocol,
        peer,
        gateway,
        sni,
        time.monotonic(),
        generation,
        bool(ssl_object.session_reused),
    )
