"""The web console's static files, served at `/ui/` on the API listener (docs/console.md).

The files ship in the wheel (isthmus/ui/) and are read once, at start-up, into memory:
only the names found there are served, so no request path ever reaches the file system. They
hold no secrets, so they load without a token; the page asks the person for one and sends it
as a bearer header with each API call. Every answer carries a strict Content-Security-Policy
(scripts, styles and connections to this origin only; no inline code, no eval, no framing).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

__all__ = ["CSP", "Console", "load_console"]

# Everything from this origin only; nothing inline, nothing evaluated, never framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'none'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgraded appliance serves new files
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


class Console:
    def __init__(self, assets: dict[str, Asset]) -> None:
        if "index.html" not in assets:
            raise ValueError("the console's files have no index.html")
        self.assets = assets

    @property
    def weight(self) -> int:
        """Bytes of every file the page loads (all of them)."""
        return sum(len(a.body) for a in self.assets.values())

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/ui", self._redirect)
        app.router.add_get("/ui/", self._index)
        app.router.add_get("/ui/{file}", self._file)

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=301, headers={**HEADERS, "Location": "/ui/"})

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return self._serve(request, "index.html")

    async def _file(self, request: web.Request) -> web.StreamResponse:
        return self._serve(request, request.match_info["file"])

    def _serve(self, request: web.Request, name: str) -> web.StreamResponse:
        asset = self.assets.get(name)
        if asset is None:
            raise web.HTTPNotFound()
        if request.headers.get("If-None-Match") == asset.etag:
            return web.Response(status=304, headers={**HEADERS, "ETag": asset.etag})
        return web.Response(
            body=asset.body,
            headers={**HEADERS, "Content-Type": asset.content_type, "ETag": asset.etag},
        )


def load_console() -> Console:
    """The files packaged under isthmus/ui/ (flat: no sub-folders)."""
    assets: dict[str, Asset] = {}
    for entry in (resources.files("isthmus") / "ui").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if not entry.is_file() or suffix not in TYPES or entry.name.startswith("."):
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[entry.name] = Asset(body, TYPES[suffix], etag)
    return Console(assets)
