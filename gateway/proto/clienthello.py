"""A sans-IO TLS ClientHello parser: feed bytes as they arrive, learn where to route.

The ingress reads the ClientHello before the TLS handshake (RFC 8446 §4.1.2, RFC 6066 §3,
RFC 7301) so that it can route by SNI and refuse unknown names without spending a handshake.
`ClientHelloParser.feed` returns `NEED_MORE`, a `ClientHello`, or a `Rejected` with a reason
fit for a metric label. Work and memory are bounded: records are at most 2^14 bytes, the
handshake message at most `max_size`, and at most `max_records` records are accepted; every
input byte is looked at a constant number of times however the input is split.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from gateway.errors import ClientHelloError

__all__ = [
    "MAX_CLIENT_HELLO",
    "NEED_MORE",
    "ClientHello",
    "ClientHelloParser",
    "NeedMore",
    "RejectReason",
    "Rejected",
    "Result",
    "parse_client_hello",
]

MAX_CLIENT_HELLO = 16 * 1024
MAX_RECORD = 1 << 14  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14
MAX_RECORDS = 16  # a real ClientHello fits in one or two records; more is an attack
MAX_HOST_NAME = 253

_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_NAME_TYPE_HOST = 0
# Letters that start an HTTP/1 request line (CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST,
# PUT, TRACE) or the HTTP/2 preface (PRI): plaintext HTTP sent to the TLS port.
_HTTP_FIRST = frozenset(b"CDGHOPT")
_HOST_LABEL = re.compile(rb"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # fullmatch: "$" allows b"\n"


class RejectReason(enum.StrEnum):
    """Why a ClientHello was refused; the values are metric labels."""

    PLAINTEXT = "plaintext"
    NOT_TLS = "not_tls"
    NOT_CLIENT_HELLO = "not_client_hello"
    RECORD_TOO_LARGE = "record_too_large"
    TOO_LARGE = "client_hello_too_large"
    MALFORMED = "malformed"
    NO_SNI = "no_sni"
    BAD_SNI = "bad_sni"
    MULTIPLE_SNI = "multiple_sni"
    # Decided by the I/O shell that feeds the parser, not by the parser itself:
    CLOSED = "closed"  # the peer closed or broke before a whole ClientHello
    TIMEOUT = "client_hello_timeout"
    TRICKLE = "slow_client_hello"  # too many partial reads


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Feed more bytes."""


NEED_MORE = NeedMore()


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str  # lower-cased, no trailing dot
    alpn: tuple[bytes, ...]  # protocol ids in the client's order
    supported_versions: tuple[int, ...]  # from the extension, GREASE values included
    legacy_version: int
    length: int  # bytes of input the records carrying the ClientHello took

    @property
    def offers_tls13(self) -> bool:
        return 0x0304 in self.supported_versions


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: RejectReason
    detail: str


Result = NeedMore | ClientHello | Rejected


