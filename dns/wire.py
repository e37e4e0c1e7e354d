"""DNS wire format, sans-IO: query parsing, error replies, truncation, record walking.

Everything here takes and returns bytes; no sockets. The query parser is deliberately
narrower than a general DNS parser: it reads exactly what the resolver needs (the header,
the single question, an OPT record) and answers FORMERR, NOTIMP or BADVERS for the rest, so
the hot path never builds a full message object.
"""

from __future__ import annotations

import struct

from dns.errors import WireError

HEADER_LEN = 12
MAX_NAME_LEN = 255
MAX_LABEL_LEN = 63
PLAIN_UDP_SIZE = 512
# What we advertise and the most we send over UDP, even to clients asking for more
# (the DNS Flag Day 2020 figure avoids IP fragmentation).
SERVER_UDP_SIZE = 1232
MAX_UDP_SIZE = 4096
MAX_TCP_SIZE = 65535

# Header flag bits (second 16-bit word).
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16

RCODE_NAMES = {
    NOERROR: "NOERROR",
    FORMERR: "FORMERR",
    SERVFAIL: "SERVFAIL",
    NXDOMAIN: "NXDOMAIN",
    NOTIMP: "NOTIMP",
    REFUSED: "REFUSED",
    BADVERS: "BADVERS",
}

A = 1
NS = 2
CNAME = 5
SOA = 6
PTR = 12
AAAA = 28
SRV = 33
OPT = 41
IXFR = 251
AXFR = 252
ANY = 255
CLASS_IN = 1
CLASS_CH = 3
CLASS_ANY = 255

TYPE_NAMES = {
    A: "A",
    NS: "NS",
    CNAME: "CNAME",
    SOA: "SOA",
    PTR: "PTR",
    15: "MX",
    16: "TXT",
    AAAA: "AAAA",
    SRV: "SRV",
    OPT: "OPT",
    43: "DS",
    46: "RRSIG",
    48: "DNSKEY",
    64: "SVCB",
    65: "HTTPS",
    IXFR: "IXFR",
    AXFR: "AXFR",
    ANY: "ANY",
}
CLASS_NAMES = {CLASS_IN: "IN", CLASS_CH: "CH", 4: "HS", 254: "NONE", CLASS_ANY: "ANY"}

_HDR = struct.Struct(">HHHHHH")
_U16 = struct.Struct(">H")
_RR_FIXED = struct.Struct(">HHIH")  # type, class, ttl, rdlength


def type_name(qtype: int) -> str:
    return TYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def class_name(qclass: int) -> str:
    return CLASS_NAMES.get(qclass) or f"CLASS{qclass}"


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode) or f"RCODE{rcode}"


def opt_record(udp_size: int, do: bool, ext_rcode: int = 0) -> bytes:
    """An OPT pseudo-record for a reply: our buffer size, version 0, the DO bit echoed."""
    return b"\x00\x00\x29" + struct.pack(">HBBHH", udp_size, ext_rcode, 0, 0x8000 if do else 0, 0)


OPT_PLAIN = opt_record(SERVER_UDP_SIZE, False)
OPT_DO = opt_record(SERVER_UDP_SIZE, True)


class QueryError(WireError):
    """A query that cannot be served; `reply` is the wire answer to send (None: drop)."""

    def __init__(self, message: str, reply: bytes | None) -> None:
        super().__init__(message, None if reply is None else reply[3] & 0x0F)
        self.reply = reply


