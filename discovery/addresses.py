"""`HOST:PORT` strings, parsed one way for the whole appliance.

Listen addresses, peers' gateway addresses, control nodes, health-check targets and Corefile
listen arguments are all `host:port`, `[v6]:port` or (where a default port applies) a bare
host. Every layer parses them here, so the same string means the same thing everywhere; each
caller words the error for its own key or token from `AddressError.reason`.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

__all__ = ["AddressError", "join_host_port", "source_of", "split_host_port"]

MAX_PORT = 65535


class AddressError(ValueError):
    """Not a `HOST:PORT`; `reason` says which part: `form` (no port) or `port` (not a number
    in range)."""

    def __init__(self, message: str, reason: Literal["form", "port"]) -> None:
        super().__init__(message)
        self.reason = reason


def split_host_port(
    value: str, *, default_port: int | None = None, min_port: int = 0
) -> tuple[str, int]:
    """`"host:port"` or `"[v6]:port"` -> `(host, port)`, brackets removed.

    Without a colon the value is a bare host when `default_port` is given, else an error. The
    port must be ASCII digits (`str.isdigit` alone also takes '²' and '٣') from `min_port` to
    65535. The host is returned as written (it may be empty: `":53"`)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or (host.startswith("[") and port_text.endswith("]")):
        if default_port is None:
            raise AddressError(f"{value!r} is not HOST:PORT", "form")
        host, port_text = value, str(default_port)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise AddressError(f"expected a port from {min_port} to {MAX_PORT}, got {port_text!r}",
                           "port")  # fmt: skip
    port = int(port_text)
    if not min_port <= port <= MAX_PORT:
        raise AddressError(f"expected a port from {min_port} to {MAX_PORT}, got {port_text!r}",
                           "port")  # fmt: skip
    return host, port


def join_host_port(host: str, port: int) -> str:
    """The inverse: IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def source_of(host: str) -> str:
    """The source a per-source limit counts (the gateway's admission, the resolver's TCP
    listener): an IPv4 address (also when IPv4-mapped), or the /64 of an IPv6 address, since
    one host commonly owns a whole /64."""
    if ":" not in host:
        return host  # IPv4: the common case costs no parsing
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))
