"""Shared root of trust: CA hierarchy, SPIFFE identities, strict mTLS verification, issuance
and hot rotation (DESIGN §3-4). See docs/trust.md."""

from federation.trust.bundle import TrustBundle
from federation.trust.ca import (
    CertificateAuthority,
    Identity,
    create_cluster_ca,
    create_root,
    generate_key,
    issue_identity,
    make_csr,
    sign_csr,
)
from federation.trust.connections import VerifiedConnection, tls_accept, tls_connect
from federation.trust.contexts import client_context, server_context
from federation.trust.credentials import TlsCredentials
from federation.trust.errors import PeerVerificationError, TrustError
from federation.trust.issuance import IdentityIssuer, issuance_app, request_identity
from federation.trust.renewal import IdentityManager, LocalRenewer, RemoteRenewer
from federation.trust.spiffe import Kind, SpiffeId
from federation.trust.tokens import BootstrapTokens
from federation.trust.verify import verify_chain, verify_peer

__all__ = [
    "BootstrapTokens",
    "CertificateAuthority",
    "Identity",
    "IdentityIssuer",
    "IdentityManager",
    "Kind",
    "LocalRenewer",
    "PeerVerificationError",
    "RemoteRenewer",
    "SpiffeId",
    "TlsCredentials",
    "TrustBundle",
    "TrustError",
    "VerifiedConnection",
    "client_context",
    "create_cluster_ca",
    "create_root",
    "generate_key",
    "issuance_app",
    "issue_identity",
    "make_csr",
    "request_identity",
    "server_context",
    "sign_csr",
    "tls_accept",
    "tls_connect",
    "verify_chain",
    "verify_peer",
]