class Request:
    """One parsed query. Mutable only while the server sets up its context (zone, hooks)."""

    __slots__ = (
        "client",
        "do",
        "edns",
        "key",
        "labels",
        "local",
        "max_size",
        "opt",
        "proto",
        "qclass",
        "qend",
        "qlower",
        "qtype",
        "question",
        "rd",
        "report_error",
        "server",
        "udp_size",
        "wire",
        "zone",
    )

    def __init__(
        self,
        wire: bytes,
        qend: int,
        labels: tuple[int, ...],
        qtype: int,
        qclass: int,
        edns: bool,
        udp_size: int,
        do: bool,
        proto: str,
        client: tuple[str, int] | None = None,
    ) -> None:
        self.wire = wire
        self.qend = qend
        self.labels = labels  # offset of each label of the qname, relative to the name start
        self.qtype = qtype
        self.qclass = qclass
        self.question = wire[HEADER_LEN:qend]  # name (client's case), type and class
        self.qlower = wire[HEADER_LEN : qend - 4].lower()  # DNS case folding is ASCII-only
        self.key = self.qlower + wire[qend - 4 : qend] + (b"\x01" if do else b"\x00")
        self.rd = wire[2] & 0x01
        self.edns = edns
        self.udp_size = udp_size
        self.do = do
        self.opt = (OPT_DO if do else OPT_PLAIN) if edns else b""
        self.proto = proto
        self.client = client
        if proto == "tcp":
            self.max_size = MAX_TCP_SIZE
        elif edns:
            self.max_size = min(max(udp_size, PLAIN_UDP_SIZE), MAX_UDP_SIZE)
        else:
            self.max_size = PLAIN_UDP_SIZE
        self.zone = b"\x00"
        self.server = ""
        self.report_error = None
        # Set by plugins answering from their own data (global, hosts): the cache skips
        # those replies, already pre-encoded and which must change as soon as the data does.
        self.local = False

    @property
    def id(self) -> int:
        return _U16.unpack_from(self.wire, 0)[0]

    @property
    def name(self) -> str:
        """The query name as presentation text, in the client's case, ending with a dot."""
        return name_to_text(self.wire, HEADER_LEN)

    def with_name(self, new_name: bytes) -> Request:
        """A copy of this query asking for `new_name` (wire form) instead; used by rewrite."""
        wire = self.wire[:HEADER_LEN] + new_name + self.wire[self.qend - 4 :]
        delta = len(new_name) - (self.qend - 4 - HEADER_LEN)
        req = Request(
            wire,
            self.qend + delta,
            label_offsets(new_name),
            self.qtype,
            self.qclass,
            self.edns,
            self.udp_size,
            self.do,
            self.proto,
            self.client,
        )
        req.zone = self.zone
        req.server = self.server
        req.report_error = self.report_error
        req.max_size = self.max_size
        return req


def label_offsets(name: bytes) -> tuple[int, ...]:
    out: list[int] = []
    pos = 0
    while name[pos]:
        out.append(pos)
        pos += name[pos] + 1
    return tuple(out)


def _reply_header(data: bytes, rcode: int, qdcount: int, arcount: int) -> bytes:
    # Keep the opcode and RD of the query; QR set; RA because we also recurse (forward).
    flags = QR | RA | (data[2] & 0x79) << 8 | (rcode & 0x0F)
    return data[:2] + _HDR.pack(0, flags, qdcount, 0, 0, arcount)[2:]


def error_reply(
    data: bytes, rcode: int, qend: int | None = None, edns: bool = False, do: bool = False
) -> bytes:
    """A reply carrying only `rcode`, the question when it parsed, and OPT when EDNS was used."""
    question = data[HEADER_LEN:qend] if qend else b""
    opt = opt_record(SERVER_UDP_SIZE, do, rcode >> 4) if edns else b""
    return _reply_header(data, rcode, 1 if qend else 0, 1 if edns else 0) + question + opt


def skip_name(data: bytes, pos: int) -> int:
    """Offset just past the (possibly compressed) name at `pos`; never follows pointers."""
    n = len(data)
    length = 0
    while True:
        if pos >= n:
            raise WireError("name runs past the end of the message")
        b = data[pos]
        if b == 0:
            return pos + 1
        if b & 0xC0 == 0xC0:
            if pos + 2 > n:
                raise WireError("truncated compression pointer")
            return pos + 2
        if b & 0xC0:
            raise WireError("unsupported label type")
        length += b + 1
        if length > MAX_NAME_LEN:
            raise WireError("name longer than 255 octets")
        pos += b + 1


