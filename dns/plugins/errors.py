"""`errors`: log every query a plugin failed (exceptions, upstream failures), answer SERVFAIL.

errors
"""

from __future__ import annotations

import logging

from dns.corefile import Directive
from dns.metrics import PLUGIN_ERRORS
from dns.plugin import FAST_TRANSPARENT, Plugin, Setup, Writer, arg_count, register, serve_next
from dns.wire import SERVFAIL, Request, name_to_text, type_name

log = logging.getLogger(__name__)


class ErrorsPlugin(Plugin):
    name = "errors"
    fast_role = FAST_TRANSPARENT  # acts only on queries that fail

    def __init__(self, server: str) -> None:
        super().__init__()
        self.server = server

    def report(self, req: Request, exc: BaseException) -> None:
        zone = name_to_text(req.zone, 0)
        PLUGIN_ERRORS.labels(self.server, zone).inc()
        log.error(
            "dns query failed",
            extra={
                "server": self.server,
                "zone": zone,
                "qname": req.name,
                "type": type_name(req.qtype),
                "client": req.client[0] if req.client else "",
                "error": f"{type(exc).__name__}: {exc}",
            },
        )

    def serve(self, req: Request, w: Writer) -> int:
        req.report_error = self.report
        try:
            return serve_next(self, req, w)
        except Exception as e:
            self.report(req, e)
            return SERVFAIL


@register("errors")
def setup(s: Setup, d: Directive) -> ErrorsPlugin:
    arg_count(d, 0, 0)
    if d.block:
        raise d.block[0].token.error(f"errors: unknown property {d.block[0].name!r}")
    return ErrorsPlugin(s.server)
