"""The drills' steady load: idempotent HTTP GETs through service VIPs, from the VM's network.

Run as a program on the VM's network (`Machine.net_popen`), it resolves every target's name at
the VM's resolver and sends GETs to the VIP it answered, paced per worker:

- keep-alive workers: one HTTP/1.1 connection each, reused for every request (a new one after
  an error or a `Connection: close`), names resolved when connecting;
- new-connection workers: a new TCP connection per request, the name resolved before each one
  (open loop: requests start on schedule even when earlier ones are slow);
- a lookup worker per target: DNS queries only, the resolver's own steady load.

Every request and lookup is one CSV line in `--out`:
`t,kind,target,ok,attempts,lat_ms,first_error,cluster,status`, where `t` is the wall-clock start
(the drills mark their faults on the same clock), `attempts` is 2 when the first try failed and
the request was tried once more on a new connection (the client-side retry an idempotent
request allows), `lat_ms` covers every try and `cluster` is the one the backend that answered
says it runs in. The process stops on SIGTERM/SIGINT or after `--duration` seconds, finishing
the requests in flight (bounded by `--timeout`).

    python3 tests/e2e/load.py --out load.csv --dns 10.0.0.20 \\
        --target reviews.default.global:9080 --keepalive 2 --fresh 1 --rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field

from dnslib import QTYPE, DNSRecord

FIELDS = "t,kind,target,ok,attempts,lat_ms,first_error,cluster,status"
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024


class Failed(Exception):
    """One try failed; the message is a short reason (the CSV's `first_error`)."""


@dataclass
class Target:
    name: str
    port: int
    vip: str | None = None  # the last answer of the resolver: used while lookups fail

    @property
    def short(self) -> str:
        return self.name.split(".")[0]


@dataclass
class Recorder:
    path: str
    lines: list[str] = field(default_factory=list)
    sent: int = 0
    failed: int = 0
    retried: int = 0

    def add(self, t: float, kind: str, target: str, ok: bool, attempts: int, lat: float,
            error: str, cluster: str, status: int) -> None:
        error = error.replace(",", ";").replace("\n", " ")[:80]
        self.lines.append(f"{t:.3f},{kind},{target},{int(ok)},{attempts},{lat * 1000:.2f},"
                          f"{error},{cluster},{status}\n")
        if kind != "dns":
            self.sent += 1
            self.failed += not ok
            self.retried += attempts > 1

    def flush(self) -> None:
        if self.lines:
            with open(self.path, "a") as f:
                f.writelines(self.lines)
            self.lines.clear()


# --- DNS --------------------------------------------------------------------------------------


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, qid: int) -> None:
        self.qid = qid
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 2 and int.from_bytes(data[:2], "big") == self.qid and \
                not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def lookup_once(server: str, name: str, timeout: float) -> str:
    q = DNSRecord.question(name, "A")
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Dns(q.header.id), remote_addr=(server, 53))
    try:
        transport.sendto(q.pack())
        async with asyncio.timeout(timeout):
            data = await proto.answer
    except TimeoutError:
        raise Failed("dns timeout") from None
    except OSError as e:
        raise Failed(f"dns {e.strerror or e}") from None
    finally:
        transport.close()
    reply = DNSRecord.parse(data)
    for rr in reply.rr:
        if rr.rtype == QTYPE.A:
            return str(rr.rdata)
    raise Failed(f"dns rcode {reply.header.rcode} with no A")


# --- HTTP -------------------------------------------------------------------------------------


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


async def connect(vip: str, port: int) -> Conn:
    try:
        reader, writer = await asyncio.open_connection(vip, port)
    except OSError as e:
        raise Failed(f"connect {e.strerror or type(e).__name__}") from None
    return Conn(reader, writer)


