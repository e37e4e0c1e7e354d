"""The CA hierarchy: root -> one intermediate per cluster (path length 0) -> leaf identities.

Pure functions over `cryptography` objects; no files, no I/O (see `pemfiles` for that).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation.trust import names
from federation.trust.errors import CsrRejected, InvalidIdentity, PkiError
from federation.trust.spiffe import Kind, SpiffeId, check_trust_domain
from federation.trust.x509util import single_spiffe_id

ROOT_LIFETIME = dt.timedelta(days=3650)
CLUSTER_CA_LIFETIME = dt.timedelta(days=365)
IDENTITY_LIFETIME = dt.timedelta(hours=24)
# Backdate notBefore a little so peers with slightly slow clocks accept fresh certificates.
CLOCK_SKEW = dt.timedelta(minutes=5)
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)

PrivateKey = ec.EllipticCurvePrivateKey


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def generate_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_tag(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:12]


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex (what `openssl x509 -fingerprint` shows)."""
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A CA certificate with its private key: the root, or a cluster's intermediate."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def trust_domain(self) -> str:
        td = self.cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
        if len(td) != 1 or not isinstance(td[0].value, str):
            raise PkiError("CA certificate has no single O=<trust domain> in its subject")
        return td[0].value

    @property
    def spiffe_id(self) -> SpiffeId:
        """The cluster CA's `spiffe://<td>/cluster/<c>`; PkiError for a root."""
        sid = single_spiffe_id(self.cert)
        if sid is None or not sid.is_cluster:
            raise PkiError("certificate is not a cluster CA (no spiffe://<td>/cluster/<c> SAN)")
        return sid

    @property
    def cluster(self) -> str:
        return self.spiffe_id.cluster


@dataclass(frozen=True, slots=True)
class Identity:
    """A leaf identity: its private key and its chain (leaf first, then the cluster CA)."""

    key: PrivateKey
    chain: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.chain:
            raise PkiError("an identity needs at least its own certificate")
        if _public_der(self.chain[0].public_key()) != _public_der(self.key.public_key()):
            raise PkiError("the private key does not match the identity's certificate")

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def spiffe_id(self) -> SpiffeId:
        sid = single_spiffe_id(self.cert)
        if sid is None or sid.is_cluster:
            raise PkiError("certificate carries no single gateway/agent SPIFFE ID")
        return sid

    @property
    def not_before(self) -> dt.datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def renew_at(self) -> dt.datetime:
        """Half-life of the certificate (DESIGN §4)."""
        return self.not_before + (self.not_after - self.not_before) / 2

    @property
    def serial(self) -> int:
        return self.cert.serial_number


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ski(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _window(
    now: dt.datetime | None, lifetime: dt.timedelta, issuer: x509.Certificate | None
) -> tuple[dt.datetime, dt.datetime]:
    if lifetime <= dt.timedelta(0):
        raise PkiError(f"certificate lifetime must be positive, got {lifetime}")
    now = now or utcnow()
    # Short-lived certificates get a proportionally short backdate, or half-life would pass
    # the moment they are issued.
    start = now - min(CLOCK_SKEW, lifetime / 10)
    end = now + lifetime
    if issuer is not None:
        # Never outlive the issuer: a chain is only as valid as its shortest link.
        start = max(start, issuer.not_valid_before_utc)
        end = min(end, issuer.not_valid_after_utc)
        if end <= start:
            raise PkiError("the issuing CA has expired; re-issue it first")
    return start, end


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def create_root(
    trust_domain: str,
    *,
    lifetime: dt.timedelta = ROOT_LIFETIME,
    key: PrivateKey | None = None,
    now: dt.datetime | None = None,
) -> CertificateAuthority:
    """A self-signed root CA (ECDSA P-256) for `trust_domain`."""
    check_trust_domain(trust_domain)
    key = key or generate_key()
    start, end = _window(now, lifetime, None)
    name = names.root_name(trust_domain, key_tag(key.public_key()))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # Path length 1: root -> cluster CA -> leaf, and nothing deeper.
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(_ski(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def create_cluster_ca(
    root: CertificateAuthority,
    cluster: str,
    *,
    lifetime: dt.timedelta = CLUSTER_CA_LIFETIME,
    name_constraints: bool = False,
    key: PrivateKey | None = None,
    now: dt.datetime | None = None,
) -> CertificateAuthority:
    """A cluster's intermediate CA (path length 0) carrying `spiffe://<td>/cluster/<c>`.

    With `name_constraints`, the CA may only issue URI SANs under the trust domain's host -
    OpenSSL (and other verifiers) then enforce the trust domain even without Isthmus' checks.
    """
    key = key or generate_key()
    cert = _cluster_ca_cert(
        root, cluster, key.public_key(), lifetime=lifetime, name_constraints=name_constraints,
        now=now,
    )
    return CertificateAuthority(cert, key)


def _cluster_ca_cert(
    root: CertificateAuthority,
    cluster: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    lifetime: dt.timedelta,
    name_constraints: bool,
    now: dt.datetime | None,
) -> x509.Certificate:
    td = root.trust_domain
    sid = SpiffeId.for_cluster(td, cluster)
    start, end = _window(now, lifetime, root.cert)
    builder = (
        x509.CertificateBuilder()
        .subject_name(names.cluster_ca_name(td, cluster))
        .issuer_name(root.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]),
            critical=False,
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(root.cert), critical=False)
    )
    if name_constraints:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(td)], excluded_subtrees=None
            ),
            critical=True,
        )
    return builder.sign(root.key, hashes.SHA256())


