"""Warm pools of mutual-TLS connections from the egress to remote ingress gateways.

A TLS connection to an ingress is bound to one SNI (the ingress routes it by the ClientHello),
so a pool is kept per (gateway, SNI). A pool turns hot when it is used: each take schedules a
refill up to `size` idle connections, dialled in the background with TLS session resumption
(`tlsclient`), so the next client connection skips both the TCP and the TLS handshake. The
refill after a take waits `refill_delay` so that its handshakes do not compete for the CPU with
the first bytes of the connection that took the tunnel. Every new client connection still costs
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
import ssl
import time
from dataclasses import dataclass

from discovery.addresses import split_host_port
from federation.trust.errors import TrustError
from federation.trust.observe import classify, record_failure
from federation.trust.spiffe import SpiffeId
from federation.trust.verify import verify_peer
from gateway.closing import abort_transport, close_transport
from gateway.errors import ConnectFailed
from gateway.metrics import Outcome
from gateway.tlsclient import ClientContexts

__all__ = ["PoolConfig", "Tunnel", "TunnelPool", "dial_tunnel"]

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
    # first bytes of the connection that just took the tunnel (measured: 5.3 ms -> 1.5 ms per
    # sequential pooled connection on 2 cores). A take that found the pool empty refills as
    # soon as its own dial is through.
    refill_delay: float = 0.02

    def __post_init__(self) -> None:
        if self.size < 0 or self.max_dials < 1 or self.refill_delay < 0:
            raise ValueError("need size >= 0, max_dials >= 1 and refill_delay >= 0")
        if min(self.max_idle_age, self.cold_after, self.connect_timeout) <= 0:
            raise ValueError("timeouts must be > 0")


class _Idle(asyncio.Protocol):
    """Protocol of a connection while it waits in a pool."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.on_lost: collections.abc.Callable[[_Idle], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # Nothing was asked yet: the stream is no longer at its start, so it is useless.
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost(self)


@dataclass(frozen=True, slots=True)
class Tunnel:
    """An established, verified mutual-TLS connection to a remote ingress."""

    transport: asyncio.Transport
    protocol: _Idle
    peer: SpiffeId
    gateway: str
    sni: str
    born: float
    generation: int
    resumed: bool

    @property
    def alive(self) -> bool:
        return not self.protocol.lost and not self.transport.is_closing()


async def dial_tunnel(
    contexts: ClientContexts,
    gateway: str,
    sni: str,
    cluster: str,
    connect_timeout: float,
    handshake_timeout: float,
) -> Tunnel:
    """Connect to `gateway` with `sni`, handshake and verify that it is `cluster`'s gateway.

    Raises ConnectFailed with the outcome to count (failures are logged by the caller, TLS
    refusals are also counted and logged by the trust library)."""
    loop = asyncio.get_running_loop()
    host, port = split_host_port(gateway)
    generation = contexts.credentials.generation
    ctx = contexts.for_gateway(gateway)
    started = time.monotonic()
    try:
        async with asyncio.timeout(connect_timeout + handshake_timeout):
            transport, protocol = await loop.create_connection(
                _Idle, host, port, ssl=ctx, server_hostname=sni,
                ssl_handshake_timeout=handshake_timeout,
            )  # fmt: skip
    except TimeoutError as exc:
        connected = time.monotonic() - started > connect_timeout
        outcome = Outcome.HANDSHAKE_TIMEOUT if connected else Outcome.CONNECT_TIMEOUT
        raise ConnectFailed(f"{gateway}: timed out", outcome) from exc
    except ssl.SSLError as exc:
        record_failure(classify(exc), side="client", peer=gateway)
        msg = f"{gateway}: TLS handshake failed: {exc}"
        raise ConnectFailed(msg, Outcome.HANDSHAKE_ERROR) from exc
    except (OSError, EOFError) as exc:
        raise ConnectFailed(f"{gateway}: {exc!r}", Outcome.CONNECT_ERROR) from exc
    ssl_object = transport.get_extra_info("ssl_object")
    creds = contexts.credentials
    try:
        if ssl_object is None:
            raise classify(ssl.SSLError("no TLS session after the handshake"))
        peer = verify_peer(ssl_object, creds.bundle, creds.trust_domain, expected_cluster=cluster)
    except TrustError as err:
        record_failure(err, side="client", peer=gateway)
        transport.abort()
        raise ConnectFailed(f"{gateway}: {err}", Outcome.HANDSHAKE_ERROR) from err
    return Tunnel(
        transport,  # type: ignore[arg-type]
        protocol,
        peer,
        gateway,
        sni,
        time.monotonic(),
        generation,
        bool(ssl_object.session_reused),
    )


