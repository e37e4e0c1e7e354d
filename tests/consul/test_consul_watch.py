"""The blocking-query and connectivity state machines, without a server (sans-IO)."""

from __future__ import annotations

import random

import pytest

from discovery.consul.watch import BlockingQuery, Connectivity, State, effective_wait


def test_the_first_read_is_plain_then_blocks_on_the_returned_index() -> None:
    q = BlockingQuery(wait=300)
    assert q.params() == (0, 300)  # index 0: returns at once
    a = q.answered(42)
    assert a.changed and not a.reset
    assert q.params() == (42, 300)
    a = q.answered(42)  # a timeout, or an idempotent write
    assert not a.changed
    assert q.answered(43).changed


def test_an_index_that_goes_backwards_resets_to_a_fresh_read() -> None:
    q = BlockingQuery(wait=300)
    q.answered(100)
    a = q.answered(7)
    assert a.reset and a.changed
    assert q.params()[0] == 0  # the next read does not block on a stale index
    q.answered(7)
    assert q.params()[0] == 7


@pytest.mark.parametrize("bad", [0, -3])
def test_an_index_below_one_is_raised_to_one(bad: int) -> None:
    q = BlockingQuery(wait=300)
    q.answered(bad)
    assert q.params()[0] == 1  # blocks instead of spinning


def test_back_off_grows_jittered_and_capped_then_resets() -> None:
    q = BlockingQuery(wait=300, retry_base=0.5, retry_max=30)
    rng = random.Random(1)
    delays = [q.failed(rng) for _ in range(12)]
    for n, d in enumerate(delays):
        ceiling = min(30, 0.5 * 2 ** n)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 30
    assert len(set(delays)) == len(delays)  # jittered
    q.answered(5)
    assert q.failures == 0
    assert q.failed(rng) <= 0.5


def test_rate_limit_allows_a_burst_of_two_then_one_per_interval() -> None:
    q = BlockingQuery(wait=300, min_interval=15)
    assert q.delay(0.0) == 0
    assert q.delay(0.0) == 0
    assert q.delay(0.0) == pytest.approx(15)  # the third goes at 15
    assert q.delay(15.0) == pytest.approx(15)  # the fourth at 30: one per interval holds
    assert q.delay(100.0) == 0 and q.delay(100.0) == 0  # idle long enough: the burst again
    assert q.delay(100.0) == pytest.approx(15)


def test_connectivity_reports_each_change_once() -> None:
    c = Connectivity()
    assert c.stale and c.state is State.CONNECTING
    assert c.ok("services", 1.0) is None  # answered, but not synchronised yet
    t = c.synced(1.0)
    assert t is not None and t.new is State.CONNECTED and not c.stale
    t = c.failed("liveness", "connection refused", 2.0)
    assert t is not None and (t.old, t.new) == (State.CONNECTED, State.DEGRADED)
    assert t.reason == "liveness: connection refused"
    assert c.failed("liveness", "connection refused", 3.0) is None  # no second log line
    assert c.failed("service web", "timeout", 3.0) is None
    assert c.reason() == "liveness: connection refused (and 1 more)"
    assert c.ok("liveness", 4.0) is None  # still one failing
    t = c.ok("service web", 5.0)
    assert t is not None and t.new is State.CONNECTED and c.since == 5.0
    assert c.last_contact == 5.0


def test_a_start_without_consul_is_degraded_until_a_full_read() -> None:
    c = Connectivity()
    t = c.failed("services", "connection refused", 0.0)
    assert t is not None and (t.old, t.new) == (State.CONNECTING, State.DEGRADED)
    assert c.ok("services", 1.0) is None  # back, but nothing read in full yet
    assert c.stale
    t = c.synced(2.0)
    assert t is not None and t.new is State.CONNECTED


def test_effective_wait_shares_connections_fairly() -> None:
    assert effective_wait(300, slots=100, watched=50) == 300
    assert effective_wait(300, slots=100, watched=1000) == 30
    assert effective_wait(300, slots=10, watched=100000) == 1.0  # never below the floor
