"""Handshake failures: classify, count in `isthmus_tls_handshake_failures_total{reason}`, log."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from prometheus_client import Counter

from federation.trust import errors

log = logging.getLogger(__name__)

HANDSHAKE_FAILURES = Counter(
    "isthmus_tls_handshake_failures_total",
    "TLS handshakes refused or failed, by reason",
    ["reason"],
)

# OpenSSL X509_V_ERR_* codes the ssl module reports in SSLCertVerificationError.verify_code.
_VERIFY_CODES: dict[int, type[errors.PeerVerificationError]] = {
    2: errors.UntrustedRoot,  # unable to get issuer certificate
    7: errors.UntrustedRoot,  # certificate signature failure
    9: errors.NotYetValid,
    10: errors.Expired,
    13: errors.NotYetValid,  # bad notBefore field
    14: errors.Expired,  # bad notAfter field
    18: errors.UntrustedRoot,  # self-signed leaf
    19: errors.UntrustedRoot,  # self-signed certificate in chain
    20: errors.UntrustedRoot,  # unable to get local issuer certificate
    21: errors.UntrustedRoot,  # unable to verify the first certificate
    24: errors.BadChain,  # invalid CA certificate
    25: errors.BadChain,  # path length constraint exceeded
    26: errors.BadKeyUsage,  # unsupported certificate purpose (EKU / KU for the TLS role)
    32: errors.BadChain,  # key usage does not include certificate signing
    39: errors.BadKeyUsage,  # key usage does not include digital signature
    47: errors.WrongTrustDomain,  # name constraints: permitted subtree violation
    48: errors.WrongTrustDomain,  # name constraints: excluded subtree violation
    79: errors.BadChain,  # CA cert does not include key usage extension (strict)
    85: errors.BadChain,  # CA certificate key usage / basic constraints (strict)
}


def classify(exc: BaseException) -> errors.TrustError:
    """Translate what a handshake raised into a TrustError with a reason."""
    if isinstance(exc, errors.TrustError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        cls = _VERIFY_CODES.get(exc.verify_code, errors.PeerVerificationError)
        return cls(f"{exc.verify_message} (X509 error {exc.verify_code})")
    if isinstance(exc, ssl.SSLError):
        name = (exc.reason or "").upper()
        if "ALERT" in name:
            return errors.PeerRejected(f"the peer sent alert {exc.reason}")
        if name == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return errors.NoPeerCertificate("the client presented no certificate")
        if name in {"UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "WRONG_VERSION_NUMBER"}:
            return errors.ProtocolMismatch(exc.reason or str(exc))
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return errors.ConnectionLost("the peer closed the connection during the handshake")
        return errors.HandshakeError(exc.reason or str(exc))
    if isinstance(exc, TimeoutError):
        return errors.HandshakeTimeout("the handshake did not finish in time")
    if isinstance(exc, ConnectionError | EOFError | OSError):
        return errors.ConnectionLost(str(exc) or type(exc).__name__)
    return errors.HandshakeError(f"{type(exc).__name__}: {exc}")


# Told of every failure counted (the appliance's event log); (error, side, peer address).
FailureListener = Callable[[errors.TrustError, str | None, str | None], None]
_LISTENERS: list[FailureListener] = []


def on_failure(listener: FailureListener) -> Callable[[], None]:
    """Call `listener` for every handshake failure counted; returns the unsubscribe call."""
    _LISTENERS.append(listener)
    return lambda: _LISTENERS.remove(listener)


def count_failure(
    err: errors.TrustError, side: str | None = None, peer: str | None = None
) -> None:
    """Count `err` only: for a caller that logs refusals its own way (rate-limited)."""
    HANDSHAKE_FAILURES.labels(reason=err.reason).inc()
    for listener in list(_LISTENERS):
        try:
            listener(err, side, peer)
        except Exception:  # a listener's bug must not turn a refusal into a crash
            log.exception("handshake failure listener failed")


def record_failure(err: errors.TrustError, *, side: str, peer: str | None = None) -> None:
    """Count `err` and log one line naming its reason. `side` is "server" or "client"."""
    count_failure(err, side, peer)
    log.warning(
        "tls handshake refused reason=%s side=%s peer=%s detail=%s",
        err.reason,
        side,
        peer or "-",
        getattr(err, "detail", str(err)),
        extra={"reason": err.reason, "side": side, "peer": peer, "detail": str(err)},
    )
