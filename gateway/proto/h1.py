"""HTTP/1.1 message framing for the egress fast path (sans-IO: bytes in, decisions out).

Only what a forwarding proxy needs: the request or status line, the header block, and where
the body ends (Content-Length, chunked, none, or until close). Bodies are never decoded or
copied here: `BodyScanner.scan` says how many bytes of a chunk still belong to the message,
and the I/O shell forwards the chunk as is. The header block is edited only to drop
hop-by-hop fields, fields named by `Connection` and (in requests) every `x-isthmus-*` field;
when nothing is dropped the original bytes are forwarded unchanged.

Two parsers: the usual heads (the request or status line and a field block that follows the
rules, with at most a plain Content-Length and Connection among the fields a proxy decides on)
are taken in one pass of a whole-head pattern, measured faster than any other way in CPython;
every other head is parsed by llhttp (Node's parser, through httptools), a maintained parser
whose strict mode refuses what the pattern does not match, and our framing rules are applied
to the fields it returns. tests/gateway/test_h1.py holds the two to each other with
hypothesis, llhttp as the oracle.

Input that could be read two ways is refused rather than guessed at (request smuggling):
bare LF or CR, obsolete line folding, whitespace before a colon, Content-Length together
with Transfer-Encoding, repeated or list-valued Content-Length, a transfer coding other than
a final `chunked`. The method may be any token (llhttp knows a fixed list; other tokens are
checked by it with the field block alone).
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

import httptools

from gateway.errors import ProtocolError

__all__ = [
    "BodyKind",
    "BodyScanner",
    "H1Error",
    "RequestHead",
    "ResponseHead",
    "parse_request_head",
    "parse_response_head",
    "upgrade_forward",
]

# Hop-by-hop fields (RFC 9110 §7.6.1) and the proxy ones. Transfer-Encoding is kept: bodies
# are forwarded with the framing they arrived with.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
        b"proxy-authorization", b"te", b"trailer", b"upgrade",
    }
)  # fmt: skip
RESERVED_PREFIX = b"x-isthmus-"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A request-target in a form llhttp also reads (RFC 9112 §3.2): origin (`/...`), asterisk, or
# absolute (`scheme://authority` then `/` or `?` or nothing; no userinfo); no spaces or
# controls anywhere. A parser behind us that read the target differently, or refused it, is
# how requests get smuggled. The authority form is CONNECT's (`_VISIBLE`), refused later.
_TARGET = re.compile(rb"(?:[/*]|[A-Za-z]+://[A-Za-z0-9.\-:\[\]]*(?=[/?]|$))[\x21-\x7e]*")
_VISIBLE = re.compile(rb"[\x21-\x7e]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls except HTAB
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_END = b"\r\n\r\n"
MAX_CHUNK_LINE = 4096
# The fields a proxy decides on (framing, connection handling, what it drops); every other
# field is forwarded untouched, so the fast path looks only for these (in a lowered copy).
_SPECIAL_NAMES = frozenset(
    {
        b"connection", b"content-length", b"transfer-encoding", b"expect", b"upgrade",
        b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
        b"te", b"trailer",
    }
)  # fmt: skip
_KEEP_ALIVE = frozenset({b"keep-alive"})  # a hop-by-hop name already
_KEEP_REQUEST = frozenset({b"transfer-encoding", b"content-length", b"host"})
_KEEP_RESPONSE = frozenset({b"transfer-encoding", b"content-length"})
_RESERVED_NAME = rb"x-isthmus-[!#$%&'*+\-.^_`|~0-9a-z]*"


def _names(names: frozenset[bytes] | set[bytes]) -> bytes:
    return b"|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


# (lower name, value without surrounding whitespace) of each special field, in a lowered block.
_SPECIAL = re.compile(
    rb"\r\n("
    + _names(_SPECIAL_NAMES)
    + rb"|"
    + _RESERVED_NAME
    + rb"):[ \t]*([^\r]*)"  # linear: the value's trailing blanks are stripped in Python
)
# The usual heads in one pass: the first line and a valid field block (groups: method, target,
# minor version, block; minor version, status, block). `_fast_request`/`_fast_response` then
# need only the special fields, and leave anything unusual to the general parser.
_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_BLOCK = rb"((?:\r\n" + _TOKEN_CHARS + rb"+:[\t\x20-\x7e\x80-\xff]*)*)"
_REQUEST_FAST = re.compile(_TOKEN_CHARS + rb"+ [/*][\x21-\x7e]* HTTP/1\.([01])" + _BLOCK)
_RESPONSE_FAST = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?" + _BLOCK)
_CONNECTION_VALUES = (b"close", b"keep-alive")
class H1Error(ProtocolError):
    """The peer's bytes are not an HTTP/1.1 message we can forward; `status` is the answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class BodyKind(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until_close"  # responses only: the body ends when the server closes


