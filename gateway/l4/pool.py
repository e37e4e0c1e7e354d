"""Warm pools of gateway connections for `egress.multiplex: false`: one mutual-TLS connection
to a remote ingress per client connection, dialled ahead of time.

A TLS connection to an ingress is bound to one SNI (the ingress routes it by the ClientHello),
so a pool is kept per (gateway, SNI). A pool turns hot when it is used: each take schedules a
refill up to `size` idle connections, dialled in the background with TLS session resumption
(`tlsclient`), so the next client connection skips both the TCP and the TLS handshake. The
refill after a take waits `refill_delay` so that its handshakes do not compete for the CPU with
the first bytes of the connection that took it. Every new client connection still costs
one handshake on each gateway (the pool hides its latency, not its CPU), so the rate of new
connections is bound by the handshake rate. A pool
nobody used for `cold_after` seconds stops refilling and its idle connections are closed.

An idle connection is watched by a tiny protocol: if the ingress closes it, it leaves the pool
at once; if bytes arrive unasked, it is dropped (the stream is no longer at its start). Idle
connections older than `max_idle_age` are closed well before the ingress' idle timeout.
When the node's credentials change, idle connections made with the old identity are closed;
connections in use keep going.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass

from gateway.closing import abort_transport, close_transport
from gateway.errors import ConnectFailed
from gateway.tlsclient import ClientContexts, GatewayConn, IdleWatch, dial_gateway

__all__ = ["PoolConfig", "WarmPool"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    size: int = 4  # idle connections kept ready per (gateway, SNI) while the pool is hot
    max_idle_age: float = 60.0  # seconds; below the ingress idle timeout
    cold_after: float = 30.0  # seconds without a take before a pool stops refilling
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    max_dials: int = 4  # concurrent background dials per pool
    # After a take served from the pool, wait this long before dialling its replacement: a
    # dial's handshake costs ~1 ms of CPU on both gateways, and done at once it delays the
    # first bytes of the connection that just took it (measured: 5.3 ms -> 1.5 ms per
    # sequential pooled connection on 2 cores). A take that found the pool empty refills as
    # soon as its own dial is through.
    refill_delay: float = 0.02

    def __post_init__(self) -> None:
        if self.size < 0 or self.max_dials < 1 or self.refill_delay < 0:
            raise ValueError("need size >= 0, max_dials >= 1 and refill_delay >= 0")
        if min(self.max_idle_age, self.cold_after, self.connect_timeout) <= 0:
            raise ValueError("timeouts must be > 0")


class _Pool:
    __slots__ = (
        "cluster", "dialing", "failures", "gateway", "idle", "last_used", "refill_timer", "sni",
    )  # fmt: skip

    def __init__(self, gateway: str, sni: str, cluster: str) -> None:
        self.gateway = gateway
        self.sni = sni
        self.cluster = cluster
        self.idle: collections.deque[GatewayConn] = collections.deque()
        self.dialing = 0
        self.failures = 0  # consecutive background dial failures: stop refilling until a take
        self.last_used = time.monotonic()
        self.refill_timer: asyncio.TimerHandle | None = None


class WarmPool:
    """All warm pools of one egress (one event loop)."""

    def __init__(self, config: PoolConfig, contexts: ClientContexts) -> None:
        self.config = config
        self.contexts = contexts
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._generation = contexts.credentials.generation
        self._closed = False
        self.hits = 0  # takes served from a pool
        self.misses = 0  # takes that had to dial
        self.dials = 0  # connections made (takes that missed and background refills)
        self.resumed = 0  # of which resumed a TLS session

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop())

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool in self._pools.values():
            self._flush(pool)
        self._pools.clear()

    def idle_count(self, gateway: str, sni: str) -> int:
        pool = self._pools.get((gateway, sni))
        return len(pool.idle) if pool is not None else 0

    async def acquire(self, gateway: str, sni: str, cluster: str) -> GatewayConn:
        """A verified gateway connection, from the pool when one is ready; the caller owns it
        from now on (it must set its own protocol on the transport). Raises ConnectFailed."""
        self._check_generation()
        key = (gateway, sni)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(gateway, sni, cluster)
        pool.last_used = time.monotonic()
        pool.failures = 0
        conn = self._take(pool)
        if conn is not None:
            self.hits += 1
            self._refill_later(pool)
            return conn
        self.misses += 1
        cfg = self.config
        try:
            conn = await dial_gateway(
                self.contexts, gateway, sni, cluster, cfg.connect_timeout, cfg.handshake_timeout
            )
        finally:
            # Refill once this dial is through: the background dials then resume its session.
            self._refill(pool)
        self._count(conn)
        return conn

    def _count(self, conn: GatewayConn) -> None:
        self.dials += 1
        self.resumed += conn.resumed

    def drop_gateway(self, gateway: str) -> None:
        """Close idle connections to `gateway` (it failed a probe or left the table)."""
        for (g, _), pool in self._pools.items():
            if g == gateway:
                self._flush(pool)

    def retain(self, gateways: set[str]) -> None:
        for key in [k for k in self._pools if k[0] not in gateways]:
            self._flush(self._pools.pop(key))
        self.contexts.retain(gateways)

    # --- internals ----------------------------------------------------------------------------

    def _take(self, pool: _Pool) -> GatewayConn | None:
        now = time.monotonic()
        while pool.idle:
            conn = pool.idle.popleft()
            conn.protocol.on_lost = None
            if conn.alive and now - conn.born < self.config.max_idle_age:
                return conn
            abort_transport(conn.transport)
        return None

    def _refill_later(self, pool: _Pool) -> None:
        delay = self.config.refill_delay
        if delay <= 0:
            self._refill(pool)
        elif pool.refill_timer is None and not self._closed:
            pool.refill_timer = asyncio.get_running_loop().call_later(delay, self._refill, pool)

    def _refill(self, pool: _Pool) -> None:
        if pool.refill_timer is not None:
            pool.refill_timer.cancel()
            pool.refill_timer = None
        if self._closed:
            return
        want = self.config.size - len(pool.idle) - pool.dialing
        for _ in range(max(0, min(want, self.config.max_dials - pool.dialing))):
            pool.dialing += 1
            task = asyncio.create_task(self._dial_into(pool))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dial_into(self, pool: _Pool) -> None:
        cfg = self.config
        try:
            conn = await dial_gateway(
                self.contexts, pool.gateway, pool.sni, pool.cluster,
                cfg.connect_timeout, cfg.handshake_timeout,
            )  # fmt: skip
        except ConnectFailed as err:
            pool.failures += 1
            log.info(
                "pool dial failed",
                extra={"gateway": pool.gateway, "sni": pool.sni, "error": str(err)},
            )
            return
        finally:
            pool.dialing -= 1
        self._count(conn)
        current = self._pools.get((pool.gateway, pool.sni)) is pool
        if self._closed or not current or conn.generation != self._generation:
            conn.transport.close()
            return
        conn.protocol.on_lost = lambda p, pool=pool: self._lost(pool, p)
        pool.idle.append(conn)
        if len(pool.idle) + pool.dialing < cfg.size and pool.failures == 0:
            self._refill(pool)

    def _lost(self, pool: _Pool, protocol: IdleWatch) -> None:
        for conn in pool.idle:
            if conn.protocol is protocol:
                pool.idle.remove(conn)
                break

    def _flush(self, pool: _Pool) -> None:
        if pool.refill_timer is not None:
            pool.refill_timer.cancel()
            pool.refill_timer = None
        while pool.idle:
            conn = pool.idle.popleft()
            conn.protocol.on_lost = None
            with contextlib.suppress(Exception):
                close_transport(conn.transport)

    def _check_generation(self) -> None:
        generation = self.contexts.credentials.generation
        if generation != self._generation:
            self._generation = generation
            for pool in self._pools.values():
                self._flush(pool)

    async def _sweep_loop(self) -> None:
        cfg = self.config
        period = min(cfg.max_idle_age, cfg.cold_after) / 4
        while True:
            await asyncio.sleep(period)
            self._sweep()

    def _sweep(self) -> None:
        self._check_generation()
        now = time.monotonic()
        for key, pool in list(self._pools.items()):
            if now - pool.last_used > self.config.cold_after:
                self._flush(pool)
                if pool.dialing == 0:
                    del self._pools[key]
                continue
            kept: collections.deque[GatewayConn] = collections.deque()
            for conn in pool.idle:
                if conn.alive and now - conn.born < self.config.max_idle_age:
                    kept.append(conn)
                else:
                    conn.protocol.on_lost = None
                    close_transport(conn.transport)  # it may be closing already
            pool.idle = kept
            if pool.failures == 0:
                self._refill(pool)
