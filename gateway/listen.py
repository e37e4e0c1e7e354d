"""Non-blocking listening TCP sockets, made the same way by every listener of the appliance."""

from __future__ import annotations

import contextlib
import socket

_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux: bind before the address exists


def listening_socket(
    host: str, port: int, backlog: int, *, reuse_port: bool = False, free_bind: bool = False
) -> socket.socket:
    """Bound, listening and non-blocking; closed again if any step fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if free_bind:
            with contextlib.suppress(OSError):
                level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.IPPROTO_IP
                sock.setsockopt(level, _IP_FREEBIND, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
