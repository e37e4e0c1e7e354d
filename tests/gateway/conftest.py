"""Shared helpers for the gateway tests live in gw_topology.py next to this file."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the tests import gw_topology from here
