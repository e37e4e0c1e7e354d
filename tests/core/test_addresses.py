"""One HOST:PORT parser (discovery/addresses.py) and one reconnect back-off
(discovery/backoff.py) for the whole tree."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.addresses import AddressError, join_host_port, split_host_port
from discovery.backoff import Backoff


def test_split_host_port_forms() -> None:
    assert split_host_port("127.0.0.1:15443") == ("127.0.0.1", 15443)
    assert split_host_port("[::1]:15443") == ("::1", 15443)
    assert split_host_port("gw.example.org:443") == ("gw.example.org", 443)
    assert split_host_port(":53") == ("", 53)
    assert split_host_port("10.0.0.1", default_port=53) == ("10.0.0.1", 53)
    assert split_host_port("[::1]", default_port=53) == ("::1", 53)


@pytest.mark.parametrize(
    ("value", "reason"),
    [("nohost", "form"), ("", "form"), ("a:b", "port"), ("a:", "port"), ("a:65536", "port"),
     ("a:²", "port"), ("a:٣", "port"), ("a:-1", "port"), ("a:000001", "port")],
)  # fmt: skip
def test_split_host_port_refuses(value: str, reason: str) -> None:
    with pytest.raises(AddressError) as err:
        split_host_port(value)
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


def test_min_port() -> None:
    assert split_host_port("a:0") == ("a", 0)
    with pytest.raises(AddressError, match="from 1 to 65535"):
        split_host_port("a:0", min_port=1)


@given(st.sampled_from(["127.0.0.1", "::1", "fe80::1", "gw.example.org"]), st.integers(0, 65535))
def test_join_and_split_round_trip(host: str, port: int) -> None:
    assert split_host_port(join_host_port(host, port)) == (host, port)


def test_backoff_doubles_its_ceiling_with_full_jitter_and_resets() -> None:
    b = Backoff(0.2, 1.0, random.Random(7))
    ceilings = [0.2, 0.4, 0.8, 1.0, 1.0]
    for ceiling in ceilings:
        delay = b.next()
        assert 0.2 <= delay <= ceiling
    b.reset()
    assert b.next() == pytest.approx(0.2)  # the ceiling is the floor again
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


def test_backoff_with_half_jitter_stays_within_a_factor_two_of_its_ceiling() -> None:
    b = Backoff(0.5, 4.0, jitter=0.5)
    rng = random.Random(3)
    for ceiling in [0.5, 1.0, 2.0, 4.0, 4.0]:
        delay = b.next(rng)
        assert max(0.5, ceiling / 2) <= delay <= ceiling
    assert b.failures == 5
    b.reset()
    assert (b.failures, b.next(rng)) == (0, 0.5)
    with pytest.raises(ValueError):
        Backoff(0.5, 4.0, jitter=1.5)
