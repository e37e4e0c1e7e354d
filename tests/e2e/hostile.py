"""A hostile host on the public segment (a program run in the intruder's network namespace).
Each mode prints one JSON line saying what the target did.

    identity  --cert C --key K --sni SNI   mutual TLS with the given identity, then a request
              (a feed subscription for a federation. SNI, an HTTP GET otherwise): "accepted"
              when any answer came back, "refused" otherwise
    plaintext                              an HTTP request in clear: "dropped" or "answered"
    garbage   --count N                    N connections sending a TLS record header and junk
    silent    --count N --hold S           N connections that never send a ClientHello, held
              S seconds: how many the target refused, closed, or left open
    syn       --count N --hold S           N connections whose handshake never completes (the
              caller drops the SYN-ACKs): half-open on the target's side

The target is `--target HOST:PORT` (the ingress' public address).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import socket
import ssl
import struct
import sys
import time


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host, int(port)


def identity(args: argparse.Namespace) -> dict[str, object]:
    host, port = split(args.target)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # an attacker does not care who answers
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    out: dict[str, object] = {"mode": "identity", "sni": args.sni}
    try:
        with socket.create_connection((host, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=args.sni) as tls:
            out["handshake"] = "completed"  # TLS 1.3: the server checks us after this
            if args.sni.startswith("federation."):
                msg = json.dumps({"type": "subscribe", "cluster": args.cluster, "epoch": None,
                                  "version": 0}).encode()
                tls.sendall(struct.pack(">I", len(msg)) + msg)
            else:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            tls.settimeout(5)
            data = tls.recv(4096)
            out["outcome"] = "accepted" if data else "refused"
            out["detail"] = f"{len(data)} bytes back" if data else "closed without data"
    except ssl.SSLError as e:
        out["outcome"], out["detail"] = "refused", f"tls: {e.reason or e}"
    except (ConnectionError, TimeoutError, OSError) as e:
        out["outcome"], out["detail"] = "refused", f"{type(e).__name__}: {e}"
    return out


def plaintext(args: argparse.Namespace) -> dict[str, object]:
    host, port = split(args.target)
    out: dict[str, object] = {"mode": "plaintext"}
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
            s.settimeout(args.hold)
            data = b""
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                while chunk := s.recv(4096):
                    data += chunk
            out["outcome"] = "answered" if data.startswith(b"HTTP/") else "dropped"
            out["bytes_back"] = len(data)
    except OSError as e:
        out["outcome"], out["detail"] = "dropped", f"{type(e).__name__}: {e}"
    return out


async def _garbage_one(host: str, port: int, rng: random.Random) -> str:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return "refused"
    try:
        junk = bytes([0x16, 0x03, 0x01]) + struct.pack(">H", 512) + rng.randbytes(512)
        if rng.random() < 0.5:
            junk = rng.randbytes(rng.randint(1, 1500))  # not even a record header
        writer.write(junk)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(15):
            data = await reader.read(65536)
            while data and not data.startswith(b"\x15"):  # anything but an alert: read on
                data = await reader.read(65536)
        return "closed"
    except (ConnectionError, OSError):
        return "closed"
    except TimeoutError:
        return "open"
    finally:
        writer.transport.abort()


async def garbage(args: argparse.Namespace) -> dict[str, object]:
    host, port = split(args.target)
    rng = random.Random(args.seed)
    results = await asyncio.gather(*(_garbage_one(host, port, rng) for _ in range(args.count)))
    return {"mode": "garbage", "count": args.count,
            **{k: results.count(k) for k in ("refused", "closed", "open")}}


async def _silent_one(host: str, port: int, hold: float, stats: dict[str, int]) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        stats["refused"] += 1
        return
    stats["opened"] += 1
    try:
        async with asyncio.timeout(hold):
            await reader.read(1)  # nothing is ever sent: EOF or a reset means "closed"
        stats["closed"] += 1
    except (ConnectionError, OSError):
        stats["closed"] += 1
    except TimeoutError:
        stats["still_open"] += 1
    finally:
        writer.transport.abort()


async def silent(args: argparse.Namespace) -> dict[str, object]:
    host, port = split(args.target)
    stats = {"opened": 0, "refused": 0, "closed": 0, "still_open": 0}
    t0 = time.monotonic()
    tasks = []
    for i in range(args.count):
        tasks.append(asyncio.create_task(_silent_one(host, port, args.hold, stats)))
        if i % 100 == 99:
            await asyncio.sleep(0)  # let the connects go out in waves
    await asyncio.gather(*tasks)
    return {"mode": "silent", "count": args.count, **stats,
            "seconds": round(time.monotonic() - t0, 1)}


def syn(args: argparse.Namespace) -> dict[str, object]:
    host, port = split(args.target)
    socks = []
    for _ in range(args.count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError, OSError):
            s.connect((host, port))
        socks.append(s)
    time.sleep(args.hold)
    established = 0
    for s in socks:
        with contextlib.suppress(OSError):
            s.getpeername()
            established += 1
        s.close()
    return {"mode": "syn", "count": args.count, "established": established}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["identity", "plaintext", "garbage", "silent", "syn"])
    p.add_argument("--target", required=True)
    p.add_argument("--sni", default="")
    p.add_argument("--cluster", default="west", help="the cluster a feed subscription claims")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--hold", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    args = p.parse_args(argv)
    raise_nofile()
    if args.mode == "identity":
        out = identity(args)
    elif args.mode == "plaintext":
        out = plaintext(args)
    elif args.mode == "garbage":
        out = asyncio.run(garbage(args))
    elif args.mode == "silent":
        out = asyncio.run(silent(args))
    else:
        out = syn(args)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
