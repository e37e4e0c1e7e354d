"""Small HTTP listeners shared by the health, ready and prometheus plugins.

Several server blocks (and plugins) may ask for the same address; each address gets one
aiohttp site, and each path one handler.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpEndpoints:
    def __init__(self) -> None:
        self._apps: dict[tuple[str, int], dict[str, RouteHandler]] = {}
        self._runners: dict[tuple[str, int], web.AppRunner] = {}
        self.bound: dict[tuple[str, int], int] = {}  # requested address -> bound port

    def add(self, host: str, port: int, path: str, handler: RouteHandler) -> bool:
        """Serve `path` on HOST:PORT; False if another block already serves it there."""
        routes = self._apps.setdefault((host, port), {})
        if path in routes:
            return False
        routes[path] = handler
        return True

    async def start(self) -> None:
        for (host, port), routes in self._apps.items():
            if (host, port) in self._runners:
                continue
            app = web.Application()
            for path, handler in routes.items():
                app.router.add_get(path, handler)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            self._runners[(host, port)] = runner
            server = site._server  # aiohttp exposes no public accessor for the bound port
            sockets = getattr(server, "sockets", None) or ()
            self.bound[(host, port)] = sockets[0].getsockname()[1] if sockets else port
            log.info(
                "dns http listener started",
                extra={"address": f"{host}:{self.bound[(host, port)]}", "paths": sorted(routes)},
            )

    async def stop(self) -> None:
        for runner in self._runners.values():
            await runner.cleanup()
        self._runners.clear()

    def port(self, host: str, port: int) -> int:
        return self.bound[(host, port)]
