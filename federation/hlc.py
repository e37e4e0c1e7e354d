"""Hybrid logical clock: orders federation-wide writes despite skewed wall clocks.

A stamp is (wall milliseconds, counter, origin cluster); comparing stamps as tuples gives the
last-writer-wins order every cluster agrees on. Receiving a stamp advances the local clock past
it, so a write made after seeing another cluster's write always wins over it, whatever the
clocks say. A stamp too far in the future is refused: one broken clock must not win forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MAX_DRIFT_MS = 3_600_000  # an hour


class ClockDriftError(ValueError):
    pass


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    wall_ms: int
    counter: int
    origin: str

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}.{self.origin}"

    @classmethod
    def parse(cls, text: object) -> Stamp:
        if not isinstance(text, str):
            raise ValueError(f"expected a version 'WALLMS.COUNTER.ORIGIN', got {text!r}")
        parts = text.split(".", 2)
        numeric = all(p.isascii() and p.isdigit() for p in parts[:2])  # not '²' or '٣'
        if len(parts) != 3 or not parts[2] or not numeric:
            raise ValueError(f"expected a version 'WALLMS.COUNTER.ORIGIN', got {text!r}")
        return cls(int(parts[0]), int(parts[1]), parts[2])


ZERO = Stamp(0, 0, "")


class HybridClock:
    def __init__(
        self,
        origin: str,
        wall: Callable[[], float] = time.time,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
    ) -> None:
        self.origin = origin
        self._wall = wall
        self.max_drift_ms = max_drift_ms
        self.last = Stamp(0, 0, origin)

    def _now_ms(self) -> int:
        return int(self._wall() * 1000)

    def now(self) -> Stamp:
        """A stamp for a local write, greater than every stamp seen so far."""
        wall = self._now_ms()
        if wall > self.last.wall_ms:
            self.last = Stamp(wall, 0, self.origin)
        else:
            self.last = Stamp(self.last.wall_ms, self.last.counter + 1, self.origin)
        return self.last

    def advance(self, stamp: Stamp) -> None:
        """Move past a stamp without any drift check (stamps from our own store)."""
        if (stamp.wall_ms, stamp.counter) > (self.last.wall_ms, self.last.counter):
            self.last = Stamp(stamp.wall_ms, stamp.counter, self.origin)

    def observe(self, stamp: Stamp) -> None:
        """Advance past a remote stamp; raises ClockDriftError if it is implausibly ahead."""
        wall = self._now_ms()
        if stamp.wall_ms - wall > self.max_drift_ms:
            raise ClockDriftError(
                f"stamp {stamp} is {(stamp.wall_ms - wall) / 1000:.0f}s ahead of this clock "
                f"(at most {self.max_drift_ms / 1000:.0f}s tolerated)"
            )
        self.advance(stamp)
