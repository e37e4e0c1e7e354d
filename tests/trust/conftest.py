"""Fixtures for the trust tests: a PKI built by the project's own CA code, a forger for
misbehaving peers (certificates the CA code refuses to make), and a real mTLS echo server on
loopback (trust tests use 127.31.0.0/16)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation.trust import names
from federation.trust.bundle import TrustBundle
from federation.trust.ca import (
    CertificateAuthority,
    Identity,
    create_cluster_ca,
    create_root,
    generate_key,
    issue_identity,
    make_csr,
    utcnow,
)
from federation.trust.connections import tls_accept
from federation.trust.contexts import client_context
from federation.trust.credentials import TlsCredentials
from federation.trust.errors import TrustError
from federation.trust.issuance import IdentityIssuer, issuance_app
from federation.trust.observe import HANDSHAKE_FAILURES
from federation.trust.spiffe import SpiffeId
from federation.trust.tokens import BootstrapTokens

TD = "mesh.test"


@dataclass(frozen=True)
class Pki:
    td: str
    root: CertificateAuthority
    east: CertificateAuthority
    west: CertificateAuthority
    bundle: TrustBundle

    def identity(self, cluster: str, node: str, kind: str = "gateway", **kw: object) -> Identity:
        ca = self.east if cluster == "east" else self.west
        return issue_identity(ca, kind, node, **kw)  # type: ignore[arg-type]

    def credentials(self, cluster: str, node: str, kind: str = "gateway") -> TlsCredentials:
        return TlsCredentials(self.identity(cluster, node, kind), self.bundle)


def make_pki(td: str = TD) -> Pki:
    root = create_root(td)
    return Pki(
        td,
        root,
        create_cluster_ca(root, "east"),
        create_cluster_ca(root, "west"),
        TrustBundle.of([root.cert]),
    )


@pytest.fixture(scope="session")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="session")
def other_pki() -> Pki:
    """A second, unrelated root of the same trust domain name."""
    return make_pki()


def forge_leaf(
    ca: CertificateAuthority,
    *,
    uris: Sequence[str],
    key_usage: x509.KeyUsage | None = None,
    eku: Sequence[x509.ObjectIdentifier] = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    dns: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Identity:
    """A leaf signed by `ca` with whatever the test asks for - including what
    `issue_identity` refuses to produce. Only for simulating a misbehaving CA or peer."""
    key = generate_key()
    now = utcnow()
    ku = key_usage or x509.KeyUsage(
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
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(names.leaf_name(TD, "gateway", "forged"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=1))
        .not_valid_after(not_after or now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Identity(key, (builder.sign(ca.key, hashes.SHA256()), ca.cert))


@pytest.fixture
def forge() -> Callable[..., Identity]:
    return forge_leaf


def failures(reason: str) -> float:
    return HANDSHAKE_FAILURES.labels(reason=reason)._value.get()


@pytest.fixture
def failure_count() -> Callable[[str], float]:
    return failures


@dataclass
class EchoServer:
    """A real mTLS server on loopback: verifies each client with `tls_accept`, greets it
    with the SPIFFE ID it saw, then echoes lines."""

    credentials: TlsCredentials
    host: str
    port: int = 0
    accepted: list[SpiffeId] = field(default_factory=list)
    refused: list[TrustError] = field(default_factory=list)
    expected_cluster: str | None = None
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[object]] = field(default_factory=set)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.add(writer)
        task.add_done_callback(self.tasks.discard)
        try:
            conn = await tls_accept(
                reader, writer, self.credentials, expected_cluster=self.expected_cluster
            )
        except TrustError as err:
            self.refused.append(err)
            self.writers.discard(writer)
            return
        self.accepted.append(conn.peer)
        try:
            writer.write(f"hello {conn.peer}\n".encode())
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def start(self) -> EchoServer:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        # Close the open connections so their handlers return (cancelling a stream handler
        # task makes 3.11's StreamReaderProtocol log a spurious error).
        for writer in list(self.writers):
            writer.close()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 10)
        await self.server.wait_closed()


@pytest.fixture
async def echo_server() -> AsyncIterator[Callable[..., asyncio.Future[EchoServer]]]:
    servers: list[EchoServer] = []

    async def start(
        credentials: TlsCredentials, host: str = "127.31.0.1", **kw: object
    ) -> EchoServer:
        srv = EchoServer(credentials, host, **kw)  # type: ignore[arg-type]
        servers.append(srv)
        return await srv.start()

    yield start  # type: ignore[misc]
    for srv in servers:
        await srv.close()


# --- a control node serving identity issuance ------------------------------------------------


def csr_pem(key: object, pki: Pki, node: str = "vm-1", kind: str = "agent") -> str:
    sid = SpiffeId.for_node(pki.td, "east", kind, node)
    return make_csr(key, sid).public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[arg-type]


class ControlNode:
    def __init__(self, pki, tmp_path, cluster: str = "east", host: str = "127.31.4.1") -> None:  # type: ignore[no-untyped-def]
        self.pki = pki
        ca = pki.east if cluster == "east" else pki.west
        self.credentials = pki.credentials(cluster, f"{cluster}-gw-1")
        self.tokens = BootstrapTokens(tmp_path / cluster)
        self.issuer = IdentityIssuer(
            ca,
            self.tokens,
            lambda: self.credentials.bundle,
            own_identity=self.credentials.spiffe_id,
        )
        self.host = host
        self.runner = web.AppRunner(issuance_app(self.issuer))

    async def start(self) -> ControlNode:
        await self.runner.setup()
        ctx = self.credentials.listener_context(require_client_cert=False)
        site = web.TCPSite(self.runner, self.host, 0, ssl_context=ctx)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    async def post(self, body: object, headers: dict[str, str], identity=None) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
        """A raw request, for inputs `request_identity` would never send."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        ctx = client_context(identity, self.pki.bundle)
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=ctx)
        head = [
            "POST /v1/identity HTTP/1.1",
            f"Host: {self.addr}",
            "Connection: close",
            f"Content-Length: {len(data)}",
            "Content-Type: application/json",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        if not raw:
            raise ConnectionResetError("the control node closed the connection without answering")
        head_raw, _, payload = raw.partition(b"\r\n\r\n")
        return int(head_raw.split(b" ")[1]), json.loads(payload)


@pytest.fixture
async def control(pki, tmp_path) -> AsyncIterator[ControlNode]:  # type: ignore[no-untyped-def]
    node = await ControlNode(pki, tmp_path).start()
    yield node
    await node.runner.cleanup()
