"""Worker processes sharing the resolver's sockets (SO_REUSEPORT), fed routing tables by pipe.

The appliance runs one DnsServer in its main process and, with `workers: N`, N-1 more
processes started with multiprocessing's *spawn* method. Each worker binds the same ports
(the kernel spreads queries over the sockets), runs the same Corefile on its own event loop
(uvloop when installed) and receives every routing table the main process publishes
(RoutingTable pickles). Health/ready HTTP listeners run only in the main process.

    server = DnsServer(corefile, listen, holder)
    await server.start()
    workers = DnsWorkers(server, holder, count=3)
    await workers.start()     # returns once every worker has bound its sockets
    ...
    await workers.stop()
    await server.stop()

A worker can also be started directly: `ctx.Process(target=worker_main, args=(spec, conn))`
where `conn` is one end of `ctx.Pipe()`; send RoutingTable objects into the other end and
`None` to stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
from collections.abc import Callable
from dataclasses import dataclass, field

from dns.errors import DnsError
from dns.server import DnsServer
from dns.transport import TcpLimits
from federation.routing import RoutingTable, TableHolder

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class WorkerError(DnsError):
    pass


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to run the same server as the main process (pickles)."""

    corefile: str
    listen: str
    bound_ports: dict[int, int] = field(default_factory=dict)
    base_dir: str | None = None
    table: RoutingTable | None = None
    log_level: int = logging.INFO
    use_uvloop: bool = True
    tcp_limits: TcpLimits = field(default_factory=TcpLimits)

    @classmethod
    def of(cls, server: DnsServer, table: RoutingTable | None = None) -> WorkerSpec:
        listen = ",".join(
            f"[{h}]:{server.listen_port}" if ":" in h else f"{h}:{server.listen_port}"
            for h in server.hosts
        )
        return cls(
            server.corefile,
            listen,
            server.ports,
            server.base_dir,
            table,
            logging.getLogger().getEffectiveLevel(),
            tcp_limits=server.tcp_limits,
        )


def worker_main(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    """Process entry point (must stay importable at module level for spawn)."""
    logging.basicConfig(level=spec.log_level)
    runner: Callable[..., object] = asyncio.run
    if spec.use_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    runner(_worker(spec, conn))


async def _worker(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    holder = TableHolder()
    if spec.table is not None:
        holder.publish(spec.table)
    server = DnsServer(
        spec.corefile,
        spec.listen,
        holder,
        serve_http=False,
        bound_ports=spec.bound_ports,
        base_dir=spec.base_dir,
        tcp_limits=spec.tcp_limits,
    )
    stop = asyncio.Event()

    def on_message() -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                if msg is None:
                    stop.set()
                    return
                if isinstance(msg, RoutingTable) and msg.version > holder.current.version:
                    holder.publish(msg)
        except (EOFError, OSError):
            stop.set()  # the main process went away: do not outlive it

    try:
        await server.start()
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    conn.send(("ready", server.ports))
    loop.add_reader(conn.fileno(), on_message)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        await server.stop()


class DnsWorkers:
    """Starts `count` worker processes for a started DnsServer and keeps their tables current."""

    def __init__(self, server: DnsServer, holder: TableHolder, count: int) -> None:
        self.server = server
        self.holder = holder
        self.count = count
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[
            tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]
        ] = []
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        spec = WorkerSpec.of(self.server, self.holder.current)
        try:
            for _ in range(self.count):
                parent, child = self.ctx.Pipe()
                proc = self.ctx.Process(target=worker_main, args=(spec, child), daemon=True)
                proc.start()
                child.close()
                self.procs.append((proc, parent))
            for proc, conn in self.procs:
                ok = await asyncio.to_thread(conn.poll, START_TIMEOUT)
                if not ok:
                    raise WorkerError(f"dns worker {proc.pid} did not start in {START_TIMEOUT}s")
                kind, detail = conn.recv()
                if kind != "ready":
                    raise WorkerError(f"dns worker {proc.pid} failed: {detail}")
        except BaseException:
            await self.stop()
            raise
        self._unsubscribe = self.holder.subscribe(self.publish)
        log.info(
            "dns workers started",
            extra={"count": self.count, "pids": [p.pid for p, _ in self.procs]},
        )

    def publish(self, table: RoutingTable) -> None:
        for proc, conn in self.procs:
            try:
                conn.send(table)
            except OSError as e:
                log.error("dns worker unreachable", extra={"pid": proc.pid, "error": str(e)})

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for _, conn in self.procs:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc, conn in self.procs:
            await asyncio.to_thread(proc.join, STOP_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, STOP_TIMEOUT)
            conn.close()
        self.procs.clear()
