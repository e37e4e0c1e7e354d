"""A cluster CA whose key never leaves its control node: `isthmus ca csr` there makes the key
and a CSR, `isthmus ca sign-cluster` on the CA host signs it with the root. Then the control
node issues identities that verify under the bundle, as with `isthmus ca cluster`."""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.trust import names
from federation.trust.ca import (
    cluster_of_csr,
    create_root,
    generate_key,
    issue_identity,
    make_cluster_csr,
    make_csr,
    sign_cluster_csr,
)
from federation.trust.errors import CsrRejected
from federation.trust.layout import PkiLayout
from federation.trust.pemfiles import load_bundle, load_ca, load_certs, load_key
from federation.trust.spiffe import SpiffeId
from federation.trust.verify import verify_chain
from isthmus import config as configmod
from isthmus.cli_ca import add_parsers
from isthmus.identity import load_node_trust

pytestmark = pytest.mark.timeout(60)
TD = "mesh.test"


def ca(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="isthmus")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ca", *argv])
    return args.func(args)


def test_csr_on_the_control_node_signed_on_the_ca_host(tmp_path: Path, capsys) -> None:
    ca_dir, edge = tmp_path / "ca-host", tmp_path / "edge"
    assert ca("init", "--trust-domain", TD, "--dir", str(ca_dir)) == 0
    key, csr = edge / "cluster-ca.key", edge / "cluster-ca.csr"
    assert ca("csr", "--cluster", "east", "--trust-domain", TD, "--key", str(key),
              "--out", str(csr)) == 0
    assert (key.stat().st_mode & 0o777) == 0o600
    assert b"PRIVATE KEY" not in csr.read_bytes()
    out_cert = edge / "cluster-ca.pem"
    assert ca("sign-cluster", "--csr", str(csr), "--dir", str(ca_dir),
              "--out", str(out_cert)) == 0
    layout = PkiLayout(ca_dir)
    # The CA host keeps the certificate (for retire-root), never a key for the cluster.
    assert layout.cluster_ca_cert("east").read_bytes() == out_cert.read_bytes()
    assert not layout.cluster_ca_key("east").exists()
    assert layout.clusters() == ["east"]

    authority = load_ca(out_cert, key)
    assert str(authority.spiffe_id) == f"spiffe://{TD}/cluster/east"
    bc = authority.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    identity = issue_identity(authority, "gateway", "east-edge")
    bundle = load_bundle(layout.bundle)
    sid = verify_chain(list(identity.chain), bundle, trust_domain=TD)
    assert sid == SpiffeId.for_node(TD, "east", "gateway", "east-edge")
    # openssl agrees the chain holds (an outside verifier, not our own code)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(identity.chain[0].public_bytes(serialization.Encoding.PEM))
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(layout.bundle), "-untrusted",
                           str(out_cert), str(leaf)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_csr_keeps_an_existing_key_unless_forced(tmp_path: Path) -> None:
    key, csr = tmp_path / "ca.key", tmp_path / "ca.csr"
    args = ["csr", "--cluster", "east", "--trust-domain", TD, "--key", str(key), "--out", str(csr)]
    assert ca(*args) == 0
    first = key.read_bytes()
    assert ca(*args) == 0  # a second run (an Ansible re-run, a rotation) signs the same key
    assert key.read_bytes() == first
    public = x509.load_pem_x509_csr(csr.read_bytes()).public_key()
    assert public == load_key(key).public_key()
    assert ca(*args, "--force") == 0
    assert key.read_bytes() != first
    assert (key.stat().st_mode & 0o777) == 0o600


def test_sign_cluster_refuses_to_replace_without_force(tmp_path: Path, capsys) -> None:
    ca_dir = tmp_path / "ca"
    assert ca("init", "--trust-domain", TD, "--dir", str(ca_dir)) == 0
    csr = tmp_path / "c.csr"
    assert ca("csr", "--cluster", "west", "--trust-domain", TD, "--key",
              str(tmp_path / "c.key"), "--out", str(csr)) == 0
    assert ca("sign-cluster", "--csr", str(csr), "--dir", str(ca_dir)) == 0
    capsys.readouterr()
    assert ca("sign-cluster", "--csr", str(csr), "--dir", str(ca_dir)) == 1
    assert "--force" in capsys.readouterr().err
    assert ca("sign-cluster", "--csr", str(csr), "--dir", str(ca_dir), "--force") == 0