class _Pool:
    __slots__ = (
        "cluster", "dialing", "failures", "gateway", "idle", "last_used", "refill_timer", "sni",
    )  # fmt: skip

    def __init__(self, gateway: str, sni: str, cluster: str) -> None:
        self.gateway = gateway
        self.sni = sni
        self.cluster = cluster
        self.idle: collections.deque[Tunnel] = collections.deque()
        self.dialing = 0
        self.failures = 0  # consecutive background dial failures: stop refilling until a take
        self.last_used = time.monotonic()
        self.refill_timer: asyncio.TimerHandle | None = None


class TunnelPool:
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

    async def acquire(self, gateway: str, sni: str, cluster: str) -> Tunnel:
        """A verified tunnel, from the pool when one is ready; the caller owns it from now on
        (it must set its own protocol on the transport). Raises ConnectFailed."""
        self._check_generation()
        key = (gateway, sni)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(gateway, sni, cluster)
        pool.last_used = time.monotonic()
        pool.failures = 0
        tunnel = self._take(pool)
        if tunnel is not None:
            self.hits += 1
            self._refill_later(pool)
            return tunnel
        self.misses += 1
        cfg = self.config
        try:
            tunnel = await dial_tunnel(
                self.contexts, gateway, sni, cluster, cfg.connect_timeout, cfg.handshake_timeout
            )
        finally:
            # Refill once this dial is through: the background dials then resume its session.
            self._refill(pool)
        self._count(tunnel)
        return tunnel

    def _count(self, tunnel: Tunnel) -> None:
        self.dials += 1
        self.resumed += tunnel.resumed

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

    def _take(self, pool: _Pool) -> Tunnel | None:
        now = time.monotonic()
        while pool.idle:
            tunnel = pool.idle.popleft()
            tunnel.protocol.on_lost = None
            if tunnel.alive and now - tunnel.born < self.config.max_idle_age:
                return tunnel
            abort_transport(tunnel.transport)
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
            tunnel = await dial_tunnel(
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
        self._count(tunnel)
        current = self._pools.get((pool.gateway, pool.sni)) is pool
        if self._closed or not current or tunnel.generation != self._generation:
            tunnel.transport.close()
            return
        tunnel.protocol.on_lost = lambda p, pool=pool: self._lost(pool, p)
        pool.idle.append(tunnel)
        if len(pool.idle) + pool.dialing < cfg.size and pool.failures == 0:
            self._refill(pool)

    def _lost(self, pool: _Pool, protocol: _Idle) -> None:
        for tunnel in pool.idle:
            if tunnel.protocol is protocol:
                pool.idle.remove(tunnel)
                break

    def _flush(self, pool: _Pool) -> None:
        if pool.refill_timer is not None:
            pool.refill_timer.cancel()
            pool.refill_timer = None
        while pool.idle:
            tunnel = pool.idle.popleft()
            tunnel.protocol.on_lost = None
            with contextlib.suppress(Exception):
                close_transport(tunnel.transport)

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
            kept: collections.deque[Tunnel] = collections.deque()
            for tunnel in pool.idle:
                if tunnel.alive and now - tunnel.born < self.config.max_idle_age:
                    kept.append(tunnel)
                else:
                    tunnel.protocol.on_lost = None
                    close_transport(tunnel.transport)  # it may be closing already
            pool.idle = kept
            if pool.failures == 0:
                self._refill(pool)
