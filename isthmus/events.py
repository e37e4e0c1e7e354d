"""Recent events for the console: health changes, peer state changes, policy writes and refused
handshakes, in a bounded ring buffer that clients read with blocking queries.

Sans-IO apart from the asyncio wake-up: `EventLog.add` appends, `since` reads, `wait` blocks.
Every event gets the next index; a client that asks for events after an index older than the
ring holds gets what is left and `truncated`. Refused handshakes can come by the thousand from
anyone who reaches the ingress: at most `burst` of them are kept per `burst_window`, and the
rest are counted into one summary event when the window closes, so a flood cannot push the
other events out of the ring.
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from discovery.catalog import Catalog
from discovery.changes import ChangeSignal
from discovery.model import Health, WorkloadState
from federation.peering import PeerState, PeerStatus
from federation.policy import TrafficPolicy
from federation.service import Federation
from federation.trust import TrustError, observe

__all__ = ["Event", "EventLog", "Kind", "watch_catalog", "watch_federation", "watch_handshakes"]

Kind = str  # "health" | "peer" | "policy" | "handshake"
KINDS = ("health", "peer", "policy", "handshake")
# Free text that reaches the log from outside (a check's output, an error): kept short.
MAX_TEXT = 512


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[:MAX_TEXT] + "…"
    return value


@dataclass(frozen=True, slots=True)
class Event:
    index: int
    at: float
    kind: Kind
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "time": dt.datetime.fromtimestamp(self.at, dt.UTC).isoformat(),
            "kind": self.kind,
            "message": self.message,
            **self.fields,
        }


class EventLog:
    def __init__(
        self,
        capacity: int = 1000,
        *,
        burst: int = 20,
        burst_window: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.burst, self.burst_window = burst, burst_window
        self._clock = clock
        self._ring: collections.deque[Event] = collections.deque(maxlen=capacity)
        self.index = 0
        self._changed = ChangeSignal()
        self._window_start = 0.0
        self._in_window = 0
        self._suppressed = 0

    def add(self, kind: Kind, message: str, **fields: Any) -> Event | None:
        """Append an event (None when a refused handshake was only counted, see above)."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        now = self._clock()
        if kind == "handshake":
            if now - self._window_start >= self.burst_window:
                self._close_window(now)
            if self._in_window >= self.burst:
                self._suppressed += 1
                return None
            self._in_window += 1
        return self._append(now, kind, _clip(message), fields)

    def _append(self, now: float, kind: Kind, message: str, fields: dict[str, Any]) -> Event:
        self.index += 1
        event = Event(self.index, now, kind, message, {k: _clip(v) for k, v in fields.items()})
        self._ring.append(event)
        self._changed.notify()
        return event

    def _close_window(self, now: float) -> None:
        if self._suppressed:
            self._append(
                now, "handshake",
                f"{self._suppressed} more refused handshakes in {self.burst_window:g}s "
                "(counted, not listed one by one)",
                {"suppressed": self._suppressed},
            )  # fmt: skip
        self._window_start, self._in_window, self._suppressed = now, 0, 0

    def flush(self) -> None:
        """Emit the summary of a closed window of suppressed handshakes, if one is due."""
        now = self._clock()
        if self._suppressed and now - self._window_start >= self.burst_window:
            self._close_window(now)

    def since(self, index: int) -> tuple[list[Event], bool]:
        """Events after `index`, oldest first, and whether some of them are no longer held."""
        out: list[Event] = []
        for event in reversed(self._ring):
            if event.index <= index:
                break
            out.append(event)
        out.reverse()
        oldest = self._ring[0].index if self._ring else self.index + 1
        return out, index < self.index and oldest > index + 1

    async def wait(self, index: int, timeout: float) -> int:
        """Block until an event after `index` exists or `timeout` passes; the current index.
        An index ahead of ours (a client of an earlier run of this process) answers at once."""
        if self.index == index and timeout > 0:
            await self._changed.wait_past(lambda: self.index, index, timeout)
        return self.index


# --- what feeds the log (wired by the appliance) ------------------------------------------------


def watch_catalog(events: EventLog, catalog: Catalog) -> Callable[[], None]:
    """A health change of a local workload (not its registration or removal) is an event."""
    known: dict[str, Health] = {st.workload.id: st.health for st in catalog.workloads()}

    def changed(_: int, workload_id: str, state: WorkloadState | None) -> None:
        if state is None:
            known.pop(workload_id, None)
            return
        before = known.get(workload_id)
        known[workload_id] = state.health
        if before is not None and before is not state.health:
            events.add(
                "health",
                f"{workload_id} ({state.workload.service}) {before.value} -> {state.health.value}",
                workload=workload_id,
                service=str(state.workload.service),
                health=state.health.value,
                previous=before.value,
                output=state.output,
            )

    return catalog.subscribe(changed)


def watch_federation(events: EventLog, federation: Federation) -> Callable[[], None]:
    """Peer status changes and policy writes (local or replicated) are events."""

    def peer(state: PeerState, was: PeerStatus) -> None:
        events.add(
            "peer",
            f"peer {state.cluster} {was.value} -> {state.status.value}",
            cluster=state.cluster,
            state=state.status.value,
            previous=was.value,
            error=state.error,
        )

    def policy(p: TrafficPolicy) -> None:
        what = "reset to locality routing" if p.deleted else (
            ", ".join(f"{c}={w}" for c, w in sorted((p.weights or {}).items()))
            + ("" if p.failover else ", no failover")
        )
        origin = "here" if p.stamp.origin == federation.cluster else f"by {p.stamp.origin}"
        events.add(
            "policy",
            f"traffic policy of {p.service} written {origin}: {what}",
            service=str(p.service),
            version=str(p.stamp),
            origin=p.stamp.origin,
            weights=None if p.weights is None else dict(p.weights),
            failover=p.failover,
        )

    undo = [federation.on_peer_status(peer), federation.policies.subscribe(policy)]

    def unsubscribe() -> None:
        for u in undo:
            u()

    return unsubscribe


def watch_handshakes(events: EventLog) -> Callable[[], None]:
    """Every refused TLS handshake is an event (at most `burst` per window, the rest counted)."""

    def refused(err: TrustError, side: str | None, peer: str | None) -> None:
        events.add(
            "handshake",
            f"tls handshake refused ({err.reason}) from {peer or 'unknown'}"
            if side == "server" else f"tls handshake to {peer or 'unknown'} failed ({err.reason})",
            reason=err.reason,
            side=side,
            peer=peer,
            detail=str(err),
        )  # fmt: skip

    return observe.on_failure(refused)
