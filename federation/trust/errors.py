"""Trust errors. Every peer-verification failure carries a short `reason` that names it in
logs and in `isthmus_tls_handshake_failures_total{reason}`."""

from __future__ import annotations


class TrustError(Exception):
    """Base of every error the trust package raises."""

    reason = "trust_error"


# --- PKI material (files, issuance inputs) -------------------------------------------------


class PkiError(TrustError):
    """Bad or missing PKI material: a file, a key, an argument to the CA."""

    reason = "pki_error"


class KeyExists(PkiError):
    """A private key (or certificate) would be overwritten and `force` was not given."""

    reason = "key_exists"


class InvalidIdentity(PkiError):
    """A SPIFFE ID, trust domain, cluster or node name that breaks the naming rules."""

    reason = "invalid_identity"


class CsrRejected(PkiError):
    """A certificate signing request that cannot be signed (bad signature, key type)."""

    reason = "bad_csr"


class BootstrapTokenRefused(TrustError):
    """A bootstrap token that is unknown, already used or expired."""

    reason = "bad_bootstrap_token"


# --- peer verification -----------------------------------------------------------------------


class PeerVerificationError(TrustError):
    """The peer's certificate (chain) is not acceptable. `detail` says what was seen."""

    reason = "verification_failed"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class UntrustedRoot(PeerVerificationError):
    reason = "untrusted_root"


class BadChain(PeerVerificationError):
    """Chains to a bundle root but breaks CA rules (path length, CA flags, names)."""

    reason = "bad_chain"


class Expired(PeerVerificationError):
    reason = "expired"


class NotYetValid(PeerVerificationError):
    reason = "not_yet_valid"


class BadKeyUsage(PeerVerificationError):
    reason = "bad_key_usage"


class NoSpiffeId(PeerVerificationError):
    reason = "no_spiffe_id"


class MultipleUriSans(PeerVerificationError):
    reason = "multiple_uri_sans"


class WrongTrustDomain(PeerVerificationError):
    reason = "wrong_trust_domain"


class ClusterMismatch(PeerVerificationError):
    """The identity names cluster X but was issued by cluster Y's CA (or the caller
    expected another cluster)."""

    reason = "cluster_mismatch"


class NoPeerCertificate(PeerVerificationError):
    reason = "no_peer_certificate"


# --- handshake failures not about the peer's certificate -----------------------------------


class HandshakeError(TrustError):
    """The TLS handshake failed for a reason other than the peer's certificate."""

    reason = "handshake_error"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class PeerRejected(HandshakeError):
    """The peer refused *our* certificate (it sent a fatal alert)."""

    reason = "peer_rejected"


class ProtocolMismatch(HandshakeError):
    """No common protocol version (e.g. the peer does not speak TLS 1.3)."""

    reason = "protocol"


class ConnectionLost(HandshakeError):
    reason = "connection_lost"


class HandshakeTimeout(HandshakeError):
    reason = "timeout"


# --- issuance over the control API -----------------------------------------------------------


class IssuanceError(TrustError):
    """The control node refused or failed to issue an identity."""

    reason = "issuance_failed"

    def __init__(self, message: str, *, status: int = 0, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
