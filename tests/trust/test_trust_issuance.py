"""The control listener's identity issuance over real TLS on loopback: bootstrap tokens,
renewal with the current identity, refusals as JSON errors, and the client's checks."""

from __future__ import annotations

import ssl

import pytest

from federation.trust import errors
from federation.trust.ca import generate_key
from federation.trust.connections import tls_connect
from federation.trust.credentials import TlsCredentials
from federation.trust.issuance import request_identity
from federation.trust.renewal import IdentityManager, RemoteRenewer

pytestmark = pytest.mark.timeout(60)


def _csr_pem(key, pki, node: str = "vm-1") -> str:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    from federation.trust.ca import make_csr
    from federation.trust.spiffe import SpiffeId

    sid = SpiffeId.for_node(pki.td, "east", "agent", node)
    return make_csr(key, sid).public_bytes(serialization.Encoding.PEM).decode()


async def test_agent_bootstraps_with_token_then_renews_with_identity(
    pki, control, echo_server
) -> None:
    token, _ = control.tokens.create(300)
    key = generate_key()
    issued = await request_identity(
        control.addr,
        "vm-1",
        "agent",
        key,
        bundle=pki.bundle,
        bootstrap_token=token,
        trust_domain=pki.td,
        cluster="east",
    )
    ident = issued.identity
    assert str(ident.spiffe_id) == "spiffe://mesh.test/cluster/east/agent/vm-1"
    assert ident.key is key  # the key never left this process
    assert issued.bundle.fingerprints == pki.bundle.fingerprints

    # The new identity works in a real mTLS handshake with a gateway.
    agent = TlsCredentials(ident, issued.bundle)
    srv = await echo_server(pki.credentials("east", "east-gw-2"), host="127.31.4.2")
    conn = await tls_connect(srv.host, srv.port, agent, expected_cluster="east")
    assert await conn.reader.readline() == b"hello spiffe://mesh.test/cluster/east/agent/vm-1\n"
    conn.writer.close()

    # Renewal over mTLS with the current identity: no token needed, a fresh key.
    mgr = IdentityManager(agent, RemoteRenewer(control.addr, lambda: agent.bundle))
    renewed = await mgr.renew_now()
    assert renewed.spiffe_id == ident.spiffe_id
    assert renewed.serial != ident.serial
    assert renewed.key is not key


async def test_token_is_single_use(pki, control) -> None:
    token, _ = control.tokens.create(300)
    args = dict(bundle=pki.bundle, bootstrap_token=token, trust_domain=pki.td, cluster="east")
    await request_identity(control.addr, "vm-1", "agent", generate_key(), **args)
    with pytest.raises(errors.IssuanceError) as info:
        await request_identity(control.addr, "vm-2", "agent", generate_key(), **args)
    assert info.value.status == 401


async def test_identity_may_only_renew_itself(pki, control) -> None:
    vm1 = pki.identity("east", "vm-1", "agent")
    with pytest.raises(errors.IssuanceError) as info:
        await request_identity(
            control.addr, "vm-2", "agent", generate_key(), bundle=pki.bundle, identity=vm1
        )
    assert info.value.status == 403
    with pytest.raises(errors.IssuanceError) as info:
        await request_identity(
            control.addr, "vm-1", "gateway", generate_key(), bundle=pki.bundle, identity=vm1
        )
    assert info.value.status == 403


async def test_other_clusters_identity_is_refused(pki, control, failure_count) -> None:
    west_vm = pki.identity("west", "vm-1", "agent")
    key = generate_key()
    before = failure_count("cluster_mismatch")
    status, body = await control.post(
        {"csr": _csr_pem(key, pki), "node": "vm-1", "kind": "agent"}, {}, identity=west_vm
    )
    assert status == 403 and "cluster_mismatch" in body["error"]
    assert failure_count("cluster_mismatch") == before + 1


async def test_client_verifies_control_node_before_sending_token(pki, control) -> None:
    token, _ = control.tokens.create(300)
    with pytest.raises(errors.ClusterMismatch):
        await request_identity(
            control.addr,
            "vm-1",
            "agent",
            generate_key(),
            bundle=pki.bundle,
            bootstrap_token=token,
            trust_domain=pki.td,
            cluster="west",
        )
    assert control.tokens.count() == 1  # the token never reached the wrong cluster
    assert control.tokens.consume(token)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"node": "vm-1", "kind": "agent", "csr": "not a csr"}, 422, "csr"),
        ({"node": "VM_1", "kind": "agent", "csr": "x"}, 422, "node"),
        ({"node": "vm-1", "kind": "admin", "csr": "x"}, 422, "kind"),
        ({"node": "vm-1", "kind": "agent"}, 422, "csr"),
        (["not", "an", "object"], 400, None),
        (b"{not json", 400, None),
        (b"x" * (70 * 1024), 413, None),
    ],
)
async def test_bad_requests_are_json_errors(pki, control, body, status, field) -> None:  # type: ignore[no-untyped-def]
    token, _ = control.tokens.create(300)
    got, answer = await control.post(body, {"Authorization": f"Bearer {token}"})
    assert got == status
    assert isinstance(answer["error"], str) and answer["error"]
    assert answer.get("field") == field
    assert control.tokens.count() == 1, "a refused request must not burn the token"


async def test_no_credentials_is_401(pki, control) -> None:
    key = generate_key()
    status, body = await control.post({"csr": _csr_pem(key, pki), "node": "vm-1"}, {})
    assert status == 401 and "token" in body["error"]
    status, _ = await control.post(
        {"csr": _csr_pem(key, pki), "node": "vm-1"}, {"Authorization": "Bearer isthmus-bt-nope"}
    )
    assert status == 401


async def test_control_listener_rejects_untrusted_client_cert(pki, other_pki, control) -> None:
    stranger = other_pki.identity("east", "vm-1", "agent")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await control.post({"node": "vm-1"}, {}, identity=stranger)
