"""Shared by every test folder: the booted-machine testbed's fixtures (`testbed`,
`testbed_factory`; see tests/testbed/README.md). One definition here, so tests/testbed,
tests/deploy and tests/e2e share one session testbed when they run together."""

from __future__ import annotations

import sys
from pathlib import Path

# `tests.testbed` is imported from the repository root, also when pytest is not started with
# `python3 -m pytest` from there.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ["tests.testbed.fixtures"]
