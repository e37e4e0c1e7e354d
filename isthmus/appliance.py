"""Composes the parts per role and owns the process lifecycle: start, reload, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from discovery.catalog import Catalog
from discovery.embedded import EmbeddedCatalog
from discovery.errors import DiscoveryError
from discovery.health import HealthChecker
from isthmus import config as configmod
from isthmus import logs
from isthmus.api import ApiContext, make_app
from isthmus.auth import TokenFileError, TokenRegistry, ensure_admin_token, read_token
from isthmus.config import Config, ConfigError, split_host_port
from isthmus.metrics import CATALOGS

log = logging.getLogger(__name__)

# Roles this build can run; others are refused at start-up with a clear message.
AVAILABLE_ROLES = frozenset({"control"})


class StartupError(Exception):
    pass


class Appliance:
    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.catalog: Catalog | None = None
        self.checker: HealthChecker | None = None
        self.tokens = TokenRegistry()
        self._runners: list[web.AppRunner] = []
        self._monitor: Any = None
        self.api_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.started = time.time()

    @property
    def api_url(self) -> str:
        assert self.api_address is not None
        host, port = self.api_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # start -----------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        missing = [r for r in cfg.roles if r not in AVAILABLE_ROLES]
        if missing:
            raise StartupError(
                f"roles: {missing} are not available in this build yet "
                f"(available: {sorted(AVAILABLE_ROLES)})"
            )
        if cfg.discovery.backend != "embedded":
            raise StartupError(
                "discovery.backend: 'consul' is not available in this build yet; use 'embedded'"
            )
        data_dir = Path(cfg.data_dir)
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StartupError(f"data_dir: cannot create {data_dir}: {e.strerror}") from None
        self._load_tokens()
        catalog = EmbeddedCatalog(data_dir, cfg.cluster, cfg.egress.vip_cidr)
        try:
            await catalog.open()
        except DiscoveryError as e:
            raise StartupError(str(e)) from None
        self.catalog = catalog
        CATALOGS.catalogs.add(catalog)
        await self._sync_static_workloads()
        self.checker = HealthChecker(catalog, max_concurrent=cfg.discovery.max_concurrent_checks)
        await self.checker.start()

        ctx = ApiContext(
            cluster=cfg.cluster,
            node=cfg.node,
            trust_domain=cfg.trust_domain,
            roles=tuple(cfg.roles),
            catalog=catalog,
            checker=self.checker,
            tokens=self.tokens,
            started=self.started,
        )
        self.api_address = await self._serve(make_app(ctx, cfg.api.max_body), cfg.api.listen)
        if cfg.metrics.enabled:
            self.metrics_address = await self._serve(metrics_app(), cfg.metrics.listen)
        if cfg.monitor.enabled:
            self._start_monitor()
        log.info(
            "appliance started",
            extra={
                "cluster": cfg.cluster,
                "node": cfg.node,
                "roles": cfg.roles,
                "api": self.api_url,
                "data_dir": str(data_dir),
            },
        )

    def _load_tokens(self) -> None:
        registry = TokenRegistry()
        try:
            registry.add(ensure_admin_token(Path(self.config.api.token_file)), frozenset({"admin"}))
            for t in self.config.api.tokens:
                registry.add(read_token(Path(t.token_file)), frozenset(t.scopes))
        except TokenFileError as e:
            raise StartupError(f"api: {e}") from None
        self.tokens.__dict__.update(registry.__dict__)  # swap in place: the API holds this object

    async def _serve(self, app: web.Application, listen: str) -> tuple[str, int]:
        host, port = split_host_port(listen)
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=self.config.drain_timeout, handle_signals=False
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise StartupError(f"cannot listen on {listen}: {e.strerror}") from None
        self._runners.append(runner)
        server = site._server
        assert server is not None
        sockname = server.sockets[0].getsockname()  # type: ignore[union-attr]
        return sockname[0], sockname[1]

    def _start_monitor(self) -> None:
        import aiomonitor

        host, port = split_host_port(self.config.monitor.listen)
        self._monitor = aiomonitor.Monitor(
            asyncio.get_running_loop(),
            host=host,
            termui_port=port,
            webui_port=port + 1,
            console_port=port + 2,
            locals={"appliance": self},
        )
        self._monitor.start()
        log.info("monitor console started", extra={"listen": self.config.monitor.listen})

    async def _sync_static_workloads(self) -> None:
        """Make the catalog's config-sourced workloads match `discovery.workloads`."""
        assert self.catalog is not None
        wanted = {
            w.id: w.to_workload(w.id, self.config.cluster, source="config")
            for w in self.config.discovery.workloads
        }
        for st in self.catalog.workloads():
            if st.workload.source == "config" and st.workload.id not in wanted:
                await self.catalog.delete(st.workload.id)
        for wid, w in wanted.items():
            try:
                current = self.catalog.get(wid).workload
            except DiscoveryError:
                current = None
            if current != w:
                await self.catalog.put(w)

    # reload and stop ------------------------------------------------------------------------------
    async def reload(self) -> bool:
        """SIGHUP: re-read the config; apply what is safe live (tokens, static workloads, log
        level); anything else needs a restart and is said so."""
        if self.config_path is None:
            log.info("reload requested, running on the built-in default: nothing to reload")
            return False
        try:
            new = configmod.load(self.config_path)
        except ConfigError as e:
            log.error("reload failed, keeping the running config", extra={"problems": e.problems})
            return False
        live = {"api", "discovery", "log"}
        changed = [k for k in Config.model_fields if getattr(new, k) != getattr(self.config, k)]
        needs_restart = [k for k in changed if k not in live]
        restart_keys = {"listen", "max_body"}
        if (
            new.api.model_dump(include=restart_keys)
            != self.config.api.model_dump(include=restart_keys)
            or new.discovery.backend != self.config.discovery.backend
        ):
            needs_restart.append("api.listen/max_body or discovery.backend")
        old = self.config
        self.config = new
        try:
            self._load_tokens()
            await self._sync_static_workloads()
        except (StartupError, DiscoveryError) as e:
            self.config = old
            log.error("reload failed, keeping the running config", extra={"error": str(e)})
            return False
        logs.setup(new.log.level, new.log.format)
        log.info("config reloaded", extra={"changed": changed, "needs_restart": needs_restart})
        return True

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), flush the store."""
        log.info("draining", extra={"timeout": self.config.drain_timeout})
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._monitor is not None:
            self._monitor.close()
        if self.checker is not None:
            await self.checker.stop()
        if self.catalog is not None:
            await self.catalog.close()
        log.info("appliance stopped")


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def metrics_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    return app


async def serve(config: Config, config_path: str | None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads."""
    appliance = Appliance(config, config_path)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(appliance.reload()))
    try:
        await appliance.start()
    except StartupError as e:
        log.error("start-up failed", extra={"error": str(e)})
        await appliance.stop()
        raise
    print(
        f"isthmus: cluster {config.cluster} running; API {appliance.api_url}, pid {os.getpid()}",
        flush=True,
    )
    await stop.wait()
    await appliance.stop()
    return 0


def run(config: Config, config_path: str | None) -> int:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    return runner(serve(config, config_path))
