"""pytest fixtures for the testbed, loaded for every test folder by tests/conftest.py
(`pytest_plugins = ["tests.testbed.fixtures"]`).

- `testbed` (session): the default small internet, built once for the whole run and torn down
  at its end, also on failure, Ctrl-C or SIGTERM. Tests share it: what a test starts on it
  (backends, a link taken down), the test stops or restores itself.
- `testbed_factory` (function): `testbed_factory(topology=None)` builds another testbed that
  the test owns alone (for tests that power machines off or tear down); removed after it.

Every test that uses either is marked `testbed` (so `-m "not testbed"` leaves them out), and
is skipped with the reason when the host cannot run the testbed (not root, no systemd-nspawn).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from . import prereqs
from .errors import TestbedError
from .testbed import Testbed
from .topology import Topology

FIXTURES = frozenset({"testbed", "testbed_factory"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.testbed)


def _skip_unless_possible() -> None:
    reason = prereqs.skip_reason()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM unwinds like Ctrl-C, so fixtures' teardown runs (pytest itself
    does not handle SIGTERM). A SIGKILLed run is cleaned up by the next `up` instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    _skip_unless_possible()
    with sigterm_as_interrupt():
        tb = Testbed.up()
        try:
            yield tb
        finally:
            tb.down()


@pytest.fixture
def testbed_factory() -> Iterator[Callable[..., Testbed]]:
    _skip_unless_possible()
    made: list[Testbed] = []

    def make(topology: Topology | None = None, **kwargs: Any) -> Testbed:
        tb = Testbed.up(topology, **kwargs)
        made.append(tb)
        return tb

    with sigterm_as_interrupt():
        try:
            yield make
        finally:
            errors = []
            for tb in reversed(made):
                try:
                    tb.down()
                except TestbedError as exc:
                    errors.append(str(exc))
            if errors:
                pytest.fail("; ".join(errors))
