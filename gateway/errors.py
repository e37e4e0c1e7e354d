"""Gateway errors, grouped by meaning (as httpcore does): bad input, no route, I/O trouble."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the data plane raises."""


class ProtocolError(GatewayError):
    """A peer sent bytes that do not follow the protocol."""


class ClientHelloError(ProtocolError):
    """The ClientHello parser was misused or met input it cannot accept."""


class SniError(ProtocolError, ValueError):
    """A server name is not a valid cross-cluster SNI."""


class RoutingError(GatewayError):
    """No destination can take the connection or request."""


class NoDestination(RoutingError):
    """The route has no destination matching the request (unknown pinned cluster, none at all)."""


class NoHealthyDestination(RoutingError):
    """Destinations exist but none has healthy capacity."""

    def __init__(self, message: str, cluster: str | None = None) -> None:
        super().__init__(message)
        self.cluster = cluster


class RelayError(GatewayError):
    """The byte relay between two connections failed."""


class UpstreamError(GatewayError):
    """A destination (local endpoint or remote ingress) could not be reached or broke."""

    def __init__(self, message: str, outcome: str = "connect_error") -> None:
        super().__init__(message)
        self.outcome = outcome  # a metrics Outcome value: connect_error, handshake_timeout, ...


class ConnectFailed(UpstreamError):
    """No connection (TCP refused or timed out, TLS handshake refused or timed out)."""


class StreamReset(UpstreamError):
    """A multiplexed stream was reset by the other side (or its tunnel went away)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"stream reset: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail
