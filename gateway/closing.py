"""Ending asyncio transports the same way on every CPython from 3.11.0 on, and on uvloop.

asyncio's TLS transport (`asyncio.sslproto._SSLProtocolTransport`) breaks a reference cycle
since 3.11.1 (CPython gh-98539): a `close()` on a transport that already says it is closing -
because we closed it, the peer's close_notify came or the connection was lost - drops its TLS
layer. After that `abort()` raises AttributeError on 3.11.1-3.11.3 (made a no-op in 3.11.4,
gh-104474), and get_extra_info, pause_reading, write and the rest raise on every version.
So the data plane ends transports only through these two functions.
"""

from __future__ import annotations

import asyncio

__all__ = ["abort_transport", "close_transport"]


def close_transport(transport: asyncio.BaseTransport) -> None:
    """Close, flushing what is buffered; nothing if the transport is closing already."""
    if not transport.is_closing():
        transport.close()


def abort_transport(transport: asyncio.Transport) -> None:
    """Close now, dropping what is buffered.

    A TLS transport whose TLS layer is gone (a close() elsewhere, see the module) has nothing
    left to abort: do nothing, as CPython 3.11.4 and later do."""
    if getattr(transport, "_ssl_protocol", transport) is None:
        return
    transport.abort()