async def exchange(conn: Conn, host: str, path: str) -> tuple[int, bytes, bool]:
    """One GET on `conn`: (status, body, server keeps the connection)."""
    conn.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: isthmus-e2e-load\r\n"
                      "Accept: application/json\r\n\r\n".encode())
    try:
        await conn.writer.drain()
        head = await conn.reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise Failed("closed before response" if not e.partial else "truncated head") from None
    except asyncio.LimitOverrunError:
        raise Failed("head too long") from None
    except OSError as e:
        raise Failed(f"io {e.strerror or type(e).__name__}") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise Failed("bad status line")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    try:
        if "content-length" in headers:
            n = int(headers["content-length"])
            if n > MAX_BODY:
                raise Failed("body too large")
            body = await conn.reader.readexactly(n)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _chunked(conn.reader)
        else:
            body = await conn.reader.read(MAX_BODY)
            headers["connection"] = "close"
    except asyncio.IncompleteReadError:
        raise Failed("truncated body") from None
    except OSError as e:
        raise Failed(f"io {e.strerror or type(e).__name__}") from None
    keep = headers.get("connection", "").lower() != "close"
    return status, body, keep


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return out
        out += await reader.readexactly(size)
        await reader.readexactly(2)
        if len(out) > MAX_BODY:
            raise Failed("body too large")


def cluster_of(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(body).get("cluster", ""))
    return ""


