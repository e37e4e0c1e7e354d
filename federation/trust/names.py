"""Distinguished names of the CA hierarchy.

A cluster CA's subject is `O=<trust domain>, OU=isthmus cluster CA, CN=<cluster>`. Only the root
issues cluster CAs (they have path length 0), and this package always writes the subject to
match the CA's `spiffe://<td>/cluster/<c>` URI SAN. So once a chain has been verified, the
leaf's *issuer* name says which cluster's CA signed it - which is what lets the issuer-cluster
check run on the leaf alone when the TLS stack (Python < 3.13) hides the rest of the chain.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

CLUSTER_CA_UNIT = "isthmus cluster CA"
ROOT_CA_UNIT = "isthmus root CA"


def root_name(trust_domain: str, tag: str) -> x509.Name:
    # `tag` (from the key's digest) keeps two roots of one trust domain apart during rotation.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ROOT_CA_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} root {tag}"),
        ]
    )


def cluster_ca_name(trust_domain: str, cluster: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, CLUSTER_CA_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, cluster),
        ]
    )


def leaf_name(trust_domain: str, kind: str, node: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
            x509.NameAttribute(NameOID.COMMON_NAME, node),
        ]
    )


def _single(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        return None
    return attrs[0].value


def cluster_of_ca_name(name: x509.Name) -> tuple[str, str] | None:
    """(trust domain, cluster) if `name` is a cluster CA's subject, else None."""
    if _single(name, NameOID.ORGANIZATIONAL_UNIT_NAME) != CLUSTER_CA_UNIT:
        return None
    td = _single(name, NameOID.ORGANIZATION_NAME)
    cluster = _single(name, NameOID.COMMON_NAME)
    if td is None or cluster is None:
        return None
    return td, cluster