class RequestHead(NamedTuple):
    method: str
    target: bytes
    version: bytes  # b"HTTP/1.1" or b"HTTP/1.0"
    body: BodyKind
    length: int  # Content-Length, 0 unless body is LENGTH
    keep_alive: bool  # the client wants the connection kept after this exchange
    expect_continue: bool  # Expect: 100-continue (dropped from `forward`)
    upgrade: bool  # Upgrade asked (with Connection: upgrade), or CONNECT
    forward: bytes  # the head to send upstream, cleaned, ending with CRLF CRLF
    size: int  # bytes the head took in the input


class ResponseHead(NamedTuple):
    status: int
    body: BodyKind
    length: int
    keep_alive: bool  # the server keeps the connection after this response
    forward: bytes  # the head to send to the client, cleaned, ending with CRLF CRLF
    size: int

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200


def _head(buf: bytes | bytearray, max_size: int) -> tuple[bytes, int] | None:
    end = buf.find(_END, 0, max_size + 4)
    if end < 0:
        if len(buf) > max_size:
            raise H1Error(431, "header block too large")
        return None
    return bytes(buf[:end]), end + 4


_REQUEST_PARSER = httptools.HttpRequestParser
_RESPONSE_PARSER = httptools.HttpResponseParser
_PAUSED_UPGRADE = "Pause on CONNECT/Upgrade"  # llhttp's HPE_PAUSED_UPGRADE, after the head


class _FieldSink:
    """httptools callbacks: the fields of one head, (lower name, value without blanks)."""

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value.strip(b" \t")))


def _llhttp_fields(head: bytes, request: bool) -> list[tuple[bytes, bytes]]:
    """The fields of `head` (ending before its blank line) as llhttp reads them, in its strict
    mode; H1Error(400) with llhttp's reason for anything it refuses."""
    sink = _FieldSink()
    data = head + _END
    for attempt in range(2):
        parser = _REQUEST_PARSER(sink) if request else _RESPONSE_PARSER(sink)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # Upgrade or CONNECT: the head itself parsed; what follows is not ours to read
        except httptools.HttpParserInvalidMethodError as err:
            if attempt or not request:
                raise H1Error(400, f"malformed request line: {err}") from None
            # A method llhttp does not list: any token is a method (RFC 9110 9.1), so check
            # the rest of the head under a method it knows.
            sink.fields.clear()
            data = b"GET" + data[data.index(b" ") :]
            continue
        except httptools.HttpParserError as err:
            if str(err) != _PAUSED_UPGRADE:  # (a 101 response: the head parsed whole)
                raise H1Error(400, f"malformed head: {err}") from None
        return sink.fields
    raise AssertionError("unreachable")


