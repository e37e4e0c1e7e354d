"""Outside checkers: `openssl verify` on what the CLI writes, `openssl s_client` against our
server, our client against `openssl s_server`."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from federation.trust.connections import tls_connect
from federation.trust.credentials import TlsCredentials
from federation.trust.layout import PkiLayout
from federation.trust.pemfiles import load_bundle, load_identity
from federation.trust.spiffe import SpiffeId
from isthmus.cli_ca import main as ca_main

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]


@pytest.fixture
def pki_dir(tmp_path) -> PkiLayout:
    d = str(tmp_path / "pki")
    assert ca_main(["ca", "init", "--trust-domain", "mesh.test", "--dir", d]) == 0
    for c in ("east", "west"):
        assert ca_main(["ca", "cluster", "--cluster", c, "--dir", d]) == 0
        assert ca_main(["ca", "issue", "--cluster", c, "--node", f"{c}-gw-1", "--dir", d]) == 0
    return PkiLayout(Path(d))


def openssl_verify(
    layout: PkiLayout, cluster: str, leaf: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    cmd = [
        "openssl",
        "verify",
        "-x509_strict",
        *extra,
        "-CAfile",
        str(layout.bundle),
        "-untrusted",
        str(layout.cluster_ca_cert(cluster)),
        str(leaf),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)


def test_openssl_verify_accepts_cli_identities(pki_dir) -> None:
    for c in ("east", "west"):
        leaf = pki_dir.identity_cert(c, "gateway", f"{c}-gw-1")
        for purpose in ("sslserver", "sslclient"):
            done = openssl_verify(pki_dir, c, leaf, "-purpose", purpose)
            assert done.returncode == 0 and ": OK" in done.stdout, done.stderr


def test_openssl_verify_refuses_another_root(pki_dir, tmp_path) -> None:
    other = str(tmp_path / "other")
    assert ca_main(["ca", "init", "--trust-domain", "mesh.test", "--dir", other]) == 0
    foreign = PkiLayout(Path(other))
    done = openssl_verify(foreign, "east", pki_dir.identity_cert("east", "gateway", "east-gw-1"))
    assert done.returncode != 0


def _creds(layout: PkiLayout, cluster: str) -> TlsCredentials:
    ident = load_identity(
        layout.identity_cert(cluster, "gateway", f"{cluster}-gw-1"),
        layout.identity_key(cluster, "gateway", f"{cluster}-gw-1"),
    )
    return TlsCredentials(ident, load_bundle(layout.bundle))


async def _s_client(host: str, port: int, *args: str, until: str = "hello ") -> str:
    """Run s_client with stdin held open; its output up to `until` (or up to its exit)."""
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"{host}:{port}",
        "-tls1_3",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = ""
    try:
        while until not in out:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            if not line:
                break
            out += line.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    return out


async def test_openssl_s_client_with_identity_is_accepted(pki_dir, echo_server) -> None:
    srv = await echo_server(_creds(pki_dir, "east"), host="127.31.5.1")
    west_cert = pki_dir.identity_cert("west", "gateway", "west-gw-1")
    out = await _s_client(
        srv.host,
        srv.port,
        "-cert",
        str(west_cert),
        "-key",
        str(west_cert.with_suffix(".key")),
        "-cert_chain",
        str(pki_dir.cluster_ca_cert("west")),
        "-CAfile",
        str(pki_dir.bundle),
        "-verify_return_error",
    )
    assert "Verify return code: 0 (ok)" in out
    assert "hello spiffe://mesh.test/cluster/west/gateway/west-gw-1" in out
    assert srv.accepted == [SpiffeId.parse("spiffe://mesh.test/cluster/west/gateway/west-gw-1")]


async def test_openssl_s_client_without_certificate_is_refused(pki_dir, echo_server) -> None:
    srv = await echo_server(_creds(pki_dir, "east"), host="127.31.5.2")
    out = await _s_client(srv.host, srv.port, "-CAfile", str(pki_dir.bundle))
    assert "hello" not in out
    for _ in range(100):
        if srv.refused:
            break
        await asyncio.sleep(0.05)
    assert [e.reason for e in srv.refused] == ["no_peer_certificate"]


async def test_our_client_against_openssl_s_server(pki_dir) -> None:
    east_cert = pki_dir.identity_cert("east", "gateway", "east-gw-1")
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_server",
        "-accept",
        "127.31.5.3:0",
        "-tls1_3",
        "-naccept",
        "1",
        "-cert",
        str(east_cert),
        "-key",
        str(east_cert.with_suffix(".key")),
        "-cert_chain",
        str(pki_dir.cluster_ca_cert("east")),
        "-CAfile",
        str(pki_dir.bundle),
        "-Verify",
        "2",
        "-verify_return_error",
        # s_server quits at EOF on stdin: hold a pipe open for as long as it runs.
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, "s_server exited"
            if line.startswith("ACCEPT"):
                port = int(line.rsplit(":", 1)[1])
        conn = await tls_connect(
            "127.31.5.3", port, _creds(pki_dir, "west"), expected_cluster="east"
        )
        assert conn.peer == SpiffeId.parse("spiffe://mesh.test/cluster/east/gateway/east-gw-1")
        conn.writer.write(b"from python\n")
        await conn.writer.drain()
        seen = b""
        while b"from python" not in seen:
            chunk = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert chunk, "s_server exited before echoing our data"
            seen += chunk
        conn.writer.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
