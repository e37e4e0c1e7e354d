"""Discovery errors, grouped by meaning; the API translates them to HTTP statuses."""

from __future__ import annotations


class DiscoveryError(Exception):
    """Base of every error the catalog raises."""


class InvalidInput(DiscoveryError):
    """The caller sent something the catalog cannot store."""

    def __init__(
        self,
        message: str,
        field: str | None = None,
        problems: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        # Every (path, message) found, so a caller can fix all of them in one go.
        self.problems = problems or ([(field or "", message)])


class NotFound(DiscoveryError):
    pass


class Conflict(DiscoveryError):
    pass


class LimitExceeded(Conflict):
    """A valid write that would take the appliance past a configured limit (409)."""


class StoreError(DiscoveryError):
    """The backing store failed (disk full, corrupt file, Consul unreachable)."""


class VipExhausted(StoreError):
    pass
