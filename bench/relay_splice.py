"""Relay benchmark: os.splice vs asyncio Protocols, under asyncio and uvloop.

Run: `python bench/relay_splice.py [--gib 1] [--pingpong 20000]`

The sender and the receiver are separate processes (blocking sockets, kernel-bound), so the
figures are the relay process's: wall time for a bulk transfer, the relay's CPU seconds per GiB,
and round trips per second of 100-byte messages (request/response latency through the relay).
Not a test: nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import uvloop

from gateway.l4.relay import RelayConfig, relay_sockets

FRONT = "127.0.70.1"
BACK = "127.0.70.2"

SINK = r"""
import socket, sys
srv = socket.create_server((sys.argv[1], 0)); print(srv.getsockname()[1], flush=True)
mode = sys.argv[2]
conn, _ = srv.accept()
if mode == "bulk":
    buf = bytearray(1 << 20); view = memoryview(buf); total = 0
    while n := conn.recv_into(view):
        total += n
    conn.sendall(str(total).encode()); conn.shutdown(socket.SHUT_WR)
else:
    while msg := conn.recv(100):
        conn.sendall(msg)
conn.close()
"""

SOURCE = r"""
import socket, sys, time
host, port, mode, amount = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port))
start = time.perf_counter()
if mode == "bulk":
    block = memoryview(bytes(1 << 20))
    for _ in range(amount // len(block)):
        s.sendall(block)
    s.shutdown(socket.SHUT_WR)
    reply = s.recv(100)
    assert int(reply) == amount, reply
else:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"m" * 100
    for _ in range(amount):
        s.sendall(msg)
        got = 0
        while got < 100:
            got += len(s.recv(100 - got))
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
print(time.perf_counter() - start, flush=True)
"""


async def one_run(mode: str, workload: str, amount: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    sink = subprocess.Popen(
        [sys.executable, "-c", SINK, BACK, workload], stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None
    back_port = int(sink.stdout.readline())
    front = socket.create_server((FRONT, 0))
    front.setblocking(False)
    source = subprocess.Popen(
        [sys.executable, "-c", SOURCE, FRONT, str(front.getsockname()[1]), workload, str(amount)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        a, _ = await loop.sock_accept(front)
        b = socket.socket()
        b.setblocking(False)
        await loop.sock_connect(b, (BACK, back_port))
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        stats = await relay_sockets(a, b, RelayConfig(splice=(mode == "splice")))
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        out, _ = await loop.run_in_executor(None, source.communicate)
        sink.wait(timeout=30)
    finally:
        front.close()
        for p in (source, sink):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert stats.mode == mode
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return float(out), cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--pingpong", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    amount = int(args.gib * (1 << 30)) // (1 << 20) * (1 << 20)
    print(f"cores={os.cpu_count()} python={sys.version.split()[0]} uvloop={uvloop.__version__}")
    for loop_kind in ("uvloop", "asyncio"):
        for mode in ("splice", "protocol"):
            runner = uvloop.run if loop_kind == "uvloop" else asyncio.run
            bulk = [runner(one_run(mode, "bulk", amount)) for _ in range(args.repeat)]
            pp = [runner(one_run(mode, "pingpong", args.pingpong)) for _ in range(args.repeat)]
            wall = min(w for w, _ in bulk)
            cpu = min(c for _, c in bulk) / (amount / (1 << 30))
            rtt = min(w for w, _ in pp)
            pp_cpu = min(c for _, c in pp)
            print(
                f"{loop_kind:8} {mode:8} bulk {amount / wall / 1e9:6.2f} GB/s "
                f"relay-cpu {cpu:5.2f} s/GiB | pingpong {args.pingpong / rtt:8.0f} rt/s "
                f"relay-cpu {pp_cpu / args.pingpong * 1e6:5.1f} us/rt"
            )


if __name__ == "__main__":
    main()