class _Reject(ClientHelloError):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ClientHelloParser:
    """Incremental parser; one instance per connection."""

    def __init__(self, max_size: int = MAX_CLIENT_HELLO, max_records: int = MAX_RECORDS) -> None:
        if max_size < 64 or max_records < 1:
            raise ClientHelloError("max_size must be >= 64 and max_records >= 1")
        self._max_size = max_size
        self._max_records = max_records
        self._raw = bytearray()  # bytes of the current, incomplete record
        self._handshake = bytearray()  # reassembled handshake fragments
        self._consumed = 0  # input bytes of completed records
        self._records = 0
        self._result: ClientHello | Rejected | None = None

    @property
    def result(self) -> ClientHello | Rejected | None:
        return self._result

    def feed(self, data: bytes | bytearray | memoryview) -> Result:
        """Take the next bytes from the wire; raises ClientHelloError only if already done."""
        if self._result is not None:
            raise ClientHelloError("the ClientHello parser already returned a final result")
        try:
            outcome = self._feed(data)
        except _Reject as r:
            outcome = Rejected(r.reason, str(r))
        if outcome is not NEED_MORE:
            self._result = outcome  # type: ignore[assignment]
            # Fresh buffers rather than clear(): a traceback may still hold views of the old.
            self._raw = bytearray()
            self._handshake = bytearray()
        return outcome

    def _feed(self, data: bytes | bytearray | memoryview) -> Result:
        raw = self._raw
        pos = 0
        view = memoryview(data)
        while pos < len(view):
            if len(raw) < 5:
                take = min(5 - len(raw), len(view) - pos)
                raw += view[pos : pos + take]
                pos += take
                self._check_header(raw)
                if len(raw) < 5:
                    break
            length = int.from_bytes(raw[3:5], "big")
            take = min(5 + length - len(raw), len(view) - pos)
            raw += view[pos : pos + take]
            pos += take
            if len(raw) < 5 + length:
                break
            done = self._record_complete(raw)
            raw.clear()
            if done is not None:
                return done  # bytes after the ClientHello (early data) are left to TLS
        return NEED_MORE

    def _check_header(self, raw: bytearray) -> None:
        first = raw[0]
        if first != _CONTENT_HANDSHAKE:
            if self._records == 0 and not self._handshake:
                if first in _HTTP_FIRST:
                    raise _Reject(RejectReason.PLAINTEXT, "plaintext (HTTP?) on the TLS port")
                if first & 0x80:
                    raise _Reject(RejectReason.NOT_TLS, "SSLv2-style or binary garbage")
                raise _Reject(RejectReason.NOT_TLS, f"record content type {first}, not TLS")
            raise _Reject(
                RejectReason.MALFORMED, f"record of content type {first} inside the ClientHello"
            )
        if len(raw) >= 2 and raw[1] != 3:
            raise _Reject(RejectReason.NOT_TLS, f"record version major {raw[1]} is not 3")
        if len(raw) >= 5:
            length = int.from_bytes(raw[3:5], "big")
            if length > MAX_RECORD:
                raise _Reject(RejectReason.RECORD_TOO_LARGE, f"record of {length} bytes > 2^14")
            if length == 0:
                raise _Reject(RejectReason.MALFORMED, "zero-length handshake record")

    def _record_complete(self, raw: bytearray) -> Result | None:
        self._records += 1
        self._consumed += len(raw)
        hs = self._handshake
        hs += memoryview(raw)[5:]
        if len(hs) >= 1 and hs[0] != _HANDSHAKE_CLIENT_HELLO:
            raise _Reject(RejectReason.NOT_CLIENT_HELLO, f"handshake type {hs[0]}, not ClientHello")
        if len(hs) >= 4:
            body_len = int.from_bytes(hs[1:4], "big")
            if 4 + body_len > self._max_size:
                raise _Reject(
                    RejectReason.TOO_LARGE,
                    f"ClientHello of {4 + body_len} bytes > {self._max_size}",
                )
            if len(hs) > 4 + body_len:
                raise _Reject(RejectReason.MALFORMED, "data after the ClientHello in its record")
            if len(hs) == 4 + body_len:
                return _parse_body(memoryview(hs)[4:], self._consumed)
        if self._records >= self._max_records:
            raise _Reject(RejectReason.TOO_LARGE, f"ClientHello split over > {self._max_records}")
        return None


def parse_client_hello(data: bytes, max_size: int = MAX_CLIENT_HELLO) -> Result:
    """Parse a whole buffer at once (e.g. bytes peeked from a socket)."""
    return ClientHelloParser(max_size).feed(data)


