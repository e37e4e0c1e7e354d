"""Retry delays: exponential back-off with jitter, the one helper every retrying loop uses
(peering to other clusters, an agent's control channel, Consul's blocking queries).

The ceiling starts at `minimum` and doubles after each failure up to `maximum`; the delay is
drawn uniformly from the top `jitter` share of it (never below `minimum`). Full jitter
(`jitter=1.0`: anywhere from the floor to the ceiling) spreads the reconnects of many clients
after a shared outage instead of bringing them back in step; `jitter=0.5` keeps each delay
within a factor of two of the ceiling, for a loop whose wait should stay predictable.
Randomness is injected for tests.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """`next()` is the delay before the next attempt; `reset()` after a success."""

    __slots__ = ("_ceiling", "_rng", "failures", "jitter", "maximum", "minimum")

    def __init__(
        self,
        minimum: float = 0.2,
        maximum: float = 15.0,
        rng: random.Random | None = None,
        *,
        jitter: float = 1.0,
    ) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError(f"need 0 < minimum <= maximum, got {minimum} and {maximum}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"need 0 <= jitter <= 1, got {jitter}")
        self.minimum = minimum
        self.maximum = maximum
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._ceiling = minimum
        self.failures = 0  # since the last reset

    def reset(self) -> None:
        self._ceiling = self.minimum
        self.failures = 0

    def next(self, rng: random.Random | None = None) -> float:
        """The next delay (drawn from `rng` when given, else from the constructor's)."""
        ceiling = self._ceiling
        floor = max(self.minimum, ceiling * (1.0 - self.jitter))
        delay = (rng or self._rng).uniform(floor, ceiling)
        self._ceiling = min(self.maximum, ceiling * 2)
        self.failures += 1
        return delay
