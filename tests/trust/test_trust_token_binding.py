"""Bootstrap tokens bound to a kind and a node, and refusals that keep the token (real TLS on
loopback, identities from the project's CA code).

The attacks: a token made for an agent's first identity minted a gateway identity under any
node name (the control node's own included), and a refused request (an RSA CSR) still spent
the token."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from federation.trust import errors
from federation.trust.ca import generate_key
from federation.trust.issuance import IdentityIssuer, IssueRequest, request_identity
from federation.trust.spiffe import Kind, SpiffeId
from federation.trust.tokens import BootstrapTokens

from .conftest import ControlNode, csr_pem

pytestmark = pytest.mark.timeout(60)


async def _request(pki, control: ControlNode, node: str, kind: str, token: str):  # type: ignore[no-untyped-def]
    return await request_identity(
        control.addr,
        node,
        kind,
        generate_key(),
        bundle=pki.bundle,
        bootstrap_token=token,
        trust_domain=pki.td,
        cluster="east",
    )


async def _refused(pki, control: ControlNode, node: str, kind: str, token: str):  # type: ignore[no-untyped-def]
    with pytest.raises(errors.IssuanceError) as info:
        await _request(pki, control, node, kind, token)
    return info.value


# --- item: a token made for an agent mints only an agent --------------------------------------


async def test_an_agent_token_cannot_mint_a_gateway_identity(pki, control) -> None:
    token, _ = control.tokens.create(300)  # what `isthmus token create` gives by default
    # the control node's own gateway name, and any other gateway name
    for node in ("east-gw-1", "east-gw-9"):
        err = await _refused(pki, control, node, "gateway", token)
        assert err.status == 403 and err.field == "kind", err
        assert "agent" in str(err) and "gateway" in str(err)
    assert control.tokens.count() == 1, "a refused request must not spend the token"
    issued = await _request(pki, control, "vm-1", "agent", token)  # what it was made for
    assert issued.identity.spiffe_id == SpiffeId.for_node(pki.td, "east", "agent", "vm-1")
    assert control.tokens.count() == 0


async def test_a_token_bound_to_a_node_mints_only_that_node(pki, control) -> None:
    token, _ = control.tokens.create(300, node="vm-17")
    err = await _refused(pki, control, "vm-18", "agent", token)
    assert err.status == 403 and err.field == "node" and "vm-17" in str(err)
    assert control.tokens.count() == 1
    issued = await _request(pki, control, "vm-17", "agent", token)
    assert issued.identity.spiffe_id.node == "vm-17"


async def test_a_gateway_token_mints_its_gateway_and_nothing_else(pki, control) -> None:
    token, _ = control.tokens.create(300, kind=Kind.GATEWAY, node="east-gw-2")
    err = await _refused(pki, control, "east-gw-2", "agent", token)
    assert err.status == 403 and err.field == "kind"
    err = await _refused(pki, control, "east-gw-3", "gateway", token)
    assert err.status == 403 and err.field == "node"
    issued = await _request(pki, control, "east-gw-2", "gateway", token)
    assert issued.identity.spiffe_id == SpiffeId.for_node(pki.td, "east", "gateway", "east-gw-2")


def test_a_gateway_token_must_name_its_node(tmp_path) -> None:
    tokens = BootstrapTokens(tmp_path)
    with pytest.raises(ValueError, match="node"):
        tokens.create(300, kind=Kind.GATEWAY)
    with pytest.raises(ValueError, match="node"):
        tokens.create(300, node="VM_1")
    with pytest.raises(ValueError, match="kind"):
        tokens.create(300, kind="admin")  # type: ignore[arg-type]
    assert tokens.count() == 0


# --- item: a live node name is never minted again ---------------------------------------------


async def test_the_control_nodes_own_name_is_refused_whatever_the_token(pki, control) -> None:
    bound, _ = control.tokens.create(300, kind=Kind.GATEWAY, node="east-gw-1")
    err = await _refused(pki, control, "east-gw-1", "gateway", bound)
    assert err.status == 409 and err.field == "node" and "control node" in str(err)
    agent_token, _ = control.tokens.create(300)
    err = await _refused(pki, control, "east-gw-1", "agent", agent_token)
    assert err.status == 409 and err.field == "node"
    assert control.tokens.count() == 2


async def test_an_unexpired_issued_identity_needs_a_token_bound_to_it(pki, control) -> None:
    first, _ = control.tokens.create(300)
    await _request(pki, control, "vm-1", "agent", first)
    # another unbound token cannot take over vm-1 while its identity is valid...
    second, _ = control.tokens.create(300)
    err = await _refused(pki, control, "vm-1", "agent", second)
    assert err.status == 409 and "vm-1" in str(err) and "--node" in str(err)
    assert control.tokens.count() == 1
    # ...nor after a restart of the control node (the record is on disk)
    again = ControlNode(pki, control.tokens.path.parent.parent)
    with pytest.raises(errors.IssuanceError) as info:
        again.issuer.issue(_issue_request(pki, "vm-1"), token=second, peer=None)
    assert info.value.status == 409
    # the operator names the node to replace it (a rebuilt VM)
    rebuilt, _ = control.tokens.create(300, node="vm-1")
    issued = await _request(pki, control, "vm-1", "agent", rebuilt)
    assert issued.identity.spiffe_id.node == "vm-1"
    # and the unbound token still serves another node
    await _request(pki, control, "vm-2", "agent", second)


async def test_a_connected_identity_is_refused_even_to_a_bound_token(pki, control) -> None:
    vm = SpiffeId.for_node(pki.td, "east", "agent", "vm-5")
    token, _ = control.tokens.create(300, node="vm-5")
    with control.issuer.live.connected(vm):
        err = await _refused(pki, control, "vm-5", "agent", token)
        assert err.status == 409 and "connected" in str(err)
    assert control.tokens.count() == 1
    await _request(pki, control, "vm-5", "agent", token)  # once it is gone


def _issue_request(pki, node: str, kind: Kind = Kind.AGENT) -> IssueRequest:  # type: ignore[no-untyped-def]
    pem = csr_pem(generate_key(), pki, node, kind.value)
    return IssueRequest(x509.load_pem_x509_csr(pem.encode()), node, kind)


def test_issued_records_expire(pki, tmp_path) -> None:
    now = [dt.datetime.now(dt.UTC)]
    tokens = BootstrapTokens(tmp_path, clock=lambda: now[0])
    issuer = IdentityIssuer(pki.east, tokens, lambda: pki.bundle, clock=lambda: now[0])
    t1, _ = tokens.create(dt.timedelta(days=5))
    issuer.issue(_issue_request(pki, "vm-1"), token=t1, peer=None)
    t2, _ = tokens.create(dt.timedelta(days=5))
    with pytest.raises(errors.IssuanceError):
        issuer.issue(_issue_request(pki, "vm-1"), token=t2, peer=None)
    now[0] += dt.timedelta(days=2)  # the 24 h identity has expired: vm-1 is free again
    sid, _ = issuer.issue(_issue_request(pki, "vm-1"), token=t2, peer=None)
    assert sid.node == "vm-1"
    stored = json.loads((tmp_path / "issued-identities.json").read_text())
    assert list(stored["identities"]) == [str(sid)]
    assert ((tmp_path / "issued-identities.json").stat().st_mode & 0o777) == 0o600


# --- item: a refused request keeps its token ---------------------------------------------------


def _rsa_csr_pem(pki, node: str = "vm-1") -> str:  # type: ignore[no-untyped-def]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sid = SpiffeId.for_node(pki.td, "east", "agent", node)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]), False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_an_rsa_csr_is_refused_and_the_token_survives(pki, control) -> None:
    token, _ = control.tokens.create(300)
    status, body = await control.post(
        {"csr": _rsa_csr_pem(pki), "node": "vm-1", "kind": "agent"},
        {"Authorization": f"Bearer {token}"},
    )
    assert status == 422 and body["field"] == "csr" and "ECDSA" in body["error"]
    assert control.tokens.count() == 1
    issued = await _request(pki, control, "vm-1", "agent", token)  # not 401
    assert issued.identity.spiffe_id.node == "vm-1"


async def test_a_csr_with_a_broken_signature_keeps_the_token(pki, control) -> None:
    token, _ = control.tokens.create(300)
    pem = csr_pem(generate_key(), pki)
    csr = x509.load_pem_x509_csr(pem.encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x55  # inside the signature
    broken = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    status, body = await control.post(
        {"csr": broken, "node": "vm-1", "kind": "agent"}, {"Authorization": f"Bearer {token}"}
    )
    assert status == 422 and body["field"] == "csr"
    assert control.tokens.count() == 1


# --- the stored record -----------------------------------------------------------------------


def test_a_tokens_file_of_the_old_format_loads_as_agent_unbound(pki, tmp_path) -> None:
    token = "isthmus-bt-made-by-an-older-isthmus"
    digest = hashlib.sha256(token.encode()).hexdigest()
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(microsecond=0)
    path = tmp_path / "bootstrap-tokens.json"
    path.write_text(json.dumps({"tokens": {digest: expires.isoformat()}}))
    path.chmod(0o600)
    tokens = BootstrapTokens(tmp_path)
    assert tokens.count() == 1
    issuer = IdentityIssuer(pki.east, tokens, lambda: pki.bundle)
    with pytest.raises(errors.IssuanceError) as info:
        issuer.issue(_issue_request(pki, "east-gw-7", Kind.GATEWAY), token=token, peer=None)
    assert info.value.status == 403
    sid, _ = issuer.issue(_issue_request(pki, "vm-3"), token=token, peer=None)
    assert sid == SpiffeId.for_node(pki.td, "east", "agent", "vm-3")
    assert tokens.count() == 0
    # new tokens are written in the new form, and load again
    tokens.create(60, node="vm-4")
    assert BootstrapTokens(tmp_path).count() == 1
    stored = json.loads(path.read_text())["tokens"]
    (record,) = stored.values()
    assert record["kind"] == "agent" and record["node"] == "vm-4"


async def test_an_unreadable_store_is_503_and_spends_nothing(pki, control) -> None:
    token, _ = control.tokens.create(300)
    issued = control.tokens.path.parent / "issued-identities.json"
    issued.write_text('{"identities": {"not a spiffe id": "x"}}')
    key = generate_key()
    headers = {"Authorization": f"Bearer {token}"}
    status, body = await control.post({"csr": csr_pem(key, pki), "node": "vm-1"}, headers)
    assert status == 503 and "issued-identities.json" in body["error"], body
    issued.unlink()
    assert control.tokens.count() == 1
    raw = control.tokens.path.read_bytes()
    control.tokens.path.write_text("{nope")
    status, body = await control.post({"csr": csr_pem(key, pki), "node": "vm-1"}, headers)
    assert status == 503 and "corrupt" in body["error"], body
    control.tokens.path.write_bytes(raw)
    status, body = await control.post({"csr": csr_pem(key, pki), "node": "vm-1"}, headers)
    assert status == 200, body
