"""Small readers over `cryptography` certificates shared by the CA and the verifier."""

from __future__ import annotations

from cryptography import x509

from federation.trust.errors import InvalidIdentity
from federation.trust.spiffe import SpiffeId


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def single_spiffe_id(cert: x509.Certificate) -> SpiffeId | None:
    """The certificate's one SPIFFE ID, or None if it has none, several, or a malformed one."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(uris[0])
    except InvalidIdentity:
        return None
