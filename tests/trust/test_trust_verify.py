"""Sans-IO verification of whole DER chains (no sockets), SPIFFE IDs and the CA's output."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from federation.trust import errors
from federation.trust.ca import create_cluster_ca, generate_key, issue_identity, make_csr, sign_csr
from federation.trust.errors import CsrRejected, InvalidIdentity, KeyExists
from federation.trust.pemfiles import write_key
from federation.trust.spiffe import SpiffeId
from federation.trust.verify import verify_chain, verify_peer

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(
    td=st.lists(LABEL, min_size=1, max_size=3).map(".".join),
    cluster=LABEL,
    kind=st.sampled_from(["gateway", "agent"]),
    node=LABEL,
)
def test_spiffe_id_round_trip(td: str, cluster: str, kind: str, node: str) -> None:
    sid = SpiffeId.for_node(td, cluster, kind, node)
    assert SpiffeId.parse(str(sid)) == sid
    assert SpiffeId.parse(str(sid.cluster_id)) == sid.cluster_id


@pytest.mark.parametrize(
    "uri",
    [
        "http://mesh.test/cluster/east",
        "spiffe://mesh.test",
        "spiffe://mesh.test/cluster/East",
        "spiffe://mesh.test/cluster/east/db/x",
        "spiffe://Mesh.test/cluster/east",
        "spiffe://mesh.test/cluster/east/gateway/x/y",
        "spiffe:///cluster/east",
    ],
)
def test_spiffe_id_rejects(uri: str) -> None:
    with pytest.raises(InvalidIdentity):
        SpiffeId.parse(uri)


def der(chain) -> list[bytes]:  # type: ignore[no-untyped-def]
    return [c.public_bytes(Encoding.DER) for c in chain]


def test_good_chain(pki) -> None:
    ident = pki.identity("east", "gw")
    assert verify_peer(der(ident.chain), pki.bundle, pki.td) == ident.spiffe_id
    # Extra roots in the chain are ignored; a missing CA is "untrusted_root".
    assert verify_chain([*ident.chain, pki.root.cert], pki.bundle, pki.td) == ident.spiffe_id
    with pytest.raises(errors.UntrustedRoot):
        verify_chain(ident.chain[:1], pki.bundle, pki.td)


def test_chain_level_rejections(pki, other_pki, forge) -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(errors.UntrustedRoot):
        verify_chain(other_pki.identity("east", "gw").chain, pki.bundle, pki.td)
    with pytest.raises(errors.Expired):
        verify_chain(
            pki.identity("east", "gw").chain, pki.bundle, pki.td, now + dt.timedelta(days=2)
        )
    with pytest.raises(errors.NotYetValid):
        verify_chain(
            pki.identity("east", "gw").chain, pki.bundle, pki.td, now - dt.timedelta(days=1)
        )
    # A leaf signed directly by the root skips the cluster CA: refused.
    leaf = forge(pki.root, uris=["spiffe://mesh.test/cluster/east/gateway/x"])
    with pytest.raises(errors.BadChain):
        verify_chain(leaf.chain[:1], pki.bundle, pki.td)
    # The server role needs serverAuth.
    client_only = forge(
        pki.east,
        uris=["spiffe://mesh.test/cluster/east/gateway/x"],
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    verify_chain(client_only.chain, pki.bundle, pki.td)
    with pytest.raises(errors.BadKeyUsage):
        verify_chain(client_only.chain, pki.bundle, pki.td, peer_is_server=True)


def test_issuer_cluster_comes_from_the_ca_san(pki, forge) -> None:
    wrong = forge(pki.west, uris=["spiffe://mesh.test/cluster/east/gateway/x"])
    with pytest.raises(errors.ClusterMismatch):
        verify_chain(wrong.chain, pki.bundle, pki.td)
    with pytest.raises(errors.ClusterMismatch):
        verify_chain(pki.identity("east", "gw").chain, pki.bundle, pki.td, expected_cluster="west")
    with pytest.raises(errors.WrongTrustDomain):
        verify_chain(pki.identity("east", "gw").chain, pki.bundle, "other.test")


def test_issued_certificates_have_the_contracted_shape(pki) -> None:
    ident = pki.identity("east", "gw", lifetime=dt.timedelta(hours=24))
    cert = ident.cert
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    uris = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [str(ident.spiffe_id)]
    assert ident.not_after - ident.not_before <= dt.timedelta(hours=24, minutes=5)
    ca_bc = pki.east.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_bc.ca and ca_bc.path_length == 0
    assert pki.root.cert.not_valid_after_utc - pki.root.cert.not_valid_before_utc >= dt.timedelta(
        days=3650
    )
    assert ident.renew_at - ident.not_before == (ident.not_after - ident.not_before) / 2


def test_ca_refuses_other_clusters_and_bad_csrs(pki) -> None:
    key = generate_key()
    west_id = SpiffeId.for_node(pki.td, "west", "agent", "vm")
    with pytest.raises(InvalidIdentity):
        sign_csr(pki.east, make_csr(key, west_id), west_id)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = ed25519.Ed25519PrivateKey.generate()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(ed, None)
    with pytest.raises(CsrRejected):
        sign_csr(pki.east, csr, SpiffeId.for_node(pki.td, "east", "agent", "vm"))


def test_name_constrained_cluster_ca(pki) -> None:
    ca = create_cluster_ca(pki.root, "south", name_constraints=True)
    ident = issue_identity(ca, "gateway", "s1")
    assert verify_chain(ident.chain, pki.bundle, pki.td).cluster == "south"


def test_keys_are_0600_and_never_overwritten(tmp_path) -> None:
    path = tmp_path / "k.key"
    write_key(path, generate_key())
    assert (path.stat().st_mode & 0o777) == 0o600
    first = path.read_bytes()
    with pytest.raises(KeyExists):
        write_key(path, generate_key())
    assert path.read_bytes() == first
    write_key(path, generate_key(), force=True)
    assert path.read_bytes() != first and (path.stat().st_mode & 0o777) == 0o600
