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
import weakref
from typing import Any

from federation.trust.contexts import client_context
from federation.trust.credentials import TlsCredentials

__all__ = ["ClientContexts", "SessionCache"]


class SessionCache:
    """The newest resumable session per server name, for one context."""

    def __init__(self) -> None:
        # Tickets arrive after the handshake, so keep the newest SSLObject and read its session
        # when the next connection starts; fall back to the last session read.
        self._latest: dict[str, weakref.ref[ssl.SSLObject]] = {}
        self._sessions: dict[str, ssl.SSLSession] = {}

    def session_for(self, server_name: str) -> ssl.SSLSession | None:
        ref = self._latest.get(server_name)
        obj = ref() if ref is not None else None
        if obj is not None:
            try:
                session = obj.session
            except (ValueError, AttributeError):  # torn down before a session existed
                session = None
            if session is not None and session.has_ticket:
                self._sessions[server_name] = session
        return self._sessions.get(server_name)

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
