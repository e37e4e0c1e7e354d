"""Hot-swappable TLS credentials: the current identity and bundle, as ready-built contexts.

New connections pick up a swap; connections already open keep the context they started with.
Listeners that hold one fixed context (asyncio/aiohttp servers) get a `listener_context` whose
SNI callback switches each new connection to the current server context before the server
picks its certificate and verifies the client's, so a swap needs no listener restart.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from federation.trust.bundle import TrustBundle
from federation.trust.ca import Identity
from federation.trust.contexts import client_context, server_context
from federation.trust.spiffe import SpiffeId

log = logging.getLogger(__name__)

SniHook = Callable[[ssl.SSLObject, str | None], None]


@dataclass(frozen=True, slots=True)
class _Generation:
    number: int
    identity: Identity
    bundle: TrustBundle
    server_required: ssl.SSLContext
    server_optional: ssl.SSLContext
    client: ssl.SSLContext


def _build(number: int, identity: Identity, bundle: TrustBundle) -> _Generation:
    return _Generation(
        number,
        identity,
        bundle,
        server_context(identity, bundle, require_client_cert=True),
        server_context(identity, bundle, require_client_cert=False),
        client_context(identity, bundle),
    )


class TlsCredentials:
    """The node's current identity and trust bundle. Thread-safe; swaps are atomic."""

    def __init__(
        self, identity: Identity, bundle: TrustBundle, *, trust_domain: str | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._gen = _build(1, identity, bundle)
        # The domain peers must belong to; the node's own identity says it unless given.
        self._trust_domain = trust_domain or identity.spiffe_id.trust_domain

    @property
    def identity(self) -> Identity:
        return self._gen.identity

    @property
    def bundle(self) -> TrustBundle:
        return self._gen.bundle

    @property
    def spiffe_id(self) -> SpiffeId:
        return self._gen.identity.spiffe_id

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def generation(self) -> int:
        return self._gen.number

    def update(
        self, *, identity: Identity | None = None, bundle: TrustBundle | None = None
    ) -> None:
        """Swap in a new identity and/or bundle for every connection opened from now on."""
        with self._lock:
            old = self._gen
            gen = _build(old.number + 1, identity or old.identity, bundle or old.bundle)
            self._gen = gen
        log.info(
            "tls credentials swapped generation=%d identity=%s serial=%x roots=%d",
            gen.number,
            gen.identity.spiffe_id,
            gen.identity.serial,
            len(gen.bundle.roots),
            extra={
                "generation": gen.number,
                "identity": str(gen.identity.spiffe_id),
                "serial": f"{gen.identity.serial:x}",
                "roots": len(gen.bundle.roots),
            },
        )

    def client_context(self) -> ssl.SSLContext:
        """The context for the next outgoing connection."""
        return self._gen.client

    def server_context(self, *, require_client_cert: bool = True) -> ssl.SSLContext:
        """The context for the next accepted connection."""
        gen = self._gen
        return gen.server_required if require_client_cert else gen.server_optional

    def listener_context(
        self, *, require_client_cert: bool = True, sni_hook: SniHook | None = None
    ) -> ssl.SSLContext:
        """A context to give a long-lived listener once; it follows every later swap.

        `sni_hook(ssl_object, server_name)` runs first, for listeners that route by SNI.
        """
        base = server_context(self.identity, self.bundle, require_client_cert=require_client_cert)

        def switch(
            ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext
        ) -> None:
            if sni_hook is not None:
                sni_hook(ssl_object, server_name)
            ssl_object.context = self.server_context(require_client_cert=require_client_cert)

        base.sni_callback = switch  # type: ignore[assignment]
        return base
