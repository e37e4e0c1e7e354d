"""Garbage and a query flood at a resolver (a program run on a machine's network), bounded in
rate and time. Prints one JSON line: packets sent by kind, answers received.

    python3 tests/e2e/dnsstorm.py --target 10.0.0.20 --seconds 15 --qps 2000

Garbage: random bytes, headers that promise more than they carry, compression pointers that
loop, labels longer than allowed, responses posing as queries, unknown opcodes, and over TCP
length prefixes that lie. The flood: well-formed queries for random names, most under the
global zone, some for names the resolver forwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import struct
import sys
import threading
import time

from dnslib import DNSRecord


def header(qid: int, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
           ar: int = 0) -> bytes:
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar)


def garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    qid = rng.randrange(65536)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 512))
    if kind == 1:  # promises 50 questions, carries half of one
        return header(qid, qd=50) + b"\x07reviews\x07def"
    if kind == 2:  # a compression pointer to itself
        return header(qid) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    if kind == 3:  # a label of 200 bytes (63 is the limit)
        return header(qid) + bytes([200]) + rng.randbytes(200) + b"\x00\x00\x01\x00\x01"
    if kind == 4:  # a response (QR set) sent as if it were a query
        return header(qid, flags=0x8180, an=1) + DNSRecord.question("x.global").pack()[12:]
    if kind == 5:  # opcode 15
        return header(qid, flags=0x7900) + DNSRecord.question("web.default.global").pack()[12:]
    return header(qid, ar=3) + rng.randbytes(rng.randint(0, 40))  # records that are not there


def query(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.7:
        name = f"{rng.randbytes(6).hex()}.default.global"
    elif r < 0.9:
        name = rng.choice(["reviews.default.global", "ratings.default.global",
                           "web.default.global", "_http._tcp.reviews.default.global"])
    else:
        name = f"{rng.randbytes(5).hex()}.example.com"
    qtype = rng.choice(["A", "AAAA", "SRV", "TXT", "ANY"])
    q = DNSRecord.question(name, qtype)
    q.header.id = rng.randrange(65536)
    return q.pack()


def tcp_garbage(target: str, rng: random.Random, count: int, wait: float = 2.0
                ) -> dict[str, int]:
    """`count` TCP connections at once, each sending a length prefix that lies; after `wait`
    seconds, how many the resolver had answered or closed, and how many it still held."""
    socks = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            s = socket.create_connection((target, 53), timeout=2)
            body = rng.randbytes(rng.randint(0, 100))
            s.sendall(struct.pack(">H", rng.choice([0, 65535, len(body) + 50])) + body)
            s.setblocking(False)
            socks.append(s)
    time.sleep(wait)
    closed = 0
    for s in socks:
        try:
            closed += s.recv(4096) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    return {"opened": len(socks), "closed_by_resolver": closed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--qps", type=int, default=2000, help="packets per second, all kinds")
    p.add_argument("--garbage-share", type=float, default=0.3)
    p.add_argument("--tcp", type=int, default=50, help="TCP connections with lying lengths")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    tcp: dict[str, int] = {}
    # Alongside the flood: TCP connections that lie about their length, held until the
    # flood ends (longer than the resolver's idle timeout when the storm is long enough).
    tcp_thread = threading.Thread(target=lambda: tcp.update(tcp_garbage(
        args.target, random.Random(args.seed + 1), args.tcp, max(2.0, args.seconds - 1))))
    tcp_thread.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((args.target, 53))
    sent = {"garbage": 0, "queries": 0}
    answers = 0
    t0 = time.monotonic()
    end = t0 + min(args.seconds, 300.0)  # bounded whatever is asked
    slice_ = 0.01
    per_slice = max(1, int(args.qps * slice_))
    nxt = t0
    while time.monotonic() < end:
        for _ in range(per_slice):
            bad = rng.random() < args.garbage_share
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                sock.send(garbage(rng) if bad else query(rng))
                sent["garbage" if bad else "queries"] += 1
        while True:
            try:
                sock.recv(4096)
                answers += 1
            except (BlockingIOError, ConnectionRefusedError):
                break
        nxt += slice_
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    tcp_thread.join(60)
    print(json.dumps({"sent": sent, "answers": answers, "tcp_garbage": tcp,
                      "seconds": round(time.monotonic() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
