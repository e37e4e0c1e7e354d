"""Active health probing of remote ingress gateways.

Every `interval` (with jitter, so many egresses do not probe in step) each remote gateway in the
routing table gets a TCP connect and a mutual-TLS handshake with the reserved SNI
`probe.<cluster>.<trust_domain>`; the ingress answers by completing the handshake and closing.
`unhealthy_threshold` failures in a row mark the gateway down in the balancer (its traffic moves
at once, without waiting for client connections to fail); `healthy_threshold` successes bring it
back. The probe state machine (`ProbeState`) is sans-IO; `GatewayProber` is its asyncio shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from federation.routing import RoutingTable
from gateway.balancer import Balancer, Target, TargetKind
from gateway.errors import ConnectFailed, SniError
from gateway.proto.sni import probe_sni
from gateway.tlsclient import ClientContexts, dial_gateway

__all__ = ["GatewayProber", "ProbeConfig", "ProbeState"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    enabled: bool = True
    interval: float = 2.0
    timeout: float = 1.0  # for connect and handshake each
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    jitter: float = 0.1  # share of the interval

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        if self.unhealthy_threshold < 1 or self.healthy_threshold < 1:
            raise ValueError("thresholds must be >= 1")


class ProbeState:
    """Streaks of one target's probe results; `observe` says when its health flips."""

    __slots__ = ("config", "down", "failures", "successes")

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        self.down = False
        self.failures = 0
        self.successes = 0

    def observe(self, ok: bool) -> bool | None:
        """Record a result; returns the new `down` value when it changed, else None."""
        if ok:
            self.failures = 0
            self.successes += 1
            if self.down and self.successes >= self.config.healthy_threshold:
                self.down = False
                return False
        else:
            self.successes = 0
            self.failures += 1
            if not self.down and self.failures >= self.config.unhealthy_threshold:
                self.down = True
                return True
        return None


OnChange = Callable[[Target, bool], None]


class GatewayProber:
    def __init__(
        self,
        config: ProbeConfig,
        contexts: ClientContexts,
        balancer: Balancer,
        on_change: OnChange | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.contexts = contexts
        self.balancer = balancer
        self._on_change = on_change
        self._rng = rng or random.Random()
        self._tasks: dict[Target, asyncio.Task[None]] = {}
        self._trust_domain = ""
        self.probes = 0  # probes run (for tests and status)

    @property
    def targets(self) -> frozenset[Target]:
        return frozenset(self._tasks)

    def update(self, table: RoutingTable) -> None:
        """Probe exactly the remote gateways of `table` (call on every table swap)."""
        if not self.config.enabled:
            return
        self._trust_domain = table.trust_domain
        wanted: set[Target] = set()
        for route in table.services.values():
            for d in route.destinations:
                if not d.local:
                    wanted.update(Target(d.cluster, TargetKind.GATEWAY, g) for g in d.gateways)
        for target in [t for t in self._tasks if t not in wanted]:
            self._tasks.pop(target).cancel()
        for target in wanted - self._tasks.keys():
            self._tasks[target] = asyncio.create_task(self._loop(target))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def probe_once(self, target: Target) -> bool:
        try:
            sni = probe_sni(target.cluster, self._trust_domain)
            tunnel = await dial_gateway(
                self.contexts, target.ident, sni, target.cluster,
                self.config.timeout, self.config.timeout,
            )  # fmt: skip
        except (ConnectFailed, SniError, ValueError) as err:
            log.info(
                "gateway probe failed",
                extra={"cluster": target.cluster, "gateway": target.ident, "error": str(err)},
            )
            return False
        finally:
            self.probes += 1
        tunnel.transport.close()
        return True

    async def _loop(self, target: Target) -> None:
        state = ProbeState(self.config)
        cfg = self.config
        # Start at a random point of the interval so targets are not probed in step.
        await asyncio.sleep(self._rng.uniform(0, cfg.interval * cfg.jitter))
        while True:
            ok = await self.probe_once(target)
            flipped = state.observe(ok)
            if flipped is not None:
                self.balancer.set_down(target, flipped)
                if self._on_change is not None:
                    with contextlib.suppress(Exception):
                        self._on_change(target, flipped)
            delay = cfg.interval * (1 + self._rng.uniform(-cfg.jitter, cfg.jitter))
            await asyncio.sleep(delay)