def parse_query(data: bytes, proto: str = "udp", client: tuple[str, int] | None = None) -> Request:
    """Parse a query; raises QueryError carrying the reply (or None to drop)."""
    n = len(data)
    if n < HEADER_LEN:
        raise QueryError("shorter than a header", None)
    if data[2] & 0x80:
        raise QueryError("a response, not a query", None)  # never answer answers: no loops
    qdcount, ancount, nscount, arcount = struct.unpack_from(">HHHH", data, 4)
    if qdcount != 1:
        raise QueryError(f"{qdcount} questions", error_reply(data, FORMERR))
    pos = HEADER_LEN
    labels: list[int] = []
    while True:
        if pos >= n:
            raise QueryError("question name truncated", error_reply(data, FORMERR))
        b = data[pos]
        if b == 0:
            pos += 1
            break
        if b & 0xC0:
            raise QueryError("compressed or extended label in question", error_reply(data, FORMERR))
        labels.append(pos - HEADER_LEN)
        pos += b + 1
        if pos - HEADER_LEN >= MAX_NAME_LEN:
            raise QueryError("question name longer than 255 octets", error_reply(data, FORMERR))
    qend = pos + 4
    if qend > n:
        raise QueryError("question type/class truncated", error_reply(data, FORMERR))
    qtype, qclass = struct.unpack_from(">HH", data, pos)
    opcode = (data[2] >> 3) & 0x0F
    if opcode != 0:
        raise QueryError(f"opcode {opcode}", error_reply(data, NOTIMP, qend))
    if ancount or nscount:
        raise QueryError("records in answer/authority of a query", error_reply(data, FORMERR, qend))
    edns = False
    udp_size = 0
    do = False
    pos = qend
    for _ in range(arcount):
        try:
            name_end = skip_name(data, pos)
        except WireError as e:
            raise QueryError(str(e), error_reply(data, FORMERR, qend)) from None
        if name_end + 10 > n:
            raise QueryError("additional record truncated", error_reply(data, FORMERR, qend))
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, name_end)
        end = name_end + 10 + rdlen
        if end > n:
            raise QueryError("additional rdata truncated", error_reply(data, FORMERR, qend))
        if rtype == OPT:
            if edns or name_end != pos + 1:
                raise QueryError("second OPT or OPT not at root", error_reply(data, FORMERR, qend))
            edns = True
            udp_size = rclass
            do = bool(ttl & 0x8000)
            if (ttl >> 16) & 0xFF:
                raise QueryError(
                    "unsupported EDNS version", error_reply(data, BADVERS, qend, True, do)
                )
        pos = end
    return Request(data, qend, tuple(labels), qtype, qclass, edns, udp_size, do, proto, client)


def reply_rcode(reply: bytes) -> int:
    return reply[3] & 0x0F if len(reply) >= 4 else SERVFAIL


def truncate(reply: bytes, req: Request) -> bytes:
    """The reply cut down to header + question (+ OPT) with TC set, so the client uses TCP."""
    flags = _U16.unpack_from(reply, 2)[0] | TC
    head = reply[:2] + _HDR.pack(0, flags, 1, 0, 0, 1 if req.edns else 0)[2:]
    return head + req.question + req.opt


def with_id(reply: bytes, msg_id: bytes) -> bytes:
    return msg_id + reply[2:]


class RecordSpan:
    """Where one resource record sits in a message."""

    __slots__ = ("end", "rclass", "rdata", "rdlen", "rtype", "start", "ttl", "ttl_pos")

    def __init__(
        self, start: int, rtype: int, rclass: int, ttl: int, ttl_pos: int, rdata: int, rdlen: int
    ) -> None:
        self.start = start
        self.rtype = rtype
        self.rclass = rclass
        self.ttl = ttl
        self.ttl_pos = ttl_pos
        self.rdata = rdata
        self.rdlen = rdlen
        self.end = rdata + rdlen


class MessageShape:
    """The layout of a reply: header fields, question end, and every record's span."""

    __slots__ = ("additional", "answer", "authority", "flags", "msg_id", "qend")

    def __init__(self, msg_id: int, flags: int, qend: int) -> None:
        self.msg_id = msg_id
        self.flags = flags
        self.qend = qend
        self.answer: list[RecordSpan] = []
        self.authority: list[RecordSpan] = []
        self.additional: list[RecordSpan] = []

    @property
    def rcode(self) -> int:
        return self.flags & 0x0F

    @property
    def truncated(self) -> bool:
        return bool(self.flags & TC)


