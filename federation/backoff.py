"""Reconnect delays: exponential back-off with full jitter, shared by every long-lived link
(peering to other clusters, an agent's control channel).

Full jitter (a delay drawn uniformly between the floor and the current ceiling, the ceiling
doubling after each failure up to `maximum`) spreads the reconnects of many clients after a
shared outage instead of bringing them back in step. Randomness is injected for tests.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """`next()` is the delay before the next attempt; `reset()` after a success."""

    __slots__ = ("_ceiling", "_rng", "maximum", "minimum")

    def __init__(
        self, minimum: float = 0.2, maximum: float = 15.0, rng: random.Random | None = None
    ) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError(f"need 0 < minimum <= maximum, got {minimum} and {maximum}")
        self.minimum = minimum
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._ceiling = minimum

    def reset(self) -> None:
        self._ceiling = self.minimum

    def next(self) -> float:
        delay = self._rng.uniform(self.minimum, self._ceiling)
        self._ceiling = min(self.maximum, self._ceiling * 2)
        return delay
