"""Playbooks for the egress' OPEN probe (gateway/proto/liveness.py: OpenProbe): OPENs,
frames heard and checks in, the probe's steps out, an injected clock, no sockets and no timers.
tests/gateway/test_tunnel_ingress.py cuts a real tunnel's link end to end."""

from __future__ import annotations

from gateway.proto.liveness import OpenProbe, ProbeStep
from gateway.proto.mux import MuxConfig

AFTER, TIMEOUT = 0.5, 1.0
T0 = 1000.0


def probe() -> OpenProbe:
    return OpenProbe(AFTER, TIMEOUT)


def test_defaults_come_from_the_mux_config() -> None:
    cfg = MuxConfig()
    assert (cfg.open_probe_after, cfg.probe_timeout) == (0.5, 1.0)


def test_a_silent_peer_fails_the_waiting_opens_and_turns_suspect() -> None:
    p = probe()
    heard = T0 - 3.0  # the peer's last frame came before the OPENs
    assert p.opened(1, T0) == T0 + AFTER
    p.opened(3, T0 + 0.1)
    assert p.check(T0 + 0.2, heard) == ProbeStep(wake=T0 + AFTER)  # too early
    assert p.check(T0 + AFTER, heard) == ProbeStep(ping=True, wake=T0 + AFTER + TIMEOUT)
    assert p.waiting and not p.suspect
    p.opened(5, T0 + 1.0)  # an OPEN after the PING waits for the probe as well
    assert p.check(T0 + 1.2, heard) == ProbeStep(wake=T0 + AFTER + TIMEOUT)
    step = p.check(T0 + AFTER + TIMEOUT, heard)
    assert step == ProbeStep(
        ping=True, fail=(1, 3, 5), turned_suspect=True, wake=T0 + AFTER + 2 * TIMEOUT
    )
    assert p.suspect and not p.opening


def test_while_suspect_it_keeps_probing_and_any_frame_clears_it() -> None:
    p = probe()
    heard = T0 - 1.0
    p.opened(1, T0)
    p.check(T0 + AFTER, heard)
    assert p.check(T0 + AFTER + TIMEOUT, heard).turned_suspect
    now = T0 + AFTER + 2 * TIMEOUT
    # Still nothing: another PING, no second "turned suspect", nothing left to fail.
    assert p.check(now, heard) == ProbeStep(ping=True, wake=now + TIMEOUT)
    assert p.suspect
    assert p.heard(now + 0.3) == now + 0.3 - heard  # how long the peer was silent
    assert not p.suspect and not p.waiting
    assert p.check(now + TIMEOUT, now + 0.3) == ProbeStep()  # nothing waits: no timer


def test_an_answered_probe_leaves_the_opens_waiting() -> None:
    """A live ingress that is slow to connect its endpoint answers the PING: its OPENs keep
    waiting (for ACCEPT, RESET or open_timeout), and no second PING goes out for them."""
    p = probe()
    p.opened(1, T0)
    assert p.check(T0 + AFTER, T0 - 1.0).ping
    assert p.heard(T0 + AFTER + 0.01) is None  # the PONG: no suspicion to clear
    step = p.check(T0 + AFTER + TIMEOUT, T0 + AFTER + 0.01)
    assert step == ProbeStep() and not p.suspect
    assert list(p.opening) == [1]


def test_opens_sent_before_the_last_frame_are_no_sign_of_silence() -> None:
    p = probe()
    p.opened(1, T0)
    heard = T0 + 0.2  # e.g. DATA of another stream, after OPEN 1
    assert p.check(T0 + AFTER, heard) == ProbeStep()
    p.opened(3, T0 + 1.0)  # the first OPEN since that frame decides
    assert p.check(T0 + 1.2, heard) == ProbeStep(wake=T0 + 1.0 + AFTER)
    assert p.check(T0 + 1.0 + AFTER, heard).ping


def test_settled_opens_send_no_probe() -> None:
    p = probe()
    p.opened(1, T0)
    p.opened(3, T0)
    p.settled(1)  # ACCEPT
    p.settled(3)  # RESET (or closed by its user)
    p.settled(7)  # unknown: nothing happens
    assert p.check(T0 + AFTER, T0 - 1.0) == ProbeStep()
    assert not p.waiting


def test_a_frame_between_ping_and_deadline_answers_the_probe() -> None:
    p = probe()
    p.opened(1, T0)
    p.check(T0 + AFTER, T0 - 1.0)
    p.heard(T0 + AFTER + 0.9)  # DATA of an established stream counts as much as a PONG
    assert p.check(T0 + AFTER + TIMEOUT, T0 + AFTER + 0.9) == ProbeStep()
    assert not p.suspect