def scan_message(data: bytes) -> MessageShape:
    """Walk a whole message (normally a reply) without decompressing; raises WireError."""
    n = len(data)
    if n < HEADER_LEN:
        raise WireError("shorter than a header")
    msg_id, flags, qd, an, ns, ar = _HDR.unpack_from(data, 0)
    pos = HEADER_LEN
    for _ in range(qd):
        pos = skip_name(data, pos) + 4
        if pos > n:
            raise WireError("question truncated")
    shape = MessageShape(msg_id, flags, pos)
    for section, count in ((shape.answer, an), (shape.authority, ns), (shape.additional, ar)):
        for _ in range(count):
            start = pos
            pos = skip_name(data, pos)
            if pos + 10 > n:
                raise WireError("record truncated")
            rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
            span = RecordSpan(start, rtype, rclass, ttl, pos + 4, pos + 10, rdlen)
            if span.end > n:
                raise WireError("rdata truncated")
            section.append(span)
            pos = span.end
    return shape


def question_of(data: bytes) -> bytes:
    """The lowercased question section (name, type, class) of a message; raises WireError."""
    if len(data) < HEADER_LEN or _U16.unpack_from(data, 4)[0] != 1:
        raise WireError("not exactly one question")
    end = skip_name(data, HEADER_LEN) + 4
    if end > len(data):
        raise WireError("question truncated")
    return data[HEADER_LEN:end].lower()


_ESCAPE = {ord("."): "\\.", ord("\\"): "\\\\", ord('"'): '\\"', ord("("): "\\(", ord(")"): "\\)"}


def name_to_text(data: bytes, pos: int) -> str:
    """Presentation form of the uncompressed name at `pos` (e.g. 'Reviews.default.global.')."""
    parts: list[str] = []
    while True:
        ln = data[pos]
        if ln == 0:
            break
        label = data[pos + 1 : pos + 1 + ln]
        chars = []
        for c in label:
            if c in _ESCAPE:
                chars.append(_ESCAPE[c])
            elif 0x21 <= c <= 0x7E:
                chars.append(chr(c))
            else:
                chars.append(f"\\{c:03d}")
        parts.append("".join(chars))
        pos += ln + 1
    return ".".join(parts) + "."


def text_to_wire(name: str) -> bytes:
    """Wire form of a presentation name (relative names are taken as absolute)."""
    name = name.strip()
    if name in ("", "."):
        return b"\x00"
    if name.endswith(".") and not name.endswith("\\."):
        name = name[:-1]
    labels: list[bytes] = []
    cur = bytearray()
    i = 0
    while i < len(name):
        c = name[i]
        if c == "\\":
            digits = name[i + 1 : i + 4]
            if len(digits) == 3 and digits.isascii() and digits.isdigit():  # \DDD, ASCII only
                cur.append(int(name[i + 1 : i + 4]) & 0xFF)
                i += 4
                continue
            if i + 1 >= len(name):
                raise ValueError(f"{name!r}: trailing backslash")
            cur.extend(name[i + 1].encode())
            i += 2
            continue
        if c == ".":
            labels.append(bytes(cur))
            cur = bytearray()
        else:
            cur.extend(c.encode())
        i += 1
    labels.append(bytes(cur))
    out = bytearray()
    for label in labels:
        if not label:
            raise ValueError(f"{name!r}: empty label")
        if len(label) > MAX_LABEL_LEN:
            raise ValueError(f"{name!r}: label longer than 63 octets")
        out.append(len(label))
        out.extend(label)
    out.append(0)
    if len(out) > MAX_NAME_LEN:
        raise ValueError(f"{name!r}: name longer than 255 octets")
    return bytes(out)


def is_subdomain(name: bytes, labels: tuple[int, ...], zone: bytes) -> bool:
    """Whether wire name `name` (lowercase, label offsets `labels`) is `zone` or below it."""
    if zone == b"\x00":
        return True
    off = len(name) - len(zone)
    return off >= 0 and name[off:] == zone and (off in labels)
