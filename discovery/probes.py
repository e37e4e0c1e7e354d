"""Active health probes: one HTTP GET or one TCP connect, bounded by a timeout.

A plain asyncio client rather than aiohttp: a probe is one request on a fresh connection, and
at 10,000 probes a second the per-request cost of a full client session shows.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from discovery.addresses import split_host_port

_TLS: ssl.SSLContext | None = None
MAX_STATUS_LINE = 4096


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    output: str


def _tls() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS


def _reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


async def probe_tcp(target: str, timeout: float) -> ProbeResult:
    host, port = split_host_port(target)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return ProbeResult(False, f"TCP connect to {target}: timed out after {timeout:g}s")
    except OSError as e:
        return ProbeResult(False, f"TCP connect to {target}: {_reason(e)}")
    writer.close()
    return ProbeResult(True, f"TCP connect to {target}: ok")


async def probe_http(url: str, timeout: float) -> ProbeResult:
    """GET the URL; 2xx and 3xx pass (redirects are not followed)."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: isthmus-health/1\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1", "replace")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=_tls() if tls else None, server_hostname=host if tls else None
            )
            writer.write(request)
            line = await reader.readuntil(b"\n")
    except TimeoutError:
        return ProbeResult(False, f"GET {url}: timed out after {timeout:g}s")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return ProbeResult(False, f"GET {url}: no valid HTTP response")
    except ssl.SSLError as e:
        return ProbeResult(False, f"GET {url}: TLS error: {e.reason or e}")
    except OSError as e:
        return ProbeResult(False, f"GET {url}: {_reason(e)}")
    finally:
        if writer is not None:
            writer.close()
    fields = line[:MAX_STATUS_LINE].split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return ProbeResult(False, f"GET {url}: not an HTTP response")
    status = int(fields[1])
    return ProbeResult(200 <= status < 400, f"GET {url}: HTTP {status}")