def make_cluster_csr(
    key: PrivateKey, trust_domain: str, cluster: str
) -> x509.CertificateSigningRequest:
    """A CSR for cluster `cluster`'s CA: made where the cluster CA key lives (its control
    node), so that key never travels; the root's holder signs it with `sign_cluster_csr`."""
    sid = SpiffeId.for_cluster(check_trust_domain(trust_domain), cluster)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(names.cluster_ca_name(trust_domain, cluster))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def cluster_of_csr(csr: x509.CertificateSigningRequest, trust_domain: str) -> str:
    """The cluster a cluster-CA CSR asks for: its one URI SAN must be
    `spiffe://<trust_domain>/cluster/<c>`. Raises CsrRejected saying what is wrong."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrRejected("the CSR has no URI SAN spiffe://<td>/cluster/<cluster>") from None
    except ValueError as exc:
        raise CsrRejected(f"the CSR's extensions cannot be read: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CsrRejected(f"the CSR must carry exactly one URI SAN, it has {len(uris)}")
    try:
        sid = SpiffeId.parse(uris[0])
    except InvalidIdentity as exc:
        raise CsrRejected(f"the CSR's URI SAN: {exc}") from None
    if not sid.is_cluster:
        raise CsrRejected(f"the CSR asks for {sid}, not a cluster CA (spiffe://<td>/cluster/<c>)")
    if sid.trust_domain != trust_domain:
        raise CsrRejected(f"the CSR asks for {sid}, outside this root's trust domain "
                          f"{trust_domain}")
    return sid.cluster


def sign_cluster_csr(
    root: CertificateAuthority,
    csr: x509.CertificateSigningRequest,
    *,
    lifetime: dt.timedelta = CLUSTER_CA_LIFETIME,
    name_constraints: bool = False,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Sign a cluster CA's CSR (from `make_cluster_csr`) with the root: the certificate
    `create_cluster_ca` would make, for the key that stayed on the control node."""
    cluster = cluster_of_csr(csr, root.trust_domain)
    public_key = check_csr(csr)
    return _cluster_ca_cert(
        root, cluster, public_key, lifetime=lifetime, name_constraints=name_constraints, now=now
    )


def _check_public_key(public_key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, _ACCEPTED_CURVES
    ):
        raise CsrRejected("the key must be ECDSA P-256 or P-384")
    return public_key


def issue_certificate(
    ca: CertificateAuthority,
    spiffe_id: SpiffeId,
    public_key: ec.EllipticCurvePublicKey,
    *,
    lifetime: dt.timedelta = IDENTITY_LIFETIME,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Sign a leaf certificate for `spiffe_id` (which must belong to the CA's cluster)."""
    ca_id = ca.spiffe_id
    if spiffe_id.is_cluster:
        raise InvalidIdentity(f"{spiffe_id} names a cluster, not a gateway or agent")
    if spiffe_id.cluster_id != ca_id:
        raise InvalidIdentity(f"{ca_id}'s CA cannot issue {spiffe_id}: another cluster or domain")
    _check_public_key(public_key)
    start, end = _window(now, lifetime, ca.cert)
    assert spiffe_id.kind is not None and spiffe_id.node is not None
    return (
        x509.CertificateBuilder()
        .subject_name(names.leaf_name(spiffe_id.trust_domain, spiffe_id.kind, spiffe_id.node))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(ca.cert), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def issue_identity(
    ca: CertificateAuthority,
    kind: Kind | str,
    node: str,
    *,
    lifetime: dt.timedelta = IDENTITY_LIFETIME,
    key: PrivateKey | None = None,
    now: dt.datetime | None = None,
) -> Identity:
    """A fresh key and leaf for `<kind>/<node>` in the CA's cluster."""
    sid = SpiffeId.for_node(ca.trust_domain, ca.cluster, kind, node)
    key = key or generate_key()
    cert = issue_certificate(ca, sid, key.public_key(), lifetime=lifetime, now=now)
    return Identity(key, (cert, ca.cert))


def make_csr(key: PrivateKey, spiffe_id: SpiffeId) -> x509.CertificateSigningRequest:
    """A CSR for `spiffe_id`; the CA reads only its public key and proof of possession."""
    assert spiffe_id.kind is not None and spiffe_id.node is not None
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(names.leaf_name(spiffe_id.trust_domain, spiffe_id.kind, spiffe_id.node))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def sign_csr(
    ca: CertificateAuthority,
    csr: x509.CertificateSigningRequest,
    spiffe_id: SpiffeId,
    *,
    lifetime: dt.timedelta = IDENTITY_LIFETIME,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Sign `csr` for `spiffe_id`, which the caller has authorized.

    The CSR's own names are ignored: the identity comes from the authorization decision, the
    CSR only supplies the public key and proves its holder has the private key.
    """
    return issue_certificate(ca, spiffe_id, check_csr(csr), lifetime=lifetime, now=now)


def check_csr(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """The CSR's public key if `sign_csr` would accept it; raises CsrRejected saying why.
    (The issuer checks before it spends a bootstrap token on the request.)"""
    try:
        valid, public_key = csr.is_signature_valid, csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # a key or signature type unknown here
        raise CsrRejected(f"the CSR cannot be read: {exc}") from None
    if not valid:
        raise CsrRejected("the CSR's signature does not verify")
    return _check_public_key(public_key)
