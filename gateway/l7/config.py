"""Settings of the L7 HTTP/1.1 proxy (one per egress)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.retry import RetryPolicy

__all__ = ["HttpConfig"]


@dataclass(frozen=True, slots=True)
class HttpConfig:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    budget_percent: float = 0.2
    budget_min_per_second: float = 10.0
    budget_ttl: float = 10.0
    connect_timeout: float = 5.0
    keepalive_timeout: float = 30.0  # idle upstream connections are closed after this
    max_idle_per_key: int = 256  # idle upstream connections kept per destination
    client_keepalive_timeout: float = 75.0  # idle client connections to the VIP
    max_request_line: int = 8190
    max_field_size: int = 8190  # the request head may hold line + fields: their sum at most
    handshake_timeout: float = 10.0  # TLS to a remote ingress (multiplex: false)
    inline_body: int = 1 << 20  # response bodies (with a length) up to this are read whole:
    # a try whose body breaks can still be retried; larger ones stream to the client
    read_limit: int = 1 << 20  # client bytes buffered while a request is in flight

    def __post_init__(self) -> None:
        if min(self.connect_timeout, self.keepalive_timeout, self.client_keepalive_timeout,
               self.handshake_timeout) <= 0:  # fmt: skip
            raise ValueError("timeouts must be > 0")
        if min(self.max_request_line, self.max_field_size, self.read_limit) < 256:
            raise ValueError("max_request_line, max_field_size and read_limit must be >= 256")
