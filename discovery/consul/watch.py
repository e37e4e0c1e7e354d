"""Blocking queries and connectivity, as state machines without I/O.

`BlockingQuery` holds one Consul blocking query's state and follows the implementation notes of
Consul's "Blocking Queries" documentation:

- the next request carries the last `X-Consul-Index` and a `wait`;
- an index lower than the previous one (a restored snapshot, a Consul upgrade) resets it to 0:
  the next request is a fresh, non-blocking read;
- an index below 1 is raised to 1, so the next request blocks instead of spinning;
- the loop is rate limited by a token bucket with a burst of 2: in the happy case answers are
  followed at once, a result that churns is polled at most once per `min_interval`;
- a failed request is retried after a jittered exponential back-off.

`Connectivity` decides whether the catalog is fresh or stale from the outcome of every request,
and reports a transition only when the state changes, so the shell logs once per change.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from discovery.backoff import Backoff

BURST = 2


@dataclass(frozen=True, slots=True)
class Answer:
    changed: bool  # the index moved (the data may still be the same)
    reset: bool  # the index went backwards: this was, in effect, a fresh read


@dataclass
class BlockingQuery:
    wait: float
    min_interval: float = 1.0
    retry_base: float = 0.5
    retry_max: float = 30.0
    index: int = 0
    failures: int = 0
    answered_once: bool = False
    _tokens: float = float(BURST)
    _stamp: float | None = None
    _backoff: Backoff | None = None

    def delay(self, now: float) -> float:
        """Seconds to hold the next request back (0: send it now). Either way the request's
        token is taken: a delayed request has its slot reserved, so the rate holds."""
        if self._stamp is not None:
            self._tokens = min(BURST, self._tokens + (now - self._stamp) / self.min_interval)
        self._stamp = now
        self._tokens -= 1
        return max(0.0, -self._tokens * self.min_interval)

    def params(self) -> tuple[int, float]:
        """(index, wait) for the next request; index 0 means a plain read that returns at once."""
        return self.index, self.wait

    def answered(self, index: int) -> Answer:
        previous = self.index
        self.failures = 0
        if self._backoff is not None:
            self._backoff.reset()
        first = not self.answered_once
        self.answered_once = True
        if previous > 0 and index < previous:
            self.index = 0
            return Answer(changed=True, reset=True)
        self.index = max(index, 1)
        return Answer(changed=first or index != previous, reset=False)

    def failed(self, rng: random.Random) -> float:
        """Seconds to wait before retrying: exponential from `retry_base`, capped at
        `retry_max`, jittered over [d/2, d] (never below `retry_base`)."""
        if self._backoff is None:
            self._backoff = Backoff(min(self.retry_base, self.retry_max), self.retry_max,
                                    jitter=0.5)  # fmt: skip
        self.failures += 1
        return self._backoff.next(rng)


class State(enum.StrEnum):
    CONNECTING = "connecting"  # nothing answered yet
    CONNECTED = "connected"  # every watch's last request succeeded
    DEGRADED = "degraded"  # something failed: the catalog is the last known one


@dataclass(frozen=True, slots=True)
class Transition:
    old: State
    new: State
    reason: str


@dataclass
class Connectivity:
    """Fresh or stale, from the last outcome of each named activity (a watch, the liveness
    probe). Stale from the first failure until every failed activity has succeeded again."""

    state: State = State.CONNECTING
    since: float = 0.0
    last_contact: float | None = None
    failing: dict[str, str] = field(default_factory=dict)
    synced_once: bool = False  # a full read has completed since start-up

    @property
    def stale(self) -> bool:
        return self.state is not State.CONNECTED

    def reason(self) -> str:
        if not self.failing:
            return "" if self.state is State.CONNECTED else "not synchronised with Consul yet"
        what = sorted(self.failing)
        more = f" (and {len(what) - 1} more)" if len(what) > 1 else ""
        return f"{what[0]}: {self.failing[what[0]]}{more}"

    def ok(self, what: str, now: float) -> Transition | None:
        self.last_contact = now
        self.failing.pop(what, None)
        return self._settle(now)

    def synced(self, now: float) -> Transition | None:
        """A full read is done: the catalog may be called fresh once nothing is failing."""
        self.synced_once = True
        return self._settle(now)

    def failed(self, what: str, reason: str, now: float) -> Transition | None:
        self.failing[what] = reason
        if self.state is State.DEGRADED:
            return None
        return self._move(State.DEGRADED, now, self.reason())

    def _settle(self, now: float) -> Transition | None:
        if self.state is not State.CONNECTED and self.synced_once and not self.failing:
            return self._move(State.CONNECTED, now, "")
        return None

    def _move(self, new: State, now: float, reason: str) -> Transition:
        old, self.state, self.since = self.state, new, now
        return Transition(old, new, reason)


def effective_wait(wait: float, slots: int, watched: int, floor: float = 1.0) -> float:
    """A blocking query holds a connection for up to `wait`. With more watched services than
    connection slots, watches take turns; a shorter wait keeps every service re-read at least
    about once per `wait` all the same."""
    if watched <= slots or watched <= 0:
        return wait
    return max(floor, wait * slots / watched)
