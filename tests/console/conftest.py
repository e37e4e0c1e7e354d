"""Two real appliances on loopback, and Debian's chromium driven by Playwright.

The browser is the system's (`/usr/bin/chromium`, the Debian package), never one Playwright
downloads; without it (or without the `playwright` package) the browser tests are skipped
with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.federation.conftest import Backend, Cluster, eventually, make_pki

CHROMIUM = os.environ.get("ISTHMUS_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_nets = itertools.count(1)


def browser_missing() -> str | None:
    if not (Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    return None


class ConsoleCluster(Cluster):
    """A cluster with the egress role and a read-only API token besides the admin one."""

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        read = self.dir / "read-token"
        if not read.exists():
            read.parent.mkdir(parents=True, exist_ok=True)
            read.write_text(f"read-{self.name}-{os.urandom(8).hex()}\n")
            read.chmod(0o600)
        cfg["api"]["tokens"] = [{"token_file": str(read), "scopes": ["read"]}]
        return cfg

    @property
    def url(self) -> str:
        return f"http://{self.api_listen}/ui/"

    def token(self, kind: str = "api") -> str:
        return (self.dir / f"{kind}-token").read_text().strip()


@dataclass
class Federation:
    east: ConsoleCluster
    west: ConsoleCluster
    backends: dict[str, Backend]

    @property
    def clusters(self) -> tuple[ConsoleCluster, ConsoleCluster]:
        return self.east, self.west


async def register_reviews(c: ConsoleCluster, b: Backend, **extra: Any) -> None:
    status, out = await c.call(
        "PUT",
        f"/v1/workloads/reviews-{c.name}",
        {
            "service": "reviews",
            "address": b.host,
            "ports": {"http": b.port},
            "locality": {"region": c.region, "zone": f"{c.region}-a"},
            "labels": {"version": "v1" if c.name == "east" else "v2"},
            "check": {"http": f"http://{b.host}:{b.port}/healthz", "interval": "1s",
                      "timeout": "1s"},
            **extra,
        },
    )  # fmt: skip
    assert status in (200, 201), out


@pytest.fixture
async def federation(tmp_path: Path) -> AsyncIterator[Federation]:
    n = (next(_nets) + 11 * (os.getpid() % 20)) % 200
    make_pki(tmp_path, ["east", "west"])
    east = ConsoleCluster("east", tmp_path, f"127.66.{n}.1", "us", vip_cidr=f"127.231.{n}.0/24",
                          roles=("control", "ingress", "egress"))  # fmt: skip
    west = ConsoleCluster("west", tmp_path, f"127.66.{n}.2", "eu", vip_cidr=f"127.232.{n}.0/24",
                          roles=("control", "ingress", "egress"))  # fmt: skip
    east.peers, west.peers = {"west": west.ingress}, {"east": east.ingress}
    backends = {"east": Backend("east", f"127.67.{n}.1"), "west": Backend("west", f"127.67.{n}.2")}
    fed = Federation(east, west, backends)
    try:
        await asyncio.gather(*(b.up() for b in backends.values()))
        await asyncio.gather(east.start(), west.start())
        for c in fed.clusters:
            await register_reviews(c, backends[c.name])

        async def converged() -> bool:
            for c in fed.clusters:
                _, peers = await c.call("GET", "/v1/peers")
                if [p["state"] for p in peers] != ["connected"]:
                    return False
                _, svc = await c.call("GET", "/v1/services/default/reviews")
                if {k: v["healthy"] for k, v in svc["clusters"].items()} != {"east": 1, "west": 1}:
                    return False
            return True

        await eventually(converged, timeout=30, what="both clusters see both reviews healthy")
        yield fed
    finally:
        await asyncio.gather(*(c.close() for c in fed.clusters), return_exceptions=True)
        await asyncio.gather(*(b.down() for b in backends.values()), return_exceptions=True)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh chromium profile (its own user-data-dir), closed after the test."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    profile = tmp_path / "chromium-profile"
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 900},
            timeout=60_000,
        )
        context.set_default_timeout(20_000)
        try:
            yield context
        finally:
            await context.close()
            shutil.rmtree(profile, ignore_errors=True)


async def sign_in(context: Any, cluster: ConsoleCluster, token: str, hash_: str = "") -> Any:
    """A page of `cluster`'s console, signed in with `token`; collects console errors."""
    page = await context.new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    await page.goto(cluster.url + hash_)
    await page.fill("#token", token)
    await page.click("#signin-form button[type=submit]")
    await page.wait_for_selector("#nav:not([hidden])")
    return page
