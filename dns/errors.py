"""Resolver errors, grouped by meaning; the server translates them to rcodes at the edge."""

from __future__ import annotations


class DnsError(Exception):
    """Base of every error the resolver raises."""


class CorefileError(DnsError):
    """The Corefile cannot be used; names where (file, line, column) and what was expected."""

    def __init__(self, message: str, line: int = 0, column: int = 0, source: str = "Corefile"):
        self.message = message
        self.line = line
        self.column = column
        self.source = source
        where = f"{source}:{line}:{column}: " if line else f"{source}: "
        super().__init__(where + message)


class WireError(DnsError):
    """A message on the wire is malformed; `rcode` is what to answer (None: drop it)."""

    def __init__(self, message: str, rcode: int | None = None) -> None:
        super().__init__(message)
        self.rcode = rcode


class UpstreamError(DnsError):
    """A forwarding upstream failed to give a usable answer."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamProtocolError(UpstreamError):
    """The upstream answered something that is not a usable reply (garbage, endless TC)."""


class LimitExceeded(DnsError):
    """A concurrency cap was hit; the query is refused rather than queued."""
