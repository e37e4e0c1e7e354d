"""Renewal at half-life and hot swap of the node's identity.

A node holding its cluster CA key reissues its own leaf (`LocalRenewer`); a node without it
sends a CSR to its cluster's control node, authenticated by its current identity
(`RemoteRenewer`). Either way a fresh key is generated here and never leaves the node. The new
identity is written to disk (atomically, so a restart finds a matching cert/key pair) and
swapped into the `TlsCredentials`: new connections use it, open ones carry on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import Counter, Gauge

from discovery.backoff import Backoff
from federation.trust.bundle import TrustBundle
from federation.trust.ca import (
    IDENTITY_LIFETIME,
    CertificateAuthority,
    Identity,
    generate_key,
    issue_identity,
    utcnow,
)
from federation.trust.credentials import TlsCredentials
from federation.trust.errors import TrustError
from federation.trust.issuance import request_identity
from federation.trust.pemfiles import load_bundle, write_bundle, write_identity

log = logging.getLogger(__name__)

RENEWALS = Counter(
    "isthmus_identity_renewals_total",
    "Identity renewals attempted, by outcome",
    ["identity", "outcome"],
)
EXPIRY = Gauge(
    "isthmus_identity_expiry_timestamp_seconds",
    "When the node's current identity certificate expires (Unix time)",
    ["identity"],
)

RETRY_MIN = 1.0
RETRY_MAX = 300.0


class Renewer(Protocol):
    async def renew(self, current: Identity) -> tuple[Identity, TrustBundle | None]:
        """A new identity for the same SPIFFE ID (and a new bundle, if the issuer sent one)."""
        ...


@dataclass(frozen=True, slots=True)
class LocalRenewer:
    """Reissue with the cluster CA key this node holds."""

    authority: CertificateAuthority
    lifetime: dt.timedelta = IDENTITY_LIFETIME

    async def renew(self, current: Identity) -> tuple[Identity, TrustBundle | None]:
        sid = current.spiffe_id
        assert sid.kind is not None and sid.node is not None
        return issue_identity(self.authority, sid.kind, sid.node, lifetime=self.lifetime), None


@dataclass(frozen=True, slots=True)
class RemoteRenewer:
    """Send a CSR to the cluster's control node (`host:port`), authenticated by mTLS."""

    control_addr: str
    bundle: Callable[[], TrustBundle]

    async def renew(self, current: Identity) -> tuple[Identity, TrustBundle | None]:
        sid = current.spiffe_id
        assert sid.kind is not None and sid.node is not None
        issued = await request_identity(
            self.control_addr,
            sid.node,
            sid.kind,
            generate_key(),
            bundle=self.bundle(),
            identity=current,
        )
        return issued.identity, issued.bundle


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    """Where the node keeps its identity (`trust.cert`, `trust.key`) and `trust.bundle`."""

    cert: Path
    key: Path
    bundle: Path


def renewal_delay(identity: Identity, now: dt.datetime) -> float:
    """Seconds until the identity reaches half-life (0 if already past)."""
    return max(0.0, (identity.renew_at - now).total_seconds())


class IdentityManager:
    def __init__(
        self,
        credentials: TlsCredentials,
        renewer: Renewer,
        *,
        files: IdentityFiles | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.credentials = credentials
        self.renewer = renewer
        self.files = files
        self._clock = clock
        self.renewed = asyncio.Event()
        self._label = str(credentials.spiffe_id)
        EXPIRY.labels(identity=self._label).set(credentials.identity.not_after.timestamp())

    async def renew_now(self) -> Identity:
        """Renew immediately and swap the new identity in. Raises TrustError on failure."""
        current = self.credentials.identity
        try:
            identity, bundle = await self.renewer.renew(current)
        except TrustError:
            RENEWALS.labels(identity=self._label, outcome="failure").inc()
            raise
        if identity.spiffe_id != current.spiffe_id:
            RENEWALS.labels(identity=self._label, outcome="failure").inc()
            raise TrustError(f"renewal returned {identity.spiffe_id}, not {current.spiffe_id}")
        if self.files is not None:
            write_identity(self.files.cert, self.files.key, identity, force=True)
            if bundle is not None:
                write_bundle(self.files.bundle, bundle)
        self.credentials.update(identity=identity, bundle=bundle)
        RENEWALS.labels(identity=self._label, outcome="success").inc()
        EXPIRY.labels(identity=self._label).set(identity.not_after.timestamp())
        log.info(
            "identity renewed id=%s serial=%x not_after=%s",
            identity.spiffe_id,
            identity.serial,
            identity.not_after.isoformat(),
            extra={
                "spiffe_id": str(identity.spiffe_id),
                "serial": f"{identity.serial:x}",
                "not_after": identity.not_after.isoformat(),
            },
        )
        self.renewed.set()
        return identity

    def reload_bundle(self) -> bool:
        """Re-read `trust.bundle` (an operator changed it during a root rotation).
        True if it changed and was swapped in."""
        if self.files is None:
            return False
        bundle = load_bundle(self.files.bundle)
        if bundle.fingerprints == self.credentials.bundle.fingerprints:
            return False
        self.credentials.update(bundle=bundle)
        log.info(
            "trust bundle reloaded roots=%d", len(bundle.roots), extra={"roots": len(bundle.roots)}
        )
        return True

    async def run(self, *, bundle_poll: float = 30.0) -> None:
        """Renew at every half-life until cancelled; retry failures with backoff (never past
        expiry without trying), and pick up bundle file changes every `bundle_poll` seconds."""
        # Doubling without jitter (one node renews against its own control node); each wait is
        # also capped at a quarter of the time left, so expiry never comes between two tries.
        backoff = Backoff(RETRY_MIN, RETRY_MAX, jitter=0.0)
        while True:
            delay = renewal_delay(self.credentials.identity, self._clock())
            if delay > 0:
                await asyncio.sleep(min(delay, bundle_poll))
                try:
                    self.reload_bundle()
                except TrustError as exc:
                    log.warning(
                        "trust bundle reload failed error=%s", exc, extra={"error": str(exc)}
                    )
                continue
            try:
                await self.renew_now()
                backoff.reset()
            except (TrustError, OSError) as exc:
                left = (self.credentials.identity.not_after - self._clock()).total_seconds()
                retry = min(backoff.next(), max(RETRY_MIN, left / 4))
                log.warning(
                    "identity renewal failed error=%s retry_in=%.1fs expires_in=%.0fs",
                    exc,
                    retry,
                    left,
                    extra={"error": str(exc), "retry_in": retry, "expires_in": left},
                )
                await asyncio.sleep(retry)
