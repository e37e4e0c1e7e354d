"""`ready`: HTTP readiness at http://ADDRESS/ready: 200 once every plugin says it is ready.

    ready [ADDRESS]

ADDRESS defaults to :8181. `global` is ready once it serves a published routing table;
`forward` once one upstream is up.
"""

from __future__ import annotations

from aiohttp import web

from dns.corefile import Directive
from dns.plugin import Plugin, Setup, address_arg, arg_count, register

DEFAULT_PORT = 8181


class ReadyPlugin(Plugin):
    name = "ready"
    in_chain = False

    def __init__(self, server: object) -> None:
        super().__init__()
        self.server = server

    async def handle(self, request: web.Request) -> web.Response:
        plugins = getattr(self.server, "plugins", [])
        waiting = sorted({p.name for p in plugins if not p.ready()})
        ready = getattr(self.server, "ready", None)
        if callable(ready) and ready():
            return web.Response(text="OK")
        return web.Response(status=503, text=",".join(waiting) or "starting")


@register("ready")
def setup(s: Setup, d: Directive) -> ReadyPlugin:
    arg_count(d, 0, 1)
    if d.block:
        raise d.block[0].token.error(f"ready: unknown property {d.block[0].name!r}")
    host, port = address_arg(d.args[0], DEFAULT_PORT) if d.args else ("0.0.0.0", DEFAULT_PORT)
    plugin = ReadyPlugin(s.shared.get("server"))
    if s.http is not None:
        s.http.add(host, port, "/ready", plugin.handle)
    return plugin
