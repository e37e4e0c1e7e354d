"""Limits a catalog enforces on writes, before anything is stored.

`WriteLimits` holds what the catalog itself checks (the health-check floor). An `Admission`
is a check from a higher layer that the catalog calls too (the egress listener budget): it
raises to refuse, or returns a release to call once the write is settled either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from discovery.durations import format_limit
from discovery.errors import InvalidInput
from discovery.model import CheckKind, Workload

# Probing a workload more often than once a second is a probe flood, not a health check.
DEFAULT_MIN_CHECK_INTERVAL = 1.0

Release = Callable[[], None]
Admission = Callable[[Workload, Workload | None], Release]


@dataclass(frozen=True, slots=True)
class WriteLimits:
    min_check_interval: float = DEFAULT_MIN_CHECK_INTERVAL

    def check(self, workload: Workload) -> None:
        """Raises InvalidInput naming the field when the workload is past a limit."""
        c = workload.check
        if c is None:
            return
        floor = self.min_check_interval
        field, value = ("check.ttl", c.ttl) if c.kind is CheckKind.TTL else (
            "check.interval", c.interval)
        if value < floor:
            raise InvalidInput(
                f"{field}: {format_limit(value)} is below discovery.min_check_interval "
                f"({format_limit(floor)}): expected at least {format_limit(floor)}",
                field=field,
            )
