"""When an HTTP request may be tried again (sans-IO; time is injected).

`RetryBudget` is Finagle's budget: over a sliding window of `ttl` seconds, retries may be at
most `percent` of the requests plus a floor of `min_per_second` (so a quiet service can still
retry). Retrying more than that turns a partial outage into an overload, so a request that
would exceed the budget fails with the answer it has instead.

`RetryPolicy` decides which failures are retriable: only idempotent methods, only while the
request body can be sent again, and only failures that say nothing reached the application
(connect errors, a connection closed before a response, a per-try timeout) or a 5xx that
asks for it (502, 503, 504 by default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["IDEMPOTENT_METHODS", "RetryBudget", "RetryPolicy"]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3  # tries per request, the first included
    per_try_timeout: float = 15.0  # seconds until the response headers
    retry_on_status: frozenset[int] = frozenset({502, 503, 504})
    max_buffered_body: int = 1 << 20  # larger bodies are streamed once and never retried

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if self.per_try_timeout <= 0:
            raise ValueError("per_try_timeout must be > 0")

    def retriable_request(self, method: str, body_replayable: bool) -> bool:
        return method.upper() in IDEMPOTENT_METHODS and body_replayable

    def retriable_status(self, status: int) -> bool:
        return status in self.retry_on_status


class RetryBudget:
    """Retries allowed <= percent x requests + min_per_second x ttl, over the last ttl seconds."""

    def __init__(
        self,
        percent: float = 0.2,
        min_per_second: float = 10.0,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        buckets: int = 10,
    ) -> None:
        if not 0.0 <= percent <= 1.0 or min_per_second < 0 or ttl <= 0 or buckets < 1:
            raise ValueError("need 0 <= percent <= 1, min_per_second >= 0, ttl > 0")
        self.percent = percent
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._clock = clock
        self._width = ttl / buckets
        # Ring of (bucket index, requests, retries); a bucket older than ttl counts as empty.
        self._index = [-1] * buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets

    def _slot(self) -> int:
        n = math.floor(self._clock() / self._width)
        i = n % len(self._index)
        if self._index[i] != n:
            self._index[i] = n
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def _totals(self) -> tuple[int, int]:
        n = math.floor(self._clock() / self._width)
        oldest = n - len(self._index) + 1
        requests = retries = 0
        for i, idx in enumerate(self._index):
            if idx >= oldest:
                requests += self._requests[i]
                retries += self._retries[i]
        return requests, retries

    def record_request(self) -> None:
        self._requests[self._slot()] += 1

    def balance(self) -> float:
        requests, retries = self._totals()
        return self.min_per_second * self.ttl + self.percent * requests - retries

    def try_withdraw(self) -> bool:
        """Spend one retry if the budget allows it."""
        if self.balance() < 1.0:
            return False
        self._retries[self._slot()] += 1
        return True