def test_retire_root_sees_clusters_signed_from_csrs(tmp_path: Path, capsys) -> None:
    ca_dir = tmp_path / "ca"
    key, csr = tmp_path / "east.key", tmp_path / "east.csr"
    assert ca("init", "--trust-domain", TD, "--dir", str(ca_dir)) == 0
    assert ca("csr", "--cluster", "east", "--trust-domain", TD, "--key", str(key),
              "--out", str(csr)) == 0
    assert ca("sign-cluster", "--csr", str(csr), "--dir", str(ca_dir)) == 0
    assert ca("rotate-root", "--dir", str(ca_dir)) == 0
    capsys.readouterr()
    assert ca("retire-root", "--dir", str(ca_dir)) == 1
    assert "east" in capsys.readouterr().err
    # Re-signed under the new root with the same key (it never left the control node).
    assert ca("sign-cluster", "--csr", str(csr), "--dir", str(ca_dir), "--force") == 0
    assert ca("retire-root", "--dir", str(ca_dir)) == 0
    assert len(load_bundle(PkiLayout(ca_dir).bundle).roots) == 1


def _csr_with(uris: list[str], key: ec.EllipticCurvePrivateKey | None = None):
    key = key or generate_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        names.cluster_ca_name(TD, "east"))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(("uris", "reason"), [
    ([], "no URI SAN"),
    ([f"spiffe://{TD}/cluster/east", f"spiffe://{TD}/cluster/west"], "exactly one"),
    ([f"spiffe://{TD}/cluster/east/gateway/gw"], "not a cluster CA"),
    (["spiffe://other.test/cluster/east"], "outside this root's trust domain"),
    (["https://example.org/"], "URI SAN"),
])
def test_sign_cluster_refuses_what_is_not_a_cluster_ca_of_this_domain(uris, reason) -> None:
    root = create_root(TD)
    with pytest.raises(CsrRejected, match=reason):
        sign_cluster_csr(root, _csr_with(uris))


def test_sign_cluster_refuses_a_leaf_csr_and_a_bad_key() -> None:
    root = create_root(TD)
    leaf_csr = make_csr(generate_key(), SpiffeId.for_node(TD, "east", "agent", "vm"))
    with pytest.raises(CsrRejected, match="not a cluster CA"):
        sign_cluster_csr(root, leaf_csr)
    weak = _csr_with([f"spiffe://{TD}/cluster/east"], ec.generate_private_key(ec.SECP521R1()))
    with pytest.raises(CsrRejected, match="P-256"):
        sign_cluster_csr(root, weak)
    assert cluster_of_csr(make_cluster_csr(generate_key(), TD, "west"), TD) == "west"


def test_a_control_node_reissues_its_identity_when_its_ca_certificate_changed(
    tmp_path: Path,
) -> None:
    """Root rotation step 3 re-signs a cluster CA (same key, new root): on its next start the
    control node must present an identity chained to the new CA certificate at once, not keep
    the old chain until half-life (retiring the old root would then cut it off)."""
    pki = tmp_path / "pki"
    root_a = create_root(TD)
    key = generate_key()
    csr = make_cluster_csr(key, TD, "east")
    cert_a = sign_cluster_csr(root_a, csr)
    raw = {
        "cluster": "east", "trust_domain": TD, "node": "east-edge", "roles": ["control"],
        "data_dir": str(tmp_path / "data"),
        "trust": {"bundle": str(pki / "bundle.pem"), "ca_cert": str(pki / "ca.pem"),
                  "ca_key": str(pki / "ca.key"), "cert": str(pki / "node.pem"),
                  "key": str(pki / "node.key")},
    }
    cfg = configmod.validate(raw)
    pki.mkdir()
    (pki / "ca.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (pki / "ca.pem").write_bytes(cert_a.public_bytes(serialization.Encoding.PEM))
    (pki / "bundle.pem").write_bytes(root_a.cert.public_bytes(serialization.Encoding.PEM))
    first = load_node_trust(cfg)
    assert first.credentials.identity.chain[1] == cert_a

    root_b = create_root(TD)
    cert_b = sign_cluster_csr(root_b, csr, now=dt.datetime.now(dt.UTC))
    (pki / "ca.pem").write_bytes(cert_b.public_bytes(serialization.Encoding.PEM))
    (pki / "bundle.pem").write_bytes(b"".join(
        r.cert.public_bytes(serialization.Encoding.PEM) for r in (root_b, root_a)))
    second = load_node_trust(cfg)
    assert second.credentials.identity.chain[1] == cert_b
    assert load_certs(pki / "node.pem")[1] == cert_b
