"""Bootstrap tokens: single use, expiring, stored hashed in a 0600 file."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from federation.trust.errors import PkiError
from federation.trust.tokens import BootstrapTokens


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def test_single_use_and_hashed_at_rest(tmp_path) -> None:
    tokens = BootstrapTokens(tmp_path)
    token, expires = tokens.create(3600)
    assert expires > dt.datetime.now(dt.UTC)
    text = tokens.path.read_text()
    assert token not in text and token.removeprefix("isthmus-bt-") not in text
    assert (tokens.path.stat().st_mode & 0o777) == 0o600
    assert tokens.consume(token) is True
    assert tokens.consume(token) is False
    # A second store on the same directory (another process) sees the same state.
    other, _ = tokens.create(60)
    assert BootstrapTokens(tmp_path).consume(other) is True
    assert tokens.consume(other) is False


def test_expiry(tmp_path) -> None:
    clock = Clock()
    tokens = BootstrapTokens(tmp_path, clock=clock)
    token, expires = tokens.create(dt.timedelta(minutes=10))
    assert expires == clock.now + dt.timedelta(minutes=10)
    clock.now += dt.timedelta(minutes=11)
    assert tokens.consume(token) is False
    assert tokens.count() == 0


@pytest.mark.parametrize("ttl", [0, -5, 31 * 86400])
def test_bad_ttl(tmp_path, ttl: int) -> None:
    with pytest.raises(ValueError):
        BootstrapTokens(tmp_path).create(ttl)


def test_unknown_and_malformed_tokens(tmp_path) -> None:
    tokens = BootstrapTokens(tmp_path)
    assert tokens.consume("") is False
    assert tokens.consume("isthmus-bt-unknown") is False
    assert tokens.consume("something else") is False


def test_corrupt_file_is_a_clear_error(tmp_path) -> None:
    tokens = BootstrapTokens(tmp_path)
    tokens.path.write_text("{nope")
    with pytest.raises(PkiError, match="corrupt"):
        tokens.create(60)


def test_concurrent_consumers_get_one_success(tmp_path) -> None:
    tokens = BootstrapTokens(tmp_path)
    token, _ = tokens.create(60)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(BootstrapTokens(tmp_path).consume(token)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [False] * 7 + [True]