# --- the load -------------------------------------------------------------------------------------


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.targets = [Target(n, int(p)) for n, p in (t.rsplit(":", 1) for t in args.target)]
        self.rec = Recorder(args.out)
        self.stopping = asyncio.Event()
        self.inflight: set[asyncio.Task[None]] = set()
        self.seq = 0

    async def resolve(self, target: Target, record: bool = True) -> str | None:
        """The target's VIP from the resolver (one retry); the last answer if it fails."""
        t0, w0 = time.monotonic(), time.time()
        error = ""
        for attempt in (1, 2):
            try:
                vip = await lookup_once(self.args.dns, target.name, self.args.dns_timeout)
            except Failed as e:
                error = error or str(e)
                continue
            target.vip = vip
            if record:
                self.rec.add(w0, "dns", target.short, True, attempt, time.monotonic() - t0,
                             error, "", 0)
            return vip
        if record:
            self.rec.add(w0, "dns", target.short, False, 2, time.monotonic() - t0, error, "", 0)
        return target.vip

    def path(self) -> str:
        self.seq += 1
        return f"/load/{self.seq}"

    async def _try(self, target: Target, conn: Conn | None,
                   keep_alive: bool) -> tuple[int, str, Conn | None]:
        """One try; returns (status, cluster, the connection if it is kept) or raises Failed."""
        if conn is None:
            vip = target.vip or await self.resolve(target)
            if vip is None:
                raise Failed("no address")
            conn = await connect(vip, target.port)
        try:
            async with asyncio.timeout(self.args.timeout):
                status, body, keep = await exchange(conn, target.name, self.path())
        except TimeoutError:
            conn.close()
            raise Failed("timeout") from None
        except Failed:
            conn.close()
            raise
        if status != 200:
            conn.close()
            raise Failed(f"http {status}")
        if not keep or not keep_alive:
            conn.close()
            return status, cluster_of(body), None
        return status, cluster_of(body), conn

    async def request(self, target: Target, kind: str, conn: Conn | None) -> Conn | None:
        """A request with at most `--retries` more tries, each on a new connection; recorded."""
        t0, w0 = time.monotonic(), time.time()
        first_error = ""
        attempts = 0
        for attempt in range(1 + self.args.retries):
            attempts = attempt + 1
            try:
                status, cluster, keep = await self._try(
                    target, conn if attempt == 0 else None, keep_alive=kind == "ka")
            except Failed as e:
                first_error = first_error or str(e)
                conn = None
                continue
            self.rec.add(w0, kind, target.short, True, attempts, time.monotonic() - t0,
                         first_error, cluster, status)
            return keep
        self.rec.add(w0, kind, target.short, False, attempts, time.monotonic() - t0,
                     first_error, "", 0)
        return None

    async def keepalive_worker(self, target: Target, rate: float) -> None:
        conn: Conn | None = None
        interval = 1.0 / rate
        nxt = time.monotonic() + random.uniform(0, interval)
        try:
            while not self.stopping.is_set():
                await self._sleep_until(nxt)
                if self.stopping.is_set():
                    break
                nxt = max(nxt + interval, time.monotonic() - interval)
                if conn is None:
                    await self.resolve(target)
                    vip = target.vip
                    if vip is None:
                        self.rec.add(time.time(), "ka", target.short, False, 1, 0, "no address",
                                     "", 0)
                        continue
                    try:
                        conn = await connect(vip, target.port)
                    except Failed:
                        conn = None  # the request below connects (and records) itself
                conn = await self.request(target, "ka", conn)
        finally:
            if conn is not None:
                conn.close()

    async def fresh_worker(self, target: Target, rate: float) -> None:
        interval = 1.0 / rate
        nxt = time.monotonic() + random.uniform(0, interval)
        mine: set[asyncio.Task[None]] = set()  # per worker: one slow target starves no other
        while not self.stopping.is_set():
            await self._sleep_until(nxt)
            if self.stopping.is_set():
                break
            nxt += interval
            if len(mine) >= self.args.max_inflight:
                self.rec.add(time.time(), "new", target.short, False, 1, 0, "client saturated",
                             "", 0)
                continue
            task = asyncio.create_task(self._fresh_one(target))
            for tasks in (mine, self.inflight):
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _fresh_one(self, target: Target) -> None:
        await self.resolve(target)
        await self.request(target, "new", None)

    async def lookup_worker(self, target: Target, rate: float) -> None:
        interval = 1.0 / rate
        nxt = time.monotonic() + random.uniform(0, interval)
        while not self.stopping.is_set():
            await self._sleep_until(nxt)
            nxt += interval
            await self.resolve(target)

    async def _sleep_until(self, when: float) -> None:
        delay = when - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stopping.wait()

    async def reporter(self) -> None:
        t0 = time.monotonic()
        while not self.stopping.is_set():
            await self._sleep_until(time.monotonic() + 0.5)
            self.rec.flush()
            print(json.dumps({"t": round(time.monotonic() - t0, 1), "sent": self.rec.sent,
                              "failed": self.rec.failed, "retried": self.rec.retried}),
                  flush=True)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        with open(self.args.out, "w") as f:
            f.write(FIELDS + "\n")
        for t in self.targets:  # a first answer for everyone, before the clock starts
            await self.resolve(t, record=False)
        a = self.args
        workers = []
        for t in self.targets:
            workers += [self.keepalive_worker(t, a.rate) for _ in range(a.keepalive)]
            workers += [self.fresh_worker(t, a.rate) for _ in range(a.fresh)]
            if a.lookup_rate > 0:
                workers.append(self.lookup_worker(t, a.lookup_rate))
        tasks = [asyncio.create_task(w) for w in workers]
        reporter = asyncio.create_task(self.reporter())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(a.duration):
                await self.stopping.wait()
        self.stopping.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(a.timeout * (1 + a.retries) + 5):
                await asyncio.gather(*tasks, *self.inflight, return_exceptions=True)
        for t in (*tasks, *self.inflight):
            t.cancel()
        reporter.cancel()
        self.rec.flush()
        print(json.dumps({"done": True, "sent": self.rec.sent, "failed": self.rec.failed,
                          "retried": self.rec.retried}), flush=True)
        return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="CSV of every request and lookup")
    p.add_argument("--dns", required=True, help="the resolver's address (port 53)")
    p.add_argument("--target", action="append", required=True, help="NAME:PORT, repeatable")
    p.add_argument("--keepalive", type=int, default=2, help="keep-alive workers per target")
    p.add_argument("--fresh", type=int, default=1, help="new-connection workers per target")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second per worker")
    p.add_argument("--lookup-rate", type=float, default=5.0,
                   help="extra DNS lookups per second per target")
    p.add_argument("--retries", type=int, default=1, help="client tries after the first")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per try")
    p.add_argument("--dns-timeout", type=float, default=1.0)
    p.add_argument("--max-inflight", type=int, default=1000,
                   help="new-connection requests in flight per worker")
    p.add_argument("--duration", type=float, default=1800.0, help="stop after this many s")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a connection per request
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return asyncio.run(Load(parse_args(argv)).run())


if __name__ == "__main__":
    sys.exit(main())