def _connection_tokens(fields: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in fields:
        if name == b"connection":
            if b"," in value:
                tokens.update(t.strip().lower() for t in value.split(b","))
            else:
                tokens.add(value.strip().lower())
    tokens.discard(b"")
    return tokens


def _framing(fields: list[tuple[bytes, bytes]]) -> tuple[BodyKind | None, int]:
    """Content-Length / Transfer-Encoding; (None, 0) when neither is present."""
    found: bytes | None = None
    simple = True  # at most one Content-Length and no Transfer-Encoding
    for n, v in fields:
        if n == b"content-length":
            simple = simple and found is None
            found = v
        elif n == b"transfer-encoding":
            simple = False
    if simple:
        if found is None:
            return None, 0
        if found.isdigit() and len(found) <= 18:
            size = int(found)
            return (BodyKind.LENGTH, size) if size else (BodyKind.NONE, 0)
    lengths = [v for n, v in fields if n == b"content-length"]
    codings = [v for n, v in fields if n == b"transfer-encoding"]
    if codings:
        if lengths:
            raise H1Error(400, "both Content-Length and Transfer-Encoding")
        parts = [c.strip().lower() for v in codings for c in v.split(b",")]
        if parts[-1] != b"chunked" or parts.count(b"chunked") != 1:
            raise H1Error(400, "unsupported transfer coding")
        if len(parts) != 1:
            raise H1Error(501, "transfer codings other than chunked")
        return BodyKind.CHUNKED, 0
    if not lengths:
        return None, 0
    if len(lengths) != 1:  # even with equal values: llhttp refuses them, and so do we
        raise H1Error(400, "repeated Content-Length")
    (value,) = lengths
    if not value.isdigit() or len(value) > 18:
        raise H1Error(400, "bad Content-Length")
    n = int(value)
    return (BodyKind.LENGTH, n) if n else (BodyKind.NONE, 0)


def _rebuild(
    first: bytes,
    lines: list[bytes],
    fields: list[tuple[bytes, bytes]],
    drop: set[bytes],
    prefix: bytes | None,
    extra: bytes,
) -> bytes | None:
    """The head without dropped fields (None when nothing is dropped and nothing added)."""
    keep = [
        line for line, (name, _) in zip(lines, fields, strict=True)
        if not (name in drop or (prefix is not None and name.startswith(prefix)))
    ]  # fmt: skip
    if len(keep) == len(lines) and not extra:
        return None
    return b"\r\n".join([first, *keep]) + b"\r\n" + extra + b"\r\n"


class _Fields(NamedTuple):
    """A head's field block as llhttp read it."""

    decisive: list[tuple[bytes, bytes]]  # (lower name, value) of every field
    lines: list[bytes]  # every field line, one per field
    tokens: set[bytes]  # of the Connection fields, lowered


def _scan(head: bytes, first_end: int, request: bool) -> _Fields:
    """The field block after the first line, through llhttp (which names any problem)."""
    if first_end < 0:
        return _Fields(_llhttp_fields(head, request), [], set())
    lines = head[first_end + 2 :].split(b"\r\n")
    fields = _llhttp_fields(head, request)
    if len(fields) != len(lines):  # one field per line: llhttp refuses folding, so never
        raise H1Error(400, "malformed header field")
    return _Fields(fields, lines, _connection_tokens(fields))


def _dropped(tokens: set[bytes], keep: frozenset[bytes]) -> frozenset[bytes] | set[bytes]:
    """Fields not forwarded: hop-by-hop ones and those `Connection` names (RFC 9110 7.6.1),
    except `keep`."""
    if tokens <= _KEEP_ALIVE:
        return HOP_BY_HOP
    return HOP_BY_HOP | (tokens - keep)


def _forward(
    head: bytes,
    first_end: int,
    scanned: _Fields,
    drop: frozenset[bytes] | set[bytes],
    prefix: bytes | None,
    extra: bytes,
) -> bytes:
    """The head to forward: without the dropped fields, with `extra` lines, ending CRLF CRLF."""
    first = head if first_end < 0 else head[:first_end]
    rebuilt = _rebuild(first, scanned.lines, scanned.decisive, drop, prefix, extra)
    return head + _END if rebuilt is None else rebuilt


def _simple_fields(block: bytes) -> tuple[int, bytes | None, bytes] | None:
    """(Content-Length or -1, Connection value or None, the lowered block) when those are the
    only special fields, each at most once with a plain value; None sends the head to the
    general parser."""
    length = -1
    connection: bytes | None = None
    low = b""
    if block:
        low = block.lower()
        for name, value in _SPECIAL.findall(low):
            value = value.rstrip(b" \t")
            if name == b"content-length" and length < 0 and value.isdigit() and len(value) < 19:
                length = int(value)
            elif name == b"connection" and connection is None and value in _CONNECTION_VALUES:
                connection = value
            else:
                return None
        if connection == b"close" and b"\r\nclose:" in low:
            return None  # a field named by the option: the general parser drops it
    return length, connection, low


def _without_connection(block: bytes, low: bytes) -> bytes:
    """`block` without its one Connection line (the only field a simple head drops)."""
    start = low.find(b"\r\nconnection:")
    end = low.find(b"\r\n", start + 2)
    return block[:start] + block[end:] if end >= 0 else block[:start]


def _fast_request(head: bytes, size: int) -> RequestHead | None:
    m = _REQUEST_FAST.fullmatch(head)
    if m is None:
        return None
    block = m.group(2)
    simple = _simple_fields(block)
    if simple is None:
        return None
    length, connection, low = simple
    method, target, _ = head.split(b" ", 2)
    if method == b"CONNECT":
        return None
    if m.group(1) == b"1":
        version, keep_alive = b"HTTP/1.1", connection != b"close"
    else:
        version, keep_alive = b"HTTP/1.0", connection == b"keep-alive"
    if connection is None:
        forward = head + _END
    else:
        forward = head[: m.start(2)] + _without_connection(block, low) + _END
    kind = BodyKind.LENGTH if length > 0 else BodyKind.NONE
    return RequestHead(
        method.decode("ascii"), target, version, kind, max(length, 0), keep_alive, False, False,
        forward, size,
    )  # fmt: skip


def _fast_response(head: bytes, size: int, request_method: str) -> ResponseHead | None:
    m = _RESPONSE_FAST.fullmatch(head)
    if m is None:
        return None
    block = m.group(3)
    simple = _simple_fields(block)
    if simple is None:
        return None
    length, connection, low = simple
    status = int(m.group(2))
    if m.group(1) == b"1":
        keep_alive = connection != b"close"
    else:
        keep_alive = connection == b"keep-alive"
    if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        kind, length = BodyKind.NONE, 0
    elif length < 0:
        return None  # the body ends with the connection: the general parser adds the field
    else:
        kind = BodyKind.LENGTH if length else BodyKind.NONE
    if connection is None:
        forward = head + _END
    else:
        forward = head[: m.start(3)] + _without_connection(block, low) + _END
    return ResponseHead(status, kind, length, keep_alive, forward, size)


def parse_request_head(buf: bytes | bytearray, max_size: int = 8190) -> RequestHead | None:
    """The request head at the start of `buf`, or None while it is incomplete."""
    found = _head(buf, max_size)
    if found is None:
        return None
    head, size = found
    fast = _fast_request(head, size)
    if fast is not None:
        return fast
    first_end = head.find(b"\r\n")
    first = head if first_end < 0 else head[:first_end]
    parts = first.split(b" ")
    if len(parts) != 3:
        raise H1Error(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or not (
        _VISIBLE if method == b"CONNECT" else _TARGET
    ).fullmatch(target):
        raise H1Error(400, "malformed request line")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/") and len(version) == 8:
            raise H1Error(505, "HTTP version not supported")
        raise H1Error(400, "malformed request line")
    scanned = _scan(head, first_end, True)
    fields = scanned.decisive
    tokens = scanned.tokens
    kind, length = _framing(fields)
    if kind is None:
        kind = BodyKind.NONE
    if version == b"HTTP/1.1":
        keep_alive = b"close" not in tokens
    else:
        keep_alive = b"keep-alive" in tokens
    expect = bool(fields) and any(
        n == b"expect" and v.lower() == b"100-continue" for n, v in fields
    )
    upgrade = method == b"CONNECT" or (
        b"upgrade" in tokens and any(n == b"upgrade" for n, _ in fields)
    )
    drop = _dropped(tokens, _KEEP_REQUEST)
    if expect:
        drop = drop | {b"expect"}  # the proxy answers 100 Continue itself and sends the body
    return RequestHead(
        method.decode("ascii"), target, version, kind, length, keep_alive, expect, upgrade,
        _forward(head, first_end, scanned, drop, RESERVED_PREFIX, b""), size,
    )  # fmt: skip


def parse_response_head(
    buf: bytes | bytearray, request_method: str, max_size: int = 65536
) -> ResponseHead | None:
    """The response head at the start of `buf`, or None while it is incomplete.

    The forwarded head gets `Connection: close` when the body ends with the connection."""
    found = _head(buf, max_size)
    if found is None:
        return None
    head, size = found
    fast = _fast_response(head, size, request_method)
    if fast is not None:
        return fast
    first_end = head.find(b"\r\n")
    first = head if first_end < 0 else head[:first_end]
    version, _, rest = first.partition(b" ")
    code = rest[:3]
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(code) != 3
        or not code.isdigit()
        or rest[3:4] not in (b"", b" ")
    ):
        raise H1Error(502, "malformed status line")
    if _BAD_VALUE.search(rest):
        raise H1Error(502, "control character in the status line")
    status = int(code)
    try:
        scanned = _scan(head, first_end, False)
        tokens = scanned.tokens
        kind, length = _framing(scanned.decisive)
    except H1Error as err:
        raise H1Error(502, f"bad response: {err}") from err
    keep_alive = (b"close" not in tokens) if version == b"HTTP/1.1" else (b"keep-alive" in tokens)
    if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        kind, length = BodyKind.NONE, 0
    elif kind is None:
        kind, keep_alive = BodyKind.UNTIL_CLOSE, False
    extra = b"Connection: close\r\n" if kind is BodyKind.UNTIL_CLOSE else b""
    drop = _dropped(tokens, _KEEP_RESPONSE)
    forward = _forward(head, first_end, scanned, drop, None, extra)
    return ResponseHead(status, kind, length, keep_alive, forward, size)


class BodyScanner:
    """Finds where a body ends in the chunks that follow its head, without copying them.

    `scan(data, start)` returns how many bytes of `data[start:]` belong to the body; `done` is
    set once the body is complete (any bytes after it belong to the next message)."""

    __slots__ = ("_line", "_remaining", "_state", "done", "kind")

    # Chunked states: size line, chunk data, CRLF after the data, trailer lines.
    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, kind: BodyKind, length: int = 0) -> None:
        self.kind = kind
        self._remaining = length
        self._state = self._SIZE
        self._line = b""  # a partial size or trailer line
        self.done = kind is BodyKind.NONE or (kind is BodyKind.LENGTH and length == 0)

    def scan(self, data: bytes | bytearray | memoryview, start: int = 0) -> int:
        available = len(data) - start
        if self.done or available <= 0:
            return 0
        if self.kind is BodyKind.LENGTH:
            n = min(available, self._remaining)
            self._remaining -= n
            self.done = self._remaining == 0
            return n
        if self.kind is BodyKind.UNTIL_CLOSE:
            return available
        return self._chunked(data if isinstance(data, bytes) else bytes(data), start)

    def _chunked(self, data: bytes, start: int) -> int:
        i, end = start, len(data)
        while i < end and not self.done:
            if self._state == self._DATA:
                n = min(end - i, self._remaining)
                i += n
                self._remaining -= n
                if not self._remaining:
                    self._state = self._DATA_END
                continue
            nl = data.find(b"\n", i)
            if nl < 0:
                self._line += data[i:end]
                i = end
                if len(self._line) > MAX_CHUNK_LINE:
                    raise H1Error(400, "chunk line too long")
                break
            line = self._line + data[i : nl + 1]
            self._line = b""
            i = nl + 1
            if len(line) > MAX_CHUNK_LINE:
                raise H1Error(400, "chunk line too long")
            if not line.endswith(b"\r\n"):
                raise H1Error(400, "bare LF in chunked framing")
            line = line[:-2]
            if self._state == self._SIZE:
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise H1Error(400, "bad chunk size")
                self._remaining = int(size, 16)
                self._state = self._DATA if self._remaining else self._TRAILER
            elif self._state == self._DATA_END:
                if line:
                    raise H1Error(400, "chunk data longer than its size")
                self._state = self._SIZE
            elif not line:  # the empty line after the trailers ends the body
                self.done = True
        return i - start


_UPGRADE_LINE = re.compile(rb"\r\nupgrade:[ \t]*([^\r]*)", re.IGNORECASE)


def upgrade_forward(raw_head: bytes | bytearray, forward: bytes) -> bytes:
    """`forward` (a request head cleaned of hop-by-hop fields) with the upgrade asked for in
    `raw_head` put back: `Connection: upgrade` and its `Upgrade` values. A proxy that relays
    the upgraded connection must forward both (RFC 9110 7.8)."""
    values = [v.rstrip(b" \t") for v in _UPGRADE_LINE.findall(bytes(raw_head))]
    return forward[:-2] + b"Connection: upgrade\r\nUpgrade: " + b", ".join(values) + b"\r\n\r\n"
