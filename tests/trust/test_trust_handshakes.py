"""Every accept and reject case as a real mutual-TLS handshake on loopback, between contexts
built by federation.trust: each rejection is refused, counted by reason and logged."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation.trust import errors
from federation.trust.ca import Identity, utcnow
from federation.trust.connections import tls_connect
from federation.trust.contexts import client_context
from federation.trust.credentials import TlsCredentials
from federation.trust.spiffe import SpiffeId

pytestmark = pytest.mark.timeout(30)

KEY_ENCIPHERMENT_ONLY = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


async def greeting(creds: TlsCredentials, srv, **kw) -> tuple[SpiffeId, bytes]:  # type: ignore[no-untyped-def]
    """Connect, return (server's ID, the server's greeting - b'' if it refused us)."""
    conn = await tls_connect(srv.host, srv.port, creds, **kw)
    try:
        line = await asyncio.wait_for(conn.reader.readline(), 10)
    except (ssl.SSLError, ConnectionError):
        line = b""
    finally:
        conn.writer.close()
    return conn.peer, line


async def test_gateways_of_two_clusters_accept_each_other(pki, echo_server) -> None:
    srv = await echo_server(pki.credentials("east", "east-gw-1"))
    client = pki.credentials("west", "west-gw-1")
    peer, line = await greeting(client, srv, server_hostname="federation.east.mesh.test")
    assert peer == SpiffeId.parse("spiffe://mesh.test/cluster/east/gateway/east-gw-1")
    assert line == b"hello spiffe://mesh.test/cluster/west/gateway/west-gw-1\n"
    assert srv.accepted == [SpiffeId.parse("spiffe://mesh.test/cluster/west/gateway/west-gw-1")]


async def test_agent_accepted_and_expected_cluster_enforced(pki, echo_server) -> None:
    srv = await echo_server(pki.credentials("east", "east-gw-1"), expected_cluster="east")
    agent = pki.credentials("east", "vm-7", "agent")
    peer, line = await greeting(agent, srv, expected_cluster="east")
    assert peer.cluster == "east"
    assert line == b"hello spiffe://mesh.test/cluster/east/agent/vm-7\n"


def _bad_client(case: str, pki, other_pki, forge) -> Identity:  # type: ignore[no-untyped-def]
    now = utcnow()
    east = pki.east
    uri = "spiffe://mesh.test/cluster/east/gateway/bad"
    match case:
        case "other_root":
            return other_pki.identity("east", "bad")
        case "expired":
            return forge(
                east,
                uris=[uri],
                not_before=now - dt.timedelta(hours=3),
                not_after=now - dt.timedelta(hours=1),
            )
        case "not_yet_valid":
            return forge(
                east,
                uris=[uri],
                not_before=now + dt.timedelta(hours=1),
                not_after=now + dt.timedelta(hours=3),
            )
        case "server_auth_only":
            return forge(east, uris=[uri], eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        case "no_digital_signature":
            return forge(east, uris=[uri], key_usage=KEY_ENCIPHERMENT_ONLY)
        case "no_uri":
            return forge(east, uris=[], dns=["bad.example"])
        case "non_spiffe_uri":
            return forge(east, uris=["https://bad.example/"])
        case "two_uris":
            return forge(east, uris=[uri, "spiffe://mesh.test/cluster/east/gateway/other"])
        case "other_trust_domain":
            return forge(east, uris=["spiffe://other.test/cluster/east/gateway/bad"])
        case "other_cluster":
            return forge(east, uris=["spiffe://mesh.test/cluster/west/gateway/bad"])
        case "cluster_id_as_leaf":
            return forge(east, uris=["spiffe://mesh.test/cluster/east"])
    raise AssertionError(case)


REJECTIONS = [
    ("other_root", "untrusted_root"),
    ("expired", "expired"),
    ("not_yet_valid", "not_yet_valid"),
    ("server_auth_only", "bad_key_usage"),
    ("no_digital_signature", "bad_key_usage"),
    ("no_uri", "no_spiffe_id"),
    ("non_spiffe_uri", "no_spiffe_id"),
    ("cluster_id_as_leaf", "no_spiffe_id"),
    ("two_uris", "multiple_uri_sans"),
    ("other_trust_domain", "wrong_trust_domain"),
    ("other_cluster", "cluster_mismatch"),
]


@pytest.mark.parametrize(("case", "reason"), REJECTIONS)
async def test_server_refuses_bad_client_certificate(
    case: str, reason: str, pki, other_pki, forge, echo_server, failure_count, caplog
) -> None:
    srv = await echo_server(pki.credentials("east", "east-gw-1"))
    client_identity = _bad_client(case, pki, other_pki, forge)
    # The client trusts the server; only the server's verdict on the client is under test.
    client = TlsCredentials(client_identity, pki.bundle, trust_domain=pki.td)
    before = failure_count(reason)
    caplog.set_level(logging.WARNING, logger="federation.trust.observe")
    _peer, line = await greeting(client, srv)
    for _ in range(100):  # the server may finish its side just after the client
        if srv.refused:
            break
        await asyncio.sleep(0.05)
    assert line == b"", "a refused client must never get application data"
    assert srv.accepted == []
    assert [e.reason for e in srv.refused] == [reason]
    assert failure_count(reason) == before + 1
    lines = [r.getMessage() for r in caplog.records if "side=server" in r.getMessage()]
    assert len(lines) == 1 and f"reason={reason}" in lines[0]


async def test_server_refuses_client_without_certificate(pki, echo_server, failure_count) -> None:
    srv = await echo_server(pki.credentials("east", "east-gw-1"))
    before = failure_count("no_peer_certificate")
    ctx = client_context(None, pki.bundle)
    reader, writer = await asyncio.open_connection(srv.host, srv.port, ssl=ctx)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        if not await asyncio.wait_for(reader.readline(), 10):
            raise ConnectionResetError("closed without greeting")
    writer.close()
    for _ in range(100):
        if srv.refused:
            break
        await asyncio.sleep(0.05)
    assert [e.reason for e in srv.refused] == ["no_peer_certificate"]
    assert failure_count("no_peer_certificate") == before + 1


async def test_server_refuses_tls12(pki, echo_server, failure_count) -> None:
    srv = await echo_server(pki.credentials("east", "east-gw-1"))
    before = failure_count("protocol")
    ctx = client_context(pki.identity("west", "old-client"), pki.bundle)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection(srv.host, srv.port, ssl=ctx)
    for _ in range(100):
        if srv.refused:
            break
        await asyncio.sleep(0.05)
    assert [e.reason for e in srv.refused] == ["protocol"]
    assert failure_count("protocol") == before + 1


def _bad_server(case: str, pki, other_pki, forge) -> Identity:  # type: ignore[no-untyped-def]
    uri = "spiffe://mesh.test/cluster/east/gateway/east-gw-1"
    match case:
        case "other_root":
            return other_pki.identity("east", "east-gw-1")
        case "client_auth_only":
            return forge(pki.east, uris=[uri], eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
        case "other_cluster":
            return forge(pki.east, uris=["spiffe://mesh.test/cluster/west/gateway/w"])
        case "no_uri":
            return forge(pki.east, uris=[], dns=["east.example"])
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "error", "reason"),
    [
        ("other_root", errors.UntrustedRoot, "untrusted_root"),
        ("client_auth_only", errors.BadKeyUsage, "bad_key_usage"),
        ("other_cluster", errors.ClusterMismatch, "cluster_mismatch"),
        ("no_uri", errors.NoSpiffeId, "no_spiffe_id"),
    ],
)
async def test_client_refuses_bad_server_certificate(
    case: str, error: type, reason: str, pki, other_pki, forge, echo_server, failure_count
) -> None:
    server_creds = TlsCredentials(
        _bad_server(case, pki, other_pki, forge), pki.bundle, trust_domain=pki.td
    )
    srv = await echo_server(server_creds)
    client = pki.credentials("west", "west-gw-1")
    before = failure_count(reason)
    with pytest.raises(error) as info:
        await tls_connect(srv.host, srv.port, client)
    assert info.value.reason == reason
    assert failure_count(reason) == before + 1


async def test_client_refuses_server_of_unexpected_cluster(pki, echo_server, failure_count) -> None:
    srv = await echo_server(pki.credentials("west", "west-gw-1"))
    before = failure_count("cluster_mismatch")
    with pytest.raises(errors.ClusterMismatch):
        await tls_connect(
            srv.host, srv.port, pki.credentials("east", "east-gw-1"), expected_cluster="east"
        )
    assert failure_count("cluster_mismatch") == before + 1


async def test_server_expecting_a_cluster_refuses_another(pki, echo_server) -> None:
    srv = await echo_server(pki.credentials("east", "east-gw-1"), expected_cluster="east")
    _peer, line = await greeting(pki.credentials("west", "west-gw-1"), srv)
    for _ in range(100):
        if srv.refused:
            break
        await asyncio.sleep(0.05)
    assert line == b""
    assert [e.reason for e in srv.refused] == ["cluster_mismatch"]


def test_key_usage_cases_are_what_they_claim(pki, forge) -> None:
    """Guard the fixtures: the forged certificates differ from a good one only as named."""
    ident: Identity = forge(pki.east, uris=["spiffe://mesh.test/cluster/east/gateway/x"])
    eku = ident.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert ident.cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
