"""Strict verification of a peer's identity (DESIGN §4). Sans-IO: certificates in, a
`SpiffeId` or a `PeerVerificationError` out.

Two entry points:
- `verify_chain` checks a whole chain (leaf, cluster CA, up to a bundle root) by itself;
- `verify_peer` takes a completed handshake. The ssl module has already verified the chain
  against the context's bundle, but Python 3.11 only exposes the peer's leaf, so the issuer
  cluster is read from the leaf's issuer name, which the verified chain binds (see `names`).
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation.trust import errors
from federation.trust.bundle import TrustBundle
from federation.trust.ca import utcnow
from federation.trust.errors import InvalidIdentity
from federation.trust.names import cluster_of_ca_name
from federation.trust.spiffe import SpiffeId
from federation.trust.x509util import uri_sans

_SHA256 = hashes.SHA256()
PeerSource = ssl.SSLObject | ssl.SSLSocket | Sequence[bytes]


def check_validity(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise errors.NotYetValid(f"{what} is valid from {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise errors.Expired(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _ext(cert: x509.Certificate, cls: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def check_leaf_usage(leaf: x509.Certificate, *, peer_is_server: bool) -> None:
    bc = _ext(leaf, x509.BasicConstraints)
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        raise errors.BadKeyUsage("the peer presented a CA certificate as its identity")
    ku = _ext(leaf, x509.KeyUsage)
    if not isinstance(ku, x509.KeyUsage) or not ku.digital_signature:
        raise errors.BadKeyUsage("key usage lacks digitalSignature")
    eku = _ext(leaf, x509.ExtendedKeyUsage)
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if peer_is_server else ExtendedKeyUsageOID.CLIENT_AUTH
    if not isinstance(eku, x509.ExtendedKeyUsage) or wanted not in eku:
        role = "serverAuth" if peer_is_server else "clientAuth"
        raise errors.BadKeyUsage(f"extended key usage lacks {role}")


def spiffe_id_of(cert: x509.Certificate, trust_domain: str) -> SpiffeId:
    """The one workload SPIFFE ID in `cert`, in `trust_domain`."""
    uris = uri_sans(cert)
    if not uris:
        raise errors.NoSpiffeId("the certificate has no URI SAN")
    if len(uris) > 1:
        raise errors.MultipleUriSans(f"the certificate has {len(uris)} URI SANs: {uris}")
    try:
        sid = SpiffeId.parse(uris[0])
    except InvalidIdentity as exc:
        if uris[0].startswith("spiffe://"):
            td = uris[0][len("spiffe://") :].partition("/")[0]
            if td != trust_domain:
                raise errors.WrongTrustDomain(f"{uris[0]} is not in {trust_domain}") from None
        raise errors.NoSpiffeId(str(exc)) from None
    if sid.trust_domain != trust_domain:
        raise errors.WrongTrustDomain(f"{sid} is not in trust domain {trust_domain}")
    if sid.is_cluster:
        raise errors.NoSpiffeId(f"{sid} names a cluster CA, not a gateway or agent")
    return sid


def _check_expected(sid: SpiffeId, expected_cluster: str | None) -> None:
    if expected_cluster is not None and sid.cluster != expected_cluster:
        raise errors.ClusterMismatch(f"expected a peer in cluster {expected_cluster}, got {sid}")


def check_verified_leaf(
    leaf: x509.Certificate,
    trust_domain: str,
    now: dt.datetime,
    *,
    peer_is_server: bool,
    expected_cluster: str | None = None,
) -> SpiffeId:
    """Checks on a leaf whose chain the TLS stack has already verified to a bundle root."""
    check_validity(leaf, now, "the peer certificate")
    check_leaf_usage(leaf, peer_is_server=peer_is_server)
    sid = spiffe_id_of(leaf, trust_domain)
    issuer = cluster_of_ca_name(leaf.issuer)
    if issuer is None:
        raise errors.ClusterMismatch(f"{sid} was not issued by a cluster CA")
    if issuer[0] != trust_domain:
        raise errors.WrongTrustDomain(f"{sid} was issued by a CA of trust domain {issuer[0]}")
    if issuer[1] != sid.cluster:
        raise errors.ClusterMismatch(f"{sid} was issued by cluster {issuer[1]}'s CA")
    _check_expected(sid, expected_cluster)
    return sid


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_ca(ca: x509.Certificate, depth_below: int, what: str) -> None:
    bc = _ext(ca, x509.BasicConstraints)
    if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
        raise errors.BadChain(f"{what} is not a CA")
    if bc.path_length is not None and depth_below > bc.path_length:
        raise errors.BadChain(f"{what} allows path length {bc.path_length}")
    ku = _ext(ca, x509.KeyUsage)
    if isinstance(ku, x509.KeyUsage) and not ku.key_cert_sign:
        raise errors.BadChain(f"{what} may not sign certificates")


def verify_chain(
    chain: Sequence[x509.Certificate],
    bundle: TrustBundle,
    trust_domain: str,
    now: dt.datetime | None = None,
    *,
    peer_is_server: bool = False,
    expected_cluster: str | None = None,
) -> SpiffeId:
    """Verify leaf -> cluster CA -> bundle root and every SPIFFE rule; return the leaf's ID."""
    if not chain:
        raise errors.NoPeerCertificate("no certificate")
    now = now or utcnow()
    leaf = chain[0]
    roots = set(bundle.fingerprints)
    intermediates = [
        c for c in chain[1:] if c.fingerprint(_SHA256).hex() not in roots and c.subject != c.issuer
    ]
    check_validity(leaf, now, "the peer certificate")
    ca = next((c for c in intermediates if _issued_by(leaf, c)), None)
    if ca is None:
        if bundle.issuers_of(leaf):
            raise errors.BadChain("the identity was issued by a root, not by a cluster CA")
        raise errors.UntrustedRoot(
            f"no CA in the chain or bundle issued {leaf.subject.rfc4514_string()}"
        )
    roots_for_ca = bundle.issuers_of(ca)
    if not roots_for_ca:
        raise errors.UntrustedRoot(f"{ca.subject.rfc4514_string()} does not chain to a bundle root")
    check_validity(ca, now, "the cluster CA")
    root = roots_for_ca[0]
    check_validity(root, now, "the root CA")
    _check_ca(ca, 0, "the cluster CA")
    _check_ca(root, 1, "the root CA")
    check_leaf_usage(leaf, peer_is_server=peer_is_server)
    sid = spiffe_id_of(leaf, trust_domain)
    ca_uris = uri_sans(ca)
    try:
        ca_id = SpiffeId.parse(ca_uris[0]) if len(ca_uris) == 1 else None
    except InvalidIdentity:
        ca_id = None
    if ca_id is None or not ca_id.is_cluster:
        raise errors.ClusterMismatch(f"{sid} was issued by a CA without a cluster SPIFFE ID")
    if ca_id.trust_domain != trust_domain:
        raise errors.WrongTrustDomain(f"{sid} was issued by {ca_id}")
    if ca_id.cluster != sid.cluster:
        raise errors.ClusterMismatch(f"{sid} was issued by {ca_id}")
    _check_expected(sid, expected_cluster)
    return sid


def verify_peer(
    peer: PeerSource,
    bundle: TrustBundle,
    trust_domain: str,
    now: dt.datetime | None = None,
    *,
    peer_is_server: bool | None = None,
    expected_cluster: str | None = None,
) -> SpiffeId:
    """The peer's SPIFFE ID after a handshake (an SSL object) or from a DER chain.

    Raises a `PeerVerificationError` subclass whose `reason` names the failure.
    """
    now = now or utcnow()
    if isinstance(peer, ssl.SSLObject | ssl.SSLSocket):
        if peer_is_server is None:
            peer_is_server = not peer.server_side
        der = peer.getpeercert(binary_form=True)
        if not der:
            raise errors.NoPeerCertificate("the peer presented no certificate")
        return check_verified_leaf(
            _load_der(der),
            trust_domain,
            now,
            peer_is_server=peer_is_server,
            expected_cluster=expected_cluster,
        )
    certs = [_load_der(d) for d in peer]
    return verify_chain(
        certs,
        bundle,
        trust_domain,
        now,
        peer_is_server=bool(peer_is_server),
        expected_cluster=expected_cluster,
    )


def _load_der(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise errors.BadChain(f"unparseable certificate: {exc}") from None
