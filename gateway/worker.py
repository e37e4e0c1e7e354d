"""Data-plane worker processes (`workers: N`): each runs an egress and/or an ingress on uvloop,
sharing every listener with the others through SO_REUSEPORT (the kernel spreads connections).

The appliance starts them with `WorkerPool` and feeds them over a pipe: routing tables (they
pickle), "reload your TLS files" after a renewal, "send me your metrics", and "stop, draining
for N seconds". TLS material travels as file paths, never through the pipe. Each worker keeps
its own balancer state (outlier detection is per process, as in Envoy).

Metrics: every worker counts in its own default registry. At each scrape of the appliance's
`/metrics` the parent asks every worker for its `isthmus_*` metric families (`scrape`) and
adds them up with its own (`gateway.metrics.merge_families`): counters and histograms sum,
so `isthmus_requests_total` and `isthmus_edge_requests_total` are totals over the workers. A
worker that does not answer within the scrape timeout is left out of that scrape and logged.
The console's traffic history reads the workers' edge and series totals the same way, at
every tick (`figures`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from federation.routing import RoutingTable, TableHolder
from federation.trust.credentials import TlsCredentials
from federation.trust.pemfiles import load_bundle, load_identity
from gateway import metrics
from gateway.egress import Egress, EgressConfig
from gateway.ingress import Ingress, IngressConfig
from gateway.metrics import merge_families

__all__ = [
    "ReloadCredentials",
    "Scrape",
    "Stop",
    "TlsPaths",
    "WorkerPool",
    "WorkerSpec",
    "worker_main",
]

log = logging.getLogger(__name__)

EdgeFigures = dict[tuple[str, str, str], metrics.Figures]
SeriesFigures = dict[tuple[str, str, str, str], metrics.Figures]


@dataclass(frozen=True, slots=True)
class TlsPaths:
    cert: str
    key: str
    bundle: str
    trust_domain: str | None = None

    def load(self) -> TlsCredentials:
        identity = load_identity(Path(self.cert), Path(self.key))
        return TlsCredentials(identity, load_bundle(Path(self.bundle)),
                              trust_domain=self.trust_domain)  # fmt: skip


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    tls: TlsPaths
    source_cluster: str
    egress: EgressConfig | None = None
    ingress: IngressConfig | None = None
    use_uvloop: bool = True
    log_level: int = logging.WARNING


@dataclass(frozen=True, slots=True)
class ReloadCredentials:
    """Read the TLS files again (after a renewal); open connections keep their session."""


@dataclass(frozen=True, slots=True)
class Stop:
    drain: float = 5.0


@dataclass(frozen=True, slots=True)
class Scrape:
    """Send your figures back (`_Scraped` with the same `seq`): the edge and series totals
    always, the metric families when `families`."""

    seq: int
    families: bool = True


@dataclass(frozen=True, slots=True)
class _Ready:
    index: int


@dataclass(frozen=True, slots=True)
class _Scraped:
    seq: int
    index: int
    families: list[Metric] = field(default_factory=list)
    edges: EdgeFigures = field(default_factory=dict)
    series: SeriesFigures = field(default_factory=dict)


def own_families() -> list[Metric]:
    """This process's `isthmus_*` metric families (collecting also flushes the batched
    per-request counts of `gateway.metrics`)."""
    return [m for m in REGISTRY.collect() if m.name.startswith("isthmus_")]


def worker_main(spec: WorkerSpec, index: int, conn: multiprocessing.connection.Connection) -> None:
    """Process entry point."""
    logging.basicConfig(level=spec.log_level)
    if spec.use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.run(_serve(spec, index, conn))
            return
    asyncio.run(_serve(spec, index, conn))


async def _serve(spec: WorkerSpec, index: int, conn: multiprocessing.connection.Connection) -> None:
    first = await asyncio.to_thread(conn.recv)
    if not isinstance(first, RoutingTable):
        raise TypeError(f"a worker's first message must be a RoutingTable, not {first!r}")
    holder = TableHolder(first)
    credentials = spec.tls.load()
    egress = ingress = None
    if spec.egress is not None:
        egress = Egress(
            replace(spec.egress, reuse_port=True), holder, credentials, None, spec.source_cluster
        )
        await egress.start()
    if spec.ingress is not None:
        ingress = Ingress(replace(spec.ingress, reuse_port=True), holder, credentials)
        await ingress.start()
    conn.send(_Ready(index))
    drain = 0.0
    try:
        while True:
            try:
                message = await asyncio.to_thread(conn.recv)
            except EOFError:  # the parent is gone: stop
                break
            if isinstance(message, RoutingTable):
                if message.version > holder.current.version:
                    holder.publish(message)
            elif isinstance(message, ReloadCredentials):
                fresh = spec.tls.load()
                credentials.update(identity=fresh.identity, bundle=fresh.bundle)
            elif isinstance(message, Scrape):
                families = own_families() if message.families else []
                conn.send(_Scraped(message.seq, index, families, metrics.edges(),
                                   metrics.series()))  # fmt: skip
            elif isinstance(message, Stop):
                drain = message.drain
                break
    finally:
        closing = []
        if egress is not None:
            closing.append(egress.close(drain))
        if ingress is not None:
            closing.append(ingress.close(drain))
        await asyncio.gather(*closing, return_exceptions=True)
    with contextlib.suppress(OSError):
        conn.send(Stop(drain))


def _answer(
    conn: multiprocessing.connection.Connection, seq: int, timeout: float
) -> _Scraped | None:
    """The worker's answer to scrape `seq` (older answers, late for a scrape that gave up on
    them, are skipped); None if none came in time or the pipe broke."""
    try:
        while conn.poll(timeout):
            message = conn.recv()
            if isinstance(message, _Scraped) and message.seq == seq:
                return message
    except (OSError, EOFError):
        pass
    return None


class WorkerPool:
    """The parent's handle on N worker processes."""

    def __init__(self, spec: WorkerSpec, count: int) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        self.spec = spec
        self.count = count
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._scrape_lock = asyncio.Lock()
        self._seq = itertools.count(1)
        # Each worker's last edge and series totals: one that misses a round keeps its last
        # figures, so the sums the console takes differences of never go backwards.
        self._figures: dict[int, _Scraped] = {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    async def start(self, table: RoutingTable, timeout: float = 30.0) -> None:
        """Start the workers with `table` and wait until every one is listening."""
        for index in range(self.count):
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(
                target=worker_main, args=(self.spec, index, child),
                name=f"isthmus-dataplane-{index}", daemon=True,
            )  # fmt: skip
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
            parent.send(table)
        async with asyncio.timeout(timeout):
            for conn in self._conns:
                ready = await asyncio.to_thread(conn.recv)
                if not isinstance(ready, _Ready):
                    raise RuntimeError(f"worker answered {ready!r} instead of ready")

    def publish(self, table: RoutingTable) -> None:
        self._broadcast(table)

    async def _round(self, families: bool, timeout: float) -> list[_Scraped]:
        async with self._scrape_lock:  # one request-answer round on the pipes at a time
            seq = next(self._seq)
            conns = list(self._conns)
            for conn in conns:
                with contextlib.suppress(OSError):
                    conn.send(Scrape(seq, families))
            answers = await asyncio.gather(
                *(asyncio.to_thread(_answer, conn, seq, timeout) for conn in conns)
            )
        missing = [i for i, a in enumerate(answers) if a is None]
        if missing:
            log.warning("workers did not send metrics", extra={"workers": missing})
        got = [a for a in answers if a is not None]
        for a in got:
            self._figures[a.index] = a
        return got

    async def scrape(self, timeout: float = 5.0) -> list[Metric]:
        """Every worker's `isthmus_*` metric families, added up (see the module docstring)."""
        return merge_families([a.families for a in await self._round(True, timeout)])

    async def figures(self, timeout: float = 5.0) -> tuple[EdgeFigures, SeriesFigures]:
        """Every worker's edge and series totals (`gateway.metrics.edges`, `series`), added
        up: what the console's traffic history reads when the data plane runs in workers."""
        await self._round(False, timeout)
        last = list(self._figures.values())
        return (metrics.add_figures(*(a.edges for a in last)),
                metrics.add_figures(*(a.series for a in last)))  # fmt: skip

    def reload_credentials(self) -> None:
        self._broadcast(ReloadCredentials())

    def _broadcast(self, message: object) -> None:
        for conn in self._conns:
            try:
                conn.send(message)
            except OSError as exc:
                log.error("worker pipe broken", extra={"error": repr(exc)})

    async def stop(self, drain: float = 5.0) -> None:
        """Drain and stop every worker; kill what has not exited `drain + 5` seconds later."""
        self._broadcast(Stop(drain))
        deadline = drain + 5.0
        for proc in self._procs:
            await asyncio.to_thread(proc.join, deadline)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5.0)
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()
