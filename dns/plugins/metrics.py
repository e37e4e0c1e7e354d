"""`prometheus`: per-query metrics (`isthmus_dns_requests_total`, `..._responses_total`,
`..._request_duration_seconds`) in the default registry, which the appliance serves on its
metrics endpoint.

    prometheus [ADDRESS]

With ADDRESS the resolver also serves /metrics there itself (a standalone resolver).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from dns.corefile import Directive
from dns.metrics import DURATION, REQUESTS, RESPONSES
from dns.plugin import Plugin, Setup, Writer, address_arg, arg_count, register, serve_next
from dns.wire import TYPE_NAMES, Request, name_to_text, rcode_name

# Only well-known types get their own label value: clients cannot blow up cardinality.
_TYPE_LABELS = {t: n for t, n in TYPE_NAMES.items()}


class _MetricsWriter:
    __slots__ = ("inner", "plugin", "req", "start")

    def __init__(self, plugin: MetricsPlugin, req: Request, inner: Writer, start: float) -> None:
        self.plugin = plugin
        self.req = req
        self.inner = inner
        self.start = start

    def write(self, reply: bytes) -> None:
        self.plugin.observe(self.req, reply, self.start)
        self.inner.write(reply)


class MetricsPlugin(Plugin):
    name = "prometheus"

    def __init__(self, server: str) -> None:
        super().__init__()
        self.server = server
        # Labelled children, looked up once per label combination (labels() is slow).
        self._requests: dict[tuple[bytes, str, bool, int], Any] = {}
        self._responses: dict[tuple[bytes, int], Any] = {}
        self._durations: dict[bytes, Any] = {}

    def serve(self, req: Request, w: Writer) -> int:
        v6 = req.client is not None and ":" in req.client[0]
        key = (req.zone, req.proto, v6, req.qtype)
        child = self._requests.get(key)
        if child is None:
            child = REQUESTS.labels(
                self.server,
                name_to_text(req.zone, 0),
                req.proto,
                "2" if v6 else "1",
                _TYPE_LABELS.get(req.qtype, "other"),
            )
            self._requests[key] = child
        child.inc()
        return serve_next(self, req, _MetricsWriter(self, req, w, time.perf_counter()))

    def observe(self, req: Request, reply: bytes, start: float) -> None:
        rcode = reply[3] & 0x0F if len(reply) > 3 else 2
        key = (req.zone, rcode)
        child = self._responses.get(key)
        if child is None:
            child = RESPONSES.labels(self.server, name_to_text(req.zone, 0), rcode_name(rcode))
            self._responses[key] = child
        child.inc()
        hist = self._durations.get(req.zone)
        if hist is None:
            hist = DURATION.labels(self.server, name_to_text(req.zone, 0))
            self._durations[req.zone] = hist
        hist.observe(time.perf_counter() - start)


async def _serve_metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


@register("prometheus")
def setup(s: Setup, d: Directive) -> MetricsPlugin:
    arg_count(d, 0, 1)
    if d.block:
        raise d.block[0].token.error(f"prometheus: unknown property {d.block[0].name!r}")
    if d.args and s.http is not None:
        host, port = address_arg(d.args[0], 9153)
        s.http.add(host, port, "/metrics", _serve_metrics)
    return MetricsPlugin(s.server)
