"""A handshake-slot flood, run as a process of its own by the drills (the attacker of issue 11).

    python slot_flood.py HOST PORT SOURCE SOCKETS SECONDS [PAUSE]

SOCKETS connections from the address SOURCE (or from a comma-separated list of them, in
turn), each sending the first 6 bytes of a TLS
ClientHello (`16 03 01 02 00 01`: a handshake record of 512 bytes that never comes) and
opening a new connection PAUSE seconds after the listener closes it. Prints `ready` once every
socket has sent its bytes, `attempts N` when it ends: after SECONDS, or when stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

HELLO_START = bytes.fromhex("160301020001")


async def hold(host: str, port: int, source: str, pause: float, counts: dict[str, int],
               sent_once: asyncio.Event) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    while True:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, HELLO_START)
            counts["attempts"] += 1
            sent_once.set()
            await loop.sock_recv(sock, 1)  # returns (or raises) once the listener closes it
        except OSError:
            counts["errors"] += 1
        finally:
            sock.close()
        await asyncio.sleep(pause)


async def main(host: str, port: int, sources: str, n: int, seconds: float, pause: float) -> None:
    loop = asyncio.get_running_loop()
    counts = {"attempts": 0, "errors": 0}
    events = [asyncio.Event() for _ in range(n)]
    addresses = sources.split(",")
    tasks = [
        asyncio.create_task(hold(host, port, addresses[i % len(addresses)], pause, counts, e))
        for i, e in enumerate(events)
    ]
    stdin_closed = loop.create_future()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def watch_stdin() -> None:
        await reader.read()
        if not stdin_closed.done():
            stdin_closed.set_result(None)

    watcher = asyncio.create_task(watch_stdin())
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await asyncio.gather(*(e.wait() for e in events))
            print("ready", flush=True)
            await stdin_closed
    for t in [*tasks, watcher]:
        t.cancel()
    await asyncio.gather(*tasks, watcher, return_exceptions=True)
    print(f"attempts {counts['attempts']} errors {counts['errors']}", flush=True)


if __name__ == "__main__":
    host, port, sources, n, seconds = sys.argv[1:6]
    pause = float(sys.argv[6]) if len(sys.argv) > 6 else 0.05
    asyncio.run(main(host, int(port), sources, int(n), float(seconds), pause))
