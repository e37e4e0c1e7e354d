"""`log`: one log line per query, in CoreDNS's format, with the fields also in `extra`.

    log [NAMES...] [FORMAT] {
        class success|denial|error|all ...
    }

NAMES limits logging to queries at or below those names (default: all). FORMAT is a
template with CoreDNS's placeholders ({remote} {port} {>id} {type} {class} {name} {proto}
{size} {>do} {>bufsize} {rcode} {>rflags} {rsize} {duration}) or `{common}`.
"""

from __future__ import annotations

import logging
import re
import struct
import time

from dns.corefile import Directive
from dns.plugin import Plugin, Setup, Writer, register, serve_next, zone_args
from dns.wire import (
    NOERROR,
    NXDOMAIN,
    Request,
    class_name,
    is_subdomain,
    rcode_name,
    text_to_wire,
    type_name,
)

log = logging.getLogger(__name__)

COMMON = (
    '{remote}:{port} - {>id} "{type} {class} {name} {proto} {size} {>do} {>bufsize}" '
    "{rcode} {>rflags} {rsize} {duration}"
)
CLASSES = ("success", "denial", "error", "all")
_PLACEHOLDER = re.compile(r"\{>?[a-z]+\}")
_FLAG_NAMES = (
    (0x8000, "qr"),
    (0x0400, "aa"),
    (0x0200, "tc"),
    (0x0100, "rd"),
    (0x0080, "ra"),
    (0x0020, "ad"),
    (0x0010, "cd"),
)


def classify(reply: bytes) -> str:
    rcode = reply[3] & 0x0F if len(reply) > 3 else 2
    if rcode == NXDOMAIN:
        return "denial"
    if rcode == NOERROR:
        ancount = struct.unpack_from(">H", reply, 6)[0] if len(reply) >= 12 else 0
        return "success" if ancount else "denial"
    return "error"


class _LogWriter:
    __slots__ = ("inner", "plugin", "req", "start")

    def __init__(self, plugin: LogPlugin, req: Request, inner: Writer) -> None:
        self.plugin = plugin
        self.req = req
        self.inner = inner
        self.start = time.perf_counter()

    def write(self, reply: bytes) -> None:
        self.plugin.emit(self.req, reply, time.perf_counter() - self.start)
        self.inner.write(reply)


class LogPlugin(Plugin):
    name = "log"

    def __init__(self, names: tuple[str, ...], fmt: str, classes: frozenset[str], server: str):
        super().__init__()
        self.names = tuple(text_to_wire(n) for n in names)
        self.fmt = fmt
        self.classes = classes
        self.server = server

    def serve(self, req: Request, w: Writer) -> int:
        if self.names != (b"\x00",) and not any(
            is_subdomain(req.qlower, req.labels, n) for n in self.names
        ):
            return serve_next(self, req, w)
        return serve_next(self, req, _LogWriter(self, req, w))

    def emit(self, req: Request, reply: bytes, seconds: float) -> None:
        kind = classify(reply)
        if "all" not in self.classes and kind not in self.classes:
            return
        flags = struct.unpack_from(">H", reply, 2)[0] if len(reply) >= 4 else 0
        fields = {
            "remote": req.client[0] if req.client else "-",
            "port": str(req.client[1]) if req.client else "-",
            ">id": str(req.id),
            "type": type_name(req.qtype),
            "class": class_name(req.qclass),
            "name": req.name,
            "proto": req.proto,
            "size": str(len(req.wire)),
            ">do": "true" if req.do else "false",
            ">bufsize": str(req.udp_size if req.edns else 512),
            "rcode": rcode_name(reply[3] & 0x0F if len(reply) > 3 else 2),
            ">rflags": ",".join(n for bit, n in _FLAG_NAMES if flags & bit),
            "rsize": str(len(reply)),
            "duration": f"{seconds:.6f}s",
        }
        line = _PLACEHOLDER.sub(lambda m: fields.get(m.group(0)[1:-1], m.group(0)), self.fmt)
        log.info(
            line,
            extra={
                "server": self.server,
                "client": fields["remote"],
                "qname": fields["name"],
                "qtype": fields["type"],
                "proto": req.proto,
                "rcode": fields["rcode"],
                "rsize": len(reply),
                "duration_ms": round(seconds * 1000, 3),
                "class": kind,
            },
        )


@register("log")
def setup(s: Setup, d: Directive) -> LogPlugin:
    names: list = []
    fmt = COMMON
    for tok in d.args:
        if "{" in tok.text:
            fmt = tok.text.replace("{common}", COMMON).replace("{combined}", COMMON)
        else:
            names.append(tok)
    classes: set[str] = set()
    for sub in d.block or ():
        if sub.name != "class":
            raise sub.token.error(f"log: unknown property {sub.name!r} (known: class)")
        if not sub.args:
            raise sub.token.error("log: class needs one of " + ", ".join(CLASSES))
        for t in sub.args:
            if t.text not in CLASSES:
                raise t.error(f"log: unknown class {t.text!r} (known: {', '.join(CLASSES)})")
            classes.add(t.text)
    return LogPlugin(zone_args(names, (".",)), fmt, frozenset(classes or {"all"}), s.server)
