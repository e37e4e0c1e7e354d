"""`health`: HTTP liveness at http://ADDRESS/health (200 "OK" while the process serves).

    health [ADDRESS] {
        lameduck DURATION
    }

ADDRESS defaults to :8080. With `lameduck`, stopping first reports 503 for DURATION so a
load balancer drains the resolver before its sockets close.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from dns.corefile import Directive
from dns.plugin import Plugin, Setup, address_arg, arg_count, duration_arg, register

DEFAULT_PORT = 8080


class HealthPlugin(Plugin):
    name = "health"
    in_chain = False

    def __init__(self, lameduck: float) -> None:
        super().__init__()
        self.lameduck = lameduck
        self.healthy = True

    async def handle(self, request: web.Request) -> web.Response:
        if self.healthy:
            return web.Response(text="OK")
        return web.Response(status=503, text="shutting down")

    async def stop(self) -> None:
        if self.healthy and self.lameduck > 0:
            self.healthy = False
            await asyncio.sleep(self.lameduck)
        self.healthy = False


@register("health")
def setup(s: Setup, d: Directive) -> HealthPlugin:
    arg_count(d, 0, 1)
    host, port = address_arg(d.args[0], DEFAULT_PORT) if d.args else ("0.0.0.0", DEFAULT_PORT)
    lameduck = 0.0
    for sub in d.block or ():
        if sub.name != "lameduck":
            raise sub.token.error(f"health: unknown property {sub.name!r} (known: lameduck)")
        arg_count(sub, 1, 1)
        lameduck = duration_arg(sub.args[0])
    plugin = HealthPlugin(lameduck)
    if s.http is not None:
        s.http.add(host, port, "/health", plugin.handle)
    return plugin
