"""The egress' fast liveness probe of a tunnel connection, sans-IO (the clock is passed in).

A remote gateway whose link is cut sends nothing more, but TCP does not say so: the OPENs of
new streams would each wait for `open_timeout` before the egress retries elsewhere, and the
keepalive only drops the connection after `ping_interval + ping_timeout` of silence. So when
an OPEN has gone `open_probe_after` seconds without ACCEPT or RESET, and the peer sent no
frame at all since that OPEN went out, one PING goes out. A live peer answers it (an ingress
that is merely slow to connect an endpoint still answers PINGs, so its OPENs keep waiting);
if no frame of any kind comes back within `probe_timeout`, the connection is **suspect**:
every stream still waiting for its ACCEPT fails at once, and the connection takes no new
streams. Established streams are left alone (the keepalive still decides about the
connection). While suspect, a PING goes out every `probe_timeout`, and any frame from the
peer clears the suspicion.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OpenProbe", "ProbeStep"]


@dataclass(frozen=True, slots=True)
class ProbeStep:
    """What the connection does after `OpenProbe.check`."""

    ping: bool = False  # send a PING now
    fail: tuple[int, ...] = ()  # streams whose OPEN fails now: the peer is silent
    turned_suspect: bool = False  # the connection became suspect at this step (log, count)
    wake: float | None = None  # call `check` again at this time (None: on the next OPEN)


class OpenProbe:
    """Liveness of one egress tunnel connection, judged from its unanswered OPENs.

    The connection calls `opened` when an OPEN goes out, `settled` when the stream got its
    ACCEPT or RESET (or ended), `heard` when any frame arrives while `waiting` (a probe PING
    is out), and `check` at the times `opened` and `check` ask for."""

    __slots__ = ("open_probe_after", "opening", "ping_at", "probe_timeout", "silent_since")

    def __init__(self, open_probe_after: float, probe_timeout: float) -> None:
        self.open_probe_after = open_probe_after
        self.probe_timeout = probe_timeout
        self.opening: dict[int, float] = {}  # stream id -> when its OPEN went out (in order)
        self.ping_at: float | None = None  # our probe PING is out since then, unanswered
        self.silent_since: float | None = None  # suspect: no frame from the peer since then

    @property
    def suspect(self) -> bool:
        return self.silent_since is not None

    @property
    def waiting(self) -> bool:
        """A probe PING is out: the next frame from the peer matters (call `heard`)."""
        return self.ping_at is not None

    def opened(self, sid: int, now: float) -> float:
        """An OPEN went out; returns when to `check` (if no check is due earlier)."""
        self.opening[sid] = now
        return now + self.open_probe_after

    def settled(self, sid: int) -> None:
        self.opening.pop(sid, None)

    def heard(self, now: float) -> float | None:
        """A frame came from the peer while a probe was out. Returns how long the peer was
        silent if that clears a suspicion, else None."""
        self.ping_at = None
        since, self.silent_since = self.silent_since, None
        return None if since is None else now - since

    def check(self, now: float, last_heard: float) -> ProbeStep:
        """Decide at `now`; `last_heard` is when the last frame came from the peer."""
        timeout = self.probe_timeout
        if self.ping_at is not None:
            due = self.ping_at + timeout
            if now < due:
                return ProbeStep(wake=due)
            # No frame at all since our PING: the peer (or the path to it) is silent.
            turned = self.silent_since is None
            if turned:
                self.silent_since = last_heard
            fail = tuple(self.opening)
            self.opening.clear()
            self.ping_at = now  # keep probing, so that a healed link is noticed soon
            return ProbeStep(ping=True, fail=fail, turned_suspect=turned, wake=now + timeout)
        # OPENs sent before the peer's last frame are no sign of silence (a slow endpoint);
        # the oldest one sent after it decides (`opening` is in the order the OPENs went).
        for sent in self.opening.values():
            if sent < last_heard:
                continue
            due = sent + self.open_probe_after
            if now < due:
                return ProbeStep(wake=due)
            self.ping_at = now
            return ProbeStep(ping=True, wake=now + timeout)
        return ProbeStep()
