"""The trust bundle: every root this appliance trusts (several during a root rotation)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from federation.trust.ca import fingerprint
from federation.trust.errors import PkiError


@dataclass(frozen=True, slots=True)
class TrustBundle:
    roots: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.roots:
            raise PkiError("a trust bundle needs at least one root")
        for root in self.roots:
            bc = _basic_constraints(root)
            if bc is None or not bc.ca or root.issuer != root.subject:
                raise PkiError(f"bundle entry {root.subject.rfc4514_string()} is not a root CA")

    @classmethod
    def of(cls, roots: Iterable[x509.Certificate]) -> TrustBundle:
        unique: dict[str, x509.Certificate] = {}
        for root in roots:
            unique.setdefault(fingerprint(root), root)
        return cls(tuple(unique.values()))

    @classmethod
    def from_pem(cls, data: bytes) -> TrustBundle:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise PkiError(f"trust bundle is not PEM certificates: {exc}") from None
        return cls.of(certs)

    def to_pem(self) -> bytes:
        return b"".join(r.public_bytes(serialization.Encoding.PEM) for r in self.roots)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint(r) for r in self.roots)

    def with_root(self, root: x509.Certificate) -> TrustBundle:
        return TrustBundle.of((*self.roots, root))

    def without(self, fingerprints: Iterable[str]) -> TrustBundle:
        drop = {f.lower().replace(":", "") for f in fingerprints}
        return TrustBundle(tuple(r for r in self.roots if fingerprint(r) not in drop))

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """Roots whose key signed `cert` (name match and signature check)."""
        found = []
        for root in self.roots:
            try:
                cert.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            found.append(root)
        return found


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
