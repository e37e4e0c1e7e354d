"""Composes the parts per role and owns the process lifecycle: start, reload, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from discovery.catalog import Catalog
from discovery.consul.store import ConsulCatalog
from discovery.embedded import EmbeddedCatalog
from discovery.errors import Conflict, DiscoveryError, InvalidInput, LimitExceeded
from discovery.health import HealthChecker
from discovery.model import Locality
from discovery.statefiles import secure_dir
from dns.errors import DnsError
from dns.server import DnsServer
from dns.transport import TcpLimits
from federation.agentlink import AgentHub, AgentLink
from federation.routing import TableHolder
from federation.service import Federation
from federation.trust import BootstrapTokens, IdentityIssuer, TrustError, issuance_app
from federation.trust.spiffe import Kind
from gateway import metrics as gwmetrics
from gateway.budget import ListenerAdmission, listener_budget, open_file_limit, raise_nofile_limit
from gateway.egress import Egress, EgressConfig
from gateway.ingress import Ingress
from gateway.tunnel.transport import MuxConfig
from gateway.worker import TlsPaths, WorkerPool, WorkerSpec
from isthmus import config as configmod
from isthmus import logs
from isthmus.agentapi import AgentContext, make_agent_app
from isthmus.api import ApiContext, make_app
from isthmus.auth import TokenFileError, TokenRegistry, ensure_admin_token, read_token
from isthmus.catalogs import make_catalog, read_consul_token
from isthmus.config import Config, ConfigError, exposed_listeners, split_host_port
from isthmus.console import load_console
from isthmus.datadir import DataDirBusy, DataDirLock
from isthmus.events import EventLog, watch_catalog, watch_federation, watch_handshakes
from isthmus.identity import (
    IdentityError,
    NodeTrust,
    bootstrap_agent,
    ensure_local_pki,
    load_node_trust,
)
from isthmus.listeners import (
    HttpLimits,
    api_limits,
    control_limits,
    ingress_config,
    metrics_limits,
    serve_app,
)
from isthmus.metrics import CATALOGS, WithWorkers
from isthmus.traffic import TrafficHistory

log = logging.getLogger(__name__)


class StartupError(Exception):
    pass


class Appliance:
    def __init__(
        self, config: Config, config_path: str | None = None, *, builtin_default: bool = False
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.catalog: Catalog | None = None
        self.checker: HealthChecker | None = None
        self.holder = TableHolder()
        self.trust: NodeTrust | None = None
        self.federation: Federation | None = None
        self.dns: DnsServer | None = None
        self.ingress: Ingress | None = None
        self.egress: Egress | None = None
        self.egress_workers: WorkerPool | None = None
        self._worker_edges: dict[tuple[str, str, str], gwmetrics.Figures] = {}
        self._worker_series: dict[tuple[str, str, str, str], gwmetrics.Figures] = {}
        self.agent_link: AgentLink | None = None
        self.agent_hub: AgentHub | None = None
        self.bootstrap_tokens: BootstrapTokens | None = None
        self.control_address: tuple[str, int] | None = None
        self.listener_budget = listener_budget(config.egress.max_listeners)
        self.listener_admission: ListenerAdmission | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.builtin_default = builtin_default  # may create its own PKI under data_dir
        self.tokens = TokenRegistry()
        self._runners: list[web.AppRunner] = []
        self._monitor: Any = None
        self.api_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.started = time.time()
        self._lock: DataDirLock | None = None
        self.events: EventLog | None = None
        self.history: TrafficHistory | None = None
        self._unwatch: list[Any] = []

    @property
    def api_url(self) -> str:
        assert self.api_address is not None
        host, port = self.api_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # start -----------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        roles = set(cfg.roles)
        problems = configmod.role_problems(cfg)
        if problems:
            raise StartupError("; ".join(problems))
        self._lock_data_dir()
        if "agent" in roles:
            await self._start_agent()
            return
        data_dir = Path(cfg.data_dir)
        self._load_tokens()
        self._load_trust()
        try:
            catalog = make_catalog(cfg)
            await catalog.open()
        except DiscoveryError as e:
            raise StartupError(str(e)) from None
        self.catalog = catalog
        CATALOGS.catalogs.add(catalog)
        # The egress listens on every VIP port the catalog asks for: with the egress role here,
        # a registration that would not fit this node's listener budget is refused (409)
        # before it is written. Counted on every node, for GET /v1/status.
        self.listener_admission = ListenerAdmission(
            self.listener_budget, cfg.cluster, catalog, self.holder
        )
        if "egress" in roles:
            catalog.admission = self.listener_admission.admit
        await self._sync_static_workloads()
        self.checker = HealthChecker(
            catalog,
            max_concurrent=cfg.discovery.max_concurrent_checks,
            min_interval=cfg.discovery.min_check_interval,
            max_per_second=cfg.discovery.max_checks_per_second,
        )
        await self.checker.start()
        public = cfg.ingress.public_address
        if public is None and "ingress" in roles:
            public = cfg.ingress.listen  # fine on loopback; set it for anything public
        self.federation = Federation(
            cluster=cfg.cluster,
            trust_domain=cfg.trust_domain,
            locality=Locality(cfg.locality.region, cfg.locality.zone),
            data_dir=data_dir,
            catalog=catalog,
            holder=self.holder,
            peers=[(p.cluster, p.address) for p in cfg.federation.peers],
            export=cfg.federation.export,
            public_address=public,
            credentials=self.trust.credentials if self.trust else None,
            peer_unreachable_after=cfg.federation.peer_unreachable_after,
        )
        try:
            await self.federation.start()
        except DiscoveryError as e:
            raise StartupError(str(e)) from None
        self.bootstrap_tokens = BootstrapTokens(data_dir)
        # What the console shows live: recent events and the last minutes of traffic.
        self.events = EventLog(cfg.api.events)
        self._unwatch += [
            watch_catalog(self.events, catalog),
            watch_federation(self.events, self.federation),
            watch_handshakes(self.events),
        ]
        self.history = TrafficHistory(
            cfg.cluster, read_edges=self._edges, read_series=self._series,
            refresh=self._refresh_worker_figures,
        )  # fmt: skip
        self.history.start(also=self.events.flush)

        ctx = ApiContext(
            cluster=cfg.cluster,
            node=cfg.node,
            trust_domain=cfg.trust_domain,
            roles=tuple(cfg.roles),
            catalog=catalog,
            checker=self.checker,
            tokens=self.tokens,
            started=self.started,
            holder=self.holder,
            federation=self.federation,
            bootstrap_tokens=self.bootstrap_tokens,
            reports=self.reports,
            events=self.events,
            history=self.history,
            console=load_console() if cfg.api.console else None,
        )
        self.api_address = await self._serve(
            make_app(ctx, cfg.api.max_body), cfg.api.listen, limits=api_limits(cfg.api)
        )
        if cfg.metrics.enabled:
            self.metrics_address = await self._serve(
                metrics_app(self._worker_metrics), cfg.metrics.listen
            )
        if self.trust is not None and self.trust.authority is not None:
            issuer = IdentityIssuer(
                self.trust.authority,
                self.bootstrap_tokens,
                lambda: self.trust.credentials.bundle,
                own_identity=self.trust.credentials.spiffe_id,
            )
            self.trust.issuer = issuer  # a reloaded cluster CA reaches it (SIGHUP)
            control_app = issuance_app(issuer)
            self.agent_hub = AgentHub(
                catalog,
                self.holder,
                self.trust.credentials,
                cfg.cluster,
                self.checker,
                grace=cfg.control.agent_grace,
                reap_after=cfg.control.agent_reap_after,
                live=issuer.live,
            )
            ctx.agents = self.agent_hub
            control_app.add_routes(self.agent_hub.routes())
            self.agent_hub.start()
            self.control_address = await self._serve(
                control_app,
                cfg.control.listen,
                ssl=self.trust.credentials.listener_context(require_client_cert=False),
                limits=control_limits(cfg.control),
            )
        if "ingress" in roles:
            assert self.trust is not None
            self.ingress = Ingress(
                await ingress_config(cfg),
                self.holder,
                self.trust.credentials,
                on_federation=self.federation.feed_server.handle,
            )
            try:
                await self.ingress.start()
            except OSError as e:
                raise StartupError(f"cannot listen on {cfg.ingress.listen}: {e.strerror}") from None
        if "egress" in roles:
            await self._start_egress()
        if "dns" in roles:
            await self._start_dns()
        if self.trust is not None:
            self._tasks.append(asyncio.create_task(self.trust.manager.run(), name="identity"))
        if cfg.monitor.enabled:
            self._start_monitor()
        self._warn_exposed()
        log.info(
            "appliance started",
            extra={
                "cluster": cfg.cluster,
                "node": cfg.node,
                "roles": cfg.roles,
                "api": self.api_url,
                "data_dir": str(data_dir),
                "identity": str(self.trust.credentials.spiffe_id) if self.trust else None,
            },
        )

    async def _start_agent(self) -> None:
        """A VM: identity from the control node (bootstrap token the first time), the routing
        table and registrations over the control channel, egress and resolver locally."""
        cfg = self.config
        try:
            await bootstrap_agent(cfg)
            self.trust = load_node_trust(cfg, Kind.AGENT)
        except (IdentityError, TrustError, OSError) as e:
            raise StartupError(str(e)) from None
        assert cfg.agent.control is not None
        self.agent_link = AgentLink(
            cfg.agent.control, self.trust.credentials, self.holder, cfg.discovery.workloads
        )
        self.agent_link.start()
        link = self.agent_link
        try:
            async with asyncio.timeout(10):
                await link.synced.wait()
                await link.answered.wait()
        except TimeoutError:
            log.warning(
                "the control node has not answered yet; starting anyway",
                extra={"control": cfg.agent.control, "problems": link.problems()},
            )
        refused = link.refused()
        if refused:
            # A VM whose workloads its control node refuses serves nobody: fail loudly now,
            # rather than run on with nothing registered.
            raise StartupError(
                f"control node {cfg.agent.control} refused "
                + "; ".join(f"workload {w}: {e}" for w, e in sorted(refused.items()))
            )
        self._load_tokens()
        agent_ctx = AgentContext(
            cluster=cfg.cluster,
            node=cfg.node,
            trust_domain=cfg.trust_domain,
            identity=str(self.trust.credentials.spiffe_id),
            link=link,
            holder=self.holder,
            tokens=self.tokens,
            started=self.started,
        )
        self.api_address = await self._serve(
            make_agent_app(agent_ctx, cfg.api.max_body), cfg.api.listen
        )
        await self._start_egress()
        await self._start_dns()
        if cfg.metrics.enabled:
            self.metrics_address = await self._serve(
                metrics_app(self._worker_metrics), cfg.metrics.listen
            )
        self._tasks.append(asyncio.create_task(self.trust.manager.run(), name="identity"))
        self._warn_exposed()
        log.info(
            "agent started",
            extra={
                "cluster": cfg.cluster,
                "node": cfg.node,
                "control": cfg.agent.control,
                "identity": str(self.trust.credentials.spiffe_id),
            },
        )

    def _lock_data_dir(self) -> None:
        data_dir = Path(self.config.data_dir)
        try:
            secure_dir(data_dir)
            lock = DataDirLock(data_dir)
            lock.acquire()
        except DataDirBusy as e:
            raise StartupError(str(e)) from None
        except OSError as e:
            raise StartupError(f"data_dir: cannot use {data_dir}: {e.strerror}") from None
        self._lock = lock

    async def _start_dns(self) -> None:
        cfg = self.config
        try:
            self.dns = DnsServer(
                cfg.dns.corefile,
                cfg.dns.listen,
                self.holder,
                base_dir=str(cfg.data_dir),
                tcp_limits=TcpLimits(
                    max_connections=cfg.dns.max_tcp_connections,
                    max_connections_per_source=cfg.dns.max_tcp_connections_per_source,
                ),
            )
            await self.dns.start()
        except DnsError as e:
            raise StartupError(f"dns: {e}") from None
        except OSError as e:
            raise StartupError(f"cannot listen on {cfg.dns.listen}: {e.strerror}") from None

    async def _start_egress(self) -> None:
        """In process with `workers: 1`; else N worker processes sharing the VIP listeners."""
        cfg = self.config
        assert self.trust is not None
        egress_cfg = EgressConfig(
            vip_cidr=cfg.egress.vip_cidr,
            reuse_port=cfg.workers > 1,
            multiplex=cfg.egress.multiplex,
            mux=MuxConfig(
                connections=cfg.egress.tunnel_connections,
                probe_timeout=cfg.egress.tunnel_probe_timeout,
            ),
            max_listeners=self.listener_budget,
        )
        if cfg.workers == 1:
            self.egress = Egress(
                egress_cfg, self.holder, self.trust.credentials, source_cluster=cfg.cluster
            )
            try:
                await self.egress.start()
            except OSError as e:
                raise StartupError(f"egress: cannot listen on VIPs: {e.strerror}") from None
            return
        t = cfg.trust
        spec = WorkerSpec(
            tls=TlsPaths(t.cert, t.key, t.bundle, trust_domain=cfg.trust_domain),
            source_cluster=cfg.cluster,
            egress=egress_cfg,
        )
        self.egress_workers = WorkerPool(spec, cfg.workers)
        await self.egress_workers.start(self.holder.current)
        self.holder.subscribe(self.egress_workers.publish)
        self._tasks.append(asyncio.create_task(self._follow_renewals(), name="worker-creds"))

    async def _worker_metrics(self) -> list[Metric]:
        pool = self.egress_workers
        return await pool.scrape() if pool is not None else []

    # The console's traffic figures: this process's totals plus the data-plane workers' (their
    # last answer, gathered before each tick of the traffic history).
    async def _refresh_worker_figures(self) -> None:
        pool = self.egress_workers
        if pool is not None:
            self._worker_edges, self._worker_series = await pool.figures()

    def _edges(self) -> dict[tuple[str, str, str], gwmetrics.Figures]:
        return gwmetrics.add_figures(gwmetrics.edges(), self._worker_edges)

    def _series(self) -> dict[tuple[str, str, str, str], gwmetrics.Figures]:
        return gwmetrics.add_figures(gwmetrics.series(), self._worker_series)

    async def _follow_renewals(self) -> None:
        assert self.trust is not None and self.egress_workers is not None
        while True:
            await self.trust.manager.renewed.wait()
            self.trust.manager.renewed.clear()
            self.egress_workers.reload_credentials()

    def _load_trust(self) -> None:
        cfg = self.config
        if self.builtin_default:
            ensure_local_pki(cfg)
        required = bool({"ingress", "egress"} & set(cfg.roles)) or bool(cfg.federation.peers)
        if not required and not Path(cfg.trust.bundle).exists():
            log.info(
                "no trust bundle: running without mTLS (no peers, no gateways)",
                extra={"bundle": cfg.trust.bundle},
            )
            return
        try:
            self.trust = load_node_trust(cfg)
        except (IdentityError, TrustError, OSError) as e:
            raise StartupError(str(e)) from None

    def _load_tokens(self) -> None:
        registry = TokenRegistry()
        try:
            registry.add(ensure_admin_token(Path(self.config.api.token_file)), frozenset({"admin"}))
            for t in self.config.api.tokens:
                registry.add(read_token(Path(t.token_file)), frozenset(t.scopes))
        except TokenFileError as e:
            raise StartupError(f"api: {e}") from None
        self.tokens.__dict__.update(registry.__dict__)  # swap in place: the API holds this object

    async def _serve(
        self, app: web.Application, listen: str, ssl: Any = None, limits: HttpLimits | None = None
    ) -> tuple[str, int]:
        """Serve `app` within `limits` (isthmus/listeners.py; the metrics listener's by default)."""
        try:
            runner, address = await serve_app(
                app,
                listen,
                limits or metrics_limits(),
                ssl_context=ssl,
                shutdown_timeout=self.config.drain_timeout,
            )
        except OSError as e:
            raise StartupError(f"cannot listen on {listen}: {e.strerror}") from None
        self._runners.append(runner)
        return address

    def _warn_exposed(self) -> None:
        exposed = exposed_listeners(self.config)
        if exposed:
            log.warning(
                "listening beyond loopback",
                extra={"listeners": dict(exposed),
                       "hint": "set each *.listen to 127.0.0.1 unless it must be reachable"},
            )

    def reports(self) -> dict[str, Any]:
        """What `GET /v1/status` adds: limits in force and what the stores quarantined."""
        egress: dict[str, Any] = {"budget": self.listener_budget}
        if self.listener_admission is not None:
            egress.update(self.listener_admission.report())
        if self.egress is not None:
            egress.update(self.egress.report())
        out: dict[str, Any] = {
            "limits": {"open_files": open_file_limit(), "egress_listeners": egress},
        }
        if isinstance(self.catalog, EmbeddedCatalog):
            out["catalog"] = {"quarantined": [r.to_json() for r in self.catalog.quarantined]}
        if self.federation is not None:
            out["policy_store"] = {
                "quarantined": [r.to_json() for r in self.federation.policies.quarantined]
            }
        return out

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
                # with Consul: another appliance's config may have registered it
                with contextlib.suppress(Conflict):
                    await self.catalog.delete(st.workload.id)
        for wid, w in wanted.items():
            try:
                current = self.catalog.get(wid).workload
            except DiscoveryError:
                current = None
            if current != w:
                try:
                    await self.catalog.put(w)
                except (InvalidInput, LimitExceeded, Conflict) as e:  # serve the rest
                    log.error("static workload refused", extra={"workload": wid,
                                                                "error": str(e)})

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
        restart_keys = set(type(new.api).model_fields) - {"token_file", "tokens"}  # the listener's
        if (
            new.api.model_dump(include=restart_keys)
            != self.config.api.model_dump(include=restart_keys)
            or new.discovery.backend != self.config.discovery.backend
            or new.discovery.consul != self.config.discovery.consul
        ):
            needs_restart.append("api.listen/max_body/limits or discovery.backend/consul")
        check_keys = {"min_check_interval", "max_checks_per_second", "max_concurrent_checks"}
        if new.discovery.model_dump(include=check_keys) != self.config.discovery.model_dump(
            include=check_keys
        ):
            needs_restart.append("discovery check limits")
        old = self.config
        self.config = new
        try:
            self._load_tokens()
            self._reload_consul_token(old, new)
            if self.agent_link is not None:  # an agent: its control node holds the catalog
                await self.agent_link.set_workloads(new.discovery.workloads)
            else:
                await self._sync_static_workloads()
        except (StartupError, DiscoveryError, TrustError) as e:
            self.config = old
            log.error("reload failed, keeping the running config", extra={"error": str(e)})
            return False
        if self.trust is not None:
            # Root and leaf rotation steps (docs/operations.md): the bundle, the cluster CA,
            # and a fresh identity now. A problem here keeps what runs; the rest is applied.
            problems = await self.trust.refresh(new)
            if problems:
                log.error("trust reload incomplete", extra={"problems": problems})
        logs.setup(new.log.level, new.log.format)
        log.info("config reloaded", extra={"changed": changed, "needs_restart": needs_restart})
        return True

    def _reload_consul_token(self, old: Config, new: Config) -> None:
        """Consul's ACL token is read again from the same file: rotating it is a new file
        content and a SIGHUP (a new `token_file` path needs a restart, as any other change
        of `discovery.consul`). An unreadable or public file keeps the running token."""
        c = new.discovery.consul
        if (isinstance(self.catalog, ConsulCatalog) and c.token_file
                and c.token_file == old.discovery.consul.token_file):
            self.catalog.set_token(read_consul_token(c.token_file))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), flush the store."""
        if self._lock is not None:  # nothing to say for a start that failed before anything ran
            log.info("draining", extra={"timeout": self.config.drain_timeout})
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch.clear()
        if self.history is not None:
            await self.history.stop()
        if self.agent_link is not None:
            await self.agent_link.leave()  # a clean stop: its workloads leave with it
            await self.agent_link.close()
        if self.agent_hub is not None:
            await self.agent_hub.close()
        if self.federation is not None:
            # peering streams never end by themselves: close them before draining the ingress
            await self.federation.close_links()
        if self.ingress is not None:
            await self.ingress.close(drain=self.config.drain_timeout)
        if self.egress is not None:
            await self.egress.close(drain=self.config.drain_timeout)
        if self.egress_workers is not None:
            await self.egress_workers.stop(drain=self.config.drain_timeout)
        if self.dns is not None:
            await self.dns.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._monitor is not None:
            self._monitor.close()
        if self.federation is not None:
            await self.federation.stop()
        if self.checker is not None:
            await self.checker.stop()
        if self.listener_admission is not None:
            self.listener_admission.close()
        if self.catalog is not None:
            await self.catalog.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            log.info("appliance stopped")


WorkerMetrics = Callable[[], Awaitable[list[Metric]]]


async def _no_workers() -> list[Metric]:
    return []


def metrics_app(workers: WorkerMetrics = _no_workers) -> web.Application:
    """`/metrics`: this process's registry, with the data-plane workers' metrics added in
    (`workers: N`; each worker counts in its own process)."""

    async def handle(_: web.Request) -> web.Response:
        body = generate_latest(WithWorkers(await workers()))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app


async def serve(config: Config, config_path: str | None) -> int:
    """Run until SIGTERM/SIGINT (heard in every phase, start-up included); SIGHUP reloads."""
    raise_nofile_limit()  # before the listener budget is derived from it
    appliance = Appliance(config, config_path, builtin_default=config_path is None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(appliance.reload()))
    # Start-up can wait (a catalog another process holds locked, a control node that does not
    # answer): a stop signal is heard then too, not only once start-up is done.
    starting = asyncio.create_task(appliance.start(), name="start-up")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            log.warning("start-up interrupted", extra={"reason": "SIGTERM or SIGINT"})
            await appliance.stop()
            return 0
        try:
            starting.result()
        except StartupError:
            # the CLI prints the one-line reason
            await appliance.stop()
            raise
    finally:
        if not stopping.done():
            stopping.cancel()
    where = (
        f"API {appliance.api_url}"
        if appliance.api_address
        else f"agent of control node {config.agent.control}"
    )
    print(f"isthmus: cluster {config.cluster} running; {where}, pid {os.getpid()}", flush=True)
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
