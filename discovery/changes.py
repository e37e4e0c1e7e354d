"""Waking blocking queries (`?index=N&wait=`) when a counter moves.

One asyncio.Event, replaced at every change: a waiter holds the event it saw, so a change that
lands while it re-checks the counter is never missed, and nothing needs clearing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

__all__ = ["ChangeSignal"]


class ChangeSignal:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """The counter moved: wake every waiter."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait_past(self, current: Callable[[], int], index: int, timeout: float) -> None:
        """Return once `current()` is past `index`, or after `timeout` seconds."""
        event = self._event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while current() <= index:
                    await event.wait()
                    event = self._event
