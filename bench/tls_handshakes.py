"""Mutual-TLS 1.3 handshakes per second: contexts built by federation.trust vs `openssl s_time`.

    python bench/tls_handshakes.py [--seconds 5]

- python full:    client and server SSLObjects over memory BIOs in ONE process on one core
                  (both ends' CPU on that core), each handshake followed by `verify_peer` on
                  both sides, as the gateways do;
- python resumed: the same with the client offering the TLS 1.3 ticket from the first
                  handshake (PSK resumption, no certificate exchange);
- openssl:        `openssl s_time -new` / `-reuse` against `openssl s_server -www` on the same
                  certificates (two processes, each pinned to its own core when taskset exists).
Prints each figure, the ratios and the exact openssl commands.
"""

from __future__ import annotations

import argparse
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from discovery.addresses import split_host_port
from federation.trust.bundle import TrustBundle
from federation.trust.ca import create_cluster_ca, create_root, issue_identity
from federation.trust.contexts import client_context, server_context
from federation.trust.pemfiles import write_bundle, write_identity
from federation.trust.verify import verify_peer

TD = "bench.test"


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def handshake(
    cctx: ssl.SSLContext, sctx: ssl.SSLContext, bundle: TrustBundle, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool]:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(c_in, c_out, server_side=False, session=session)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    while not (c_done and s_done):
        if not c_done:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        _pump(c_out, s_in)
        if not s_done:
            try:
                server.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        _pump(s_out, c_in)
    _pump(c_out, s_in)
    # Reading after the client's Finished makes the server send its session tickets.
    with contextlib.suppress(ssl.SSLWantReadError):
        server.read(1)
    _pump(s_out, c_in)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.read(1)
    verify_peer(server, bundle, TD)
    verify_peer(client, bundle, TD)
    return client.session, client.session_reused


def python_rate(seconds: float, resumed: bool, cctx, sctx, bundle) -> float:  # type: ignore[no-untyped-def]
    session, _ = handshake(cctx, sctx, bundle, None)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        _, reused = handshake(cctx, sctx, bundle, session if resumed else None)
        if resumed and not reused:
            raise SystemExit("resumption did not happen; the figure would be wrong")
        n += 1
    return n / elapsed


def openssl_rate(seconds: float, reuse: bool, files: dict[str, Path]) -> tuple[float, str]:
    pin = ["taskset", "-c"] if shutil.which("taskset") else []
    server_cmd = [
        "openssl",
        "s_server",
        "-accept",
        "127.0.0.1:0",
        "-tls1_3",
        "-www",
        "-cert",
        str(files["server"]),
        "-key",
        str(files["server_key"]),
        "-cert_chain",
        str(files["ca"]),
        "-CAfile",
        str(files["bundle"]),
        "-Verify",
        "2",
    ]
    # s_server logs every connection: send that to a file, a pipe nobody drains would stall it.
    log_path = files["bundle"].with_name("s_server.log")
    log = log_path.open("w")
    srv = subprocess.Popen(
        [*pin, "0", *server_cmd] if pin else server_cmd,
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not (line := _accept_line(log_path)):
            if time.monotonic() > deadline or srv.poll() is not None:
                raise SystemExit("openssl s_server did not start")
            time.sleep(0.05)
        port = str(split_host_port(line.strip().rpartition(" ")[2])[1])
        client_cmd = [
            "openssl",
            "s_time",
            "-connect",
            f"127.0.0.1:{port}",
            "-time",
            str(int(seconds)),
            "-reuse" if reuse else "-new",
            "-cert",
            str(files["client"]),
            "-key",
            str(files["client_key"]),
            "-CAfile",
            str(files["bundle"]),
        ]
        out = subprocess.run(
            [*pin, "1", *client_cmd] if pin else client_cmd,
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=False,
        ).stdout
    finally:
        srv.kill()
        srv.wait()
        log.close()
    m = re.search(r"(\d+) connections in (\d+) real seconds", out)
    if m is None:
        raise SystemExit(f"cannot read s_time output:\n{out}")
    return int(m.group(1)) / max(1, int(m.group(2))), " ".join(client_cmd)


def _accept_line(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("ACCEPT"):
            return line
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    root = create_root(TD)
    east, west = create_cluster_ca(root, "east"), create_cluster_ca(root, "west")
    bundle = TrustBundle.of([root.cert])
    server_id = issue_identity(east, "gateway", "east-gw-1")
    client_id = issue_identity(west, "gateway", "west-gw-1")
    sctx = server_context(server_id, bundle)
    cctx = client_context(client_id, bundle)
    full = python_rate(args.seconds, False, cctx, sctx, bundle)
    resumed = python_rate(args.seconds, True, cctx, sctx, bundle)
    print(f"python full mTLS handshakes/s (one core, both ends): {full:8.0f}")
    print(f"python resumed (TLS 1.3 ticket) handshakes/s:        {resumed:8.0f}")
    if shutil.which("openssl") is None:
        print("openssl not installed: no side-by-side figures")
        return
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-") as tmp:
        d = Path(tmp)
        files = {
            "server": d / "server.pem",
            "server_key": d / "server.key",
            "client": d / "client.pem",
            "client_key": d / "client.key",
            "ca": d / "east-ca.pem",
            "bundle": d / "bundle.pem",
        }
        write_identity(files["server"], files["server_key"], server_id, force=False)
        # s_time sends only the first certificate of -cert: give it leaf + CA in one file
        # and the server's CAfile both roots of trust it needs (bundle + west CA).
        write_identity(files["client"], files["client_key"], client_id, force=False)
        files["ca"].write_bytes(server_id.chain[1].public_bytes(_PEM))
        write_bundle(files["bundle"], bundle)
        with files["bundle"].open("ab") as f:
            f.write(client_id.chain[1].public_bytes(_PEM))
        o_full, cmd_full = openssl_rate(args.seconds, False, files)
        o_res, cmd_res = openssl_rate(args.seconds, True, files)
    print(f"openssl s_time -new  connections/s (2 processes):    {o_full:8.0f}")
    print(f"openssl s_time -reuse connections/s:                 {o_res:8.0f}")
    print(f"ratio python/openssl full:    {full / o_full:.2f}")
    print(f"ratio python/openssl resumed: {resumed / o_res:.2f}")
    print(f"commands: {cmd_full}\n          {cmd_res}")


from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

_PEM = Encoding.PEM

if __name__ == "__main__":
    main()
