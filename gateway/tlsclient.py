"""Client TLS contexts for the egress: one per remote gateway, with TLS session resumption.

asyncio (and uvloop) build each connection's `SSLObject` through `SSLContext.wrap_bio`, which
has no way to pass a saved session. A context's `sslobject_class` hook does: the class below
offers the newest session this context saw for the same server name, so a reconnect to a
gateway skips the certificate exchange and signatures (TLS 1.3 PSK resumption).

A session belongs to the `SSLContext` that made it, and a ticket only resumes on the server that
issued it, so every remote gateway gets its own context and cache. Contexts are rebuilt when the
node's credentials change (a new identity or bundle); connections already open keep theirs.
"""

from __future__ import annotations

import ssl
import time
import weakref
from collections.abc import Callable
from typing import Any

from federation.trust.contexts import client_context
from federation.trust.credentials import TlsCredentials

__all__ = ["ClientContexts", "SessionCache"]


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
