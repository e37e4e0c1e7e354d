"""The asyncio shell: mutual-TLS handshakes that end with a verified peer SPIFFE ID.

Both helpers run the handshake themselves (not through `start_server(ssl=...)`, which drops
handshake errors silently) so every refusal is classified, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

from federation.trust.credentials import TlsCredentials
from federation.trust.errors import TrustError
from federation.trust.observe import classify, record_failure
from federation.trust.spiffe import SpiffeId
from federation.trust.verify import verify_peer

HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class VerifiedConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: SpiffeId

    @property
    def ssl_object(self) -> ssl.SSLObject:
        obj = self.writer.get_extra_info("ssl_object")
        assert obj is not None
        return obj


def _peer_text(writer: asyncio.StreamWriter) -> str | None:
    addr = writer.get_extra_info("peername")
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return None


def _abort(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


def _check(
    writer: asyncio.StreamWriter,
    credentials: TlsCredentials,
    *,
    expected_cluster: str | None,
    side: str,
    peer: str | None,
) -> SpiffeId:
    ssl_object = writer.get_extra_info("ssl_object")
    try:
        if ssl_object is None:
            raise classify(ssl.SSLError("no TLS session after the handshake"))
        # The context this connection actually used (it may have been swapped by SNI).
        return verify_peer(
            ssl_object,
            credentials.bundle,
            credentials.trust_domain,
            expected_cluster=expected_cluster,
        )
    except TrustError as err:
        record_failure(err, side=side, peer=peer)
        _abort(writer)
        raise


async def tls_accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    credentials: TlsCredentials,
    *,
    expected_cluster: str | None = None,
    require_client_cert: bool = True,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> VerifiedConnection:
    """Upgrade an accepted TCP stream to mutual TLS and verify the client.

    Raises a TrustError (already counted and logged; the connection is closed).
    """
    peer = _peer_text(writer)
    ctx = credentials.server_context(require_client_cert=require_client_cert)
    try:
        await writer.start_tls(ctx, ssl_handshake_timeout=timeout)
    except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
        err = classify(exc)
        record_failure(err, side="server", peer=peer)
        _abort(writer)
        raise err from exc
    sid = _check(writer, credentials, expected_cluster=expected_cluster, side="server", peer=peer)
    return VerifiedConnection(reader, writer, sid)


async def tls_connect(
    host: str,
    port: int,
    credentials: TlsCredentials,
    *,
    server_hostname: str | None = None,
    expected_cluster: str | None = None,
    local_addr: tuple[str, int] | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> VerifiedConnection:
    """Open a mutual-TLS connection and verify the server's identity.

    `server_hostname` is sent as SNI (routing), not checked against the certificate; pass
    `expected_cluster` to require a server of that cluster. Raises a TrustError (counted, logged)
    for a refused handshake and OSError when the connection cannot be made at all.
    """
    peer = f"{host}:{port}"
    try:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
        async with asyncio.timeout(timeout + 1.0):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=credentials.client_context(),
                server_hostname=server_hostname,
                local_addr=local_addr,
                ssl_handshake_timeout=timeout,
            )
    except (ssl.SSLError, TimeoutError) as exc:
        err = classify(exc)
        record_failure(err, side="client", peer=peer)
        raise err from exc
    try:
        sid = _check(
            writer, credentials, expected_cluster=expected_cluster, side="client", peer=peer
        )
    except TrustError:
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        raise
    return VerifiedConnection(reader, writer, sid)