class _Reader:
    """Bounds-checked reads over a memoryview; running past the end is a malformed message."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: memoryview) -> None:
        self._buf = buf
        self._pos = 0

    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self._buf) - self._pos:
            raise _Reject(RejectReason.MALFORMED, f"truncated {what}")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, len_bytes: int, what: str) -> memoryview:
        return self.take(self.uint(len_bytes, what), what)


def _parse_body(body: memoryview, consumed: int) -> ClientHello | Rejected:
    r = _Reader(body)
    legacy_version = r.uint(2, "legacy_version")
    if legacy_version >> 8 != 3:
        raise _Reject(RejectReason.NOT_TLS, f"ClientHello version {legacy_version:#06x}")
    r.take(32, "random")
    if len(r.vector(1, "session_id")) > 32:
        raise _Reject(RejectReason.MALFORMED, "session_id longer than 32 bytes")
    suites = r.vector(2, "cipher_suites")
    if len(suites) < 2 or len(suites) % 2:
        raise _Reject(RejectReason.MALFORMED, "cipher_suites length is not a positive even number")
    if len(r.vector(1, "compression_methods")) < 1:
        raise _Reject(RejectReason.MALFORMED, "no compression methods")
    if r.remaining() == 0:
        raise _Reject(RejectReason.NO_SNI, "ClientHello without extensions (no SNI)")
    extensions = _Reader(r.vector(2, "extensions"))
    if r.remaining():
        raise _Reject(RejectReason.MALFORMED, "bytes after the extensions")
    seen: set[int] = set()
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = ()
    while extensions.remaining():
        ext_type = extensions.uint(2, "extension type")
        data = extensions.vector(2, "extension data")
        if ext_type in seen:
            raise _Reject(RejectReason.MALFORMED, f"extension {ext_type} appears twice")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(data)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(data)
        elif ext_type == _EXT_SUPPORTED_VERSIONS:
            versions = _parse_versions(data)
    if server_name is None:
        raise _Reject(RejectReason.NO_SNI, "ClientHello without a server_name extension")
    return ClientHello(server_name, alpn, versions, legacy_version, consumed)


def _parse_server_name(data: memoryview) -> str:
    outer = _Reader(data)
    names = _Reader(outer.vector(2, "server_name_list"))
    if outer.remaining():
        raise _Reject(RejectReason.MALFORMED, "bytes after server_name_list")
    host: str | None = None
    while names.remaining():
        name_type = names.uint(1, "name_type")
        name = names.vector(2, "server name")
        if name_type != _NAME_TYPE_HOST:
            continue  # RFC 6066: unknown name types are skipped
        if host is not None:
            raise _Reject(RejectReason.MULTIPLE_SNI, "more than one host_name in server_name")
        host = _host_name(name)
    if host is None:
        raise _Reject(RejectReason.NO_SNI, "server_name extension without a host_name")
    return host


def _host_name(name: memoryview) -> str:
    if len(name) == 0:
        raise _Reject(RejectReason.BAD_SNI, "empty host_name")
    if len(name) > MAX_HOST_NAME:
        raise _Reject(RejectReason.BAD_SNI, f"host_name of {len(name)} bytes > {MAX_HOST_NAME}")
    lowered = bytes(name).lower()
    for label in lowered.split(b"."):
        if _HOST_LABEL.fullmatch(label) is None:
            raise _Reject(
                RejectReason.BAD_SNI,
                f"host_name {bytes(name)[:64]!r} is not dot-separated DNS labels",
            )
    return lowered.decode("ascii")


def _parse_alpn(data: memoryview) -> tuple[bytes, ...]:
    outer = _Reader(data)
    protocols = _Reader(outer.vector(2, "protocol_name_list"))
    if outer.remaining():
        raise _Reject(RejectReason.MALFORMED, "bytes after protocol_name_list")
    out: list[bytes] = []
    while protocols.remaining():
        proto = protocols.vector(1, "protocol name")
        if len(proto) == 0:
            raise _Reject(RejectReason.MALFORMED, "empty ALPN protocol name")
        out.append(bytes(proto))
    if not out:
        raise _Reject(RejectReason.MALFORMED, "empty ALPN protocol list")
    return tuple(out)


def _parse_versions(data: memoryview) -> tuple[int, ...]:
    outer = _Reader(data)
    versions = outer.vector(1, "supported_versions")
    if outer.remaining() or len(versions) < 2 or len(versions) % 2:
        raise _Reject(RejectReason.MALFORMED, "bad supported_versions list")
    return tuple(int.from_bytes(versions[i : i + 2], "big") for i in range(0, len(versions), 2))
