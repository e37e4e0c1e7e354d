"""`ssl.SSLContext`s for mutual TLS 1.3 between Isthmus nodes.

The ssl module verifies the chain to a bundle root (and validity, key usage for the TLS role);
the SPIFFE rules are checked after the handshake by `verify.verify_peer`. Hostname checking is
off: peers are identified by their SPIFFE ID, not by a DNS name (SNI carries routing).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from federation.trust.bundle import TrustBundle
from federation.trust.ca import Identity
from federation.trust.pemfiles import certs_pem


def _base(purpose: ssl.Purpose, bundle: TrustBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=bundle.to_pem().decode("ascii"))
    # Strict RFC 5280 checks (e.g. CA basic constraints and key usage) on every chain.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def server_context(
    identity: Identity, bundle: TrustBundle, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting `identity`. Client certificates are required
    (optional only for the control listener, where agents bootstrap with a token)."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, bundle)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    load_identity(ctx, identity)
    return ctx


def client_context(identity: Identity | None, bundle: TrustBundle) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting `identity` (None only to bootstrap an identity)."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, bundle)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if identity is not None:
        load_identity(ctx, identity)
    return ctx


def load_identity(ctx: ssl.SSLContext, identity: Identity) -> None:
    """Load key and chain into `ctx` without writing the key to disk in the clear.

    The ssl module only loads from paths; on Linux the PEM goes through an anonymous memfd,
    elsewhere through a private temporary file holding the key encrypted with a one-off password.
    """
    chain = certs_pem(identity.chain)
    password = secrets.token_hex(32)
    if hasattr(os, "memfd_create"):
        key = identity.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with _memfile(chain) as cert_path, _memfile(key) as key_path:
            ctx.load_cert_chain(cert_path, key_path)
        return
    key = identity.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    )
    with tempfile.TemporaryDirectory(prefix="isthmus-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(chain)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        ctx.load_cert_chain(cert_path, key_path, password=password)


@contextlib.contextmanager
def _memfile(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("isthmus-pem", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
