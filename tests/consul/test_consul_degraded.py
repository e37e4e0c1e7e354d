"""Consul away (stopped, 5xx, hung, an empty answer): the catalog keeps serving what it last saw,
says it is stale, logs once per change, and recovers by itself. Also: connecting (token file,
TLS), the snapshot for a start without Consul, and health checks left to Consul."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from discovery.consul.client import ConsulOptions
from discovery.consul.snapshot import FILE_NAME
from discovery.health import HealthChecker
from discovery.model import Health
from discovery.names import ServiceKey
from tests.consul_standin.fixture import standin_host
from tests.consul_standin.standin import ConsulStandIn, Policy
from tests.consul_standin.tls import make_tls

from .helpers import foreign, open_catalog, until, workload

STALE_LOG = "consul unreachable: serving the last-known catalog, marked stale"
FRESH_LOG = "consul answers again: catalog fresh"


def failed_probes() -> float:
    return REGISTRY.get_sample_value(
        "isthmus_consul_requests_total", {"endpoint": "status/leader", "outcome": "unavailable"}
    ) or 0.0


def messages(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.getMessage() == text)


async def test_consul_stopped_then_started(standin: ConsulStandIn,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="discovery.consul")
    foreign(standin, "vm-1", "web-1", "web", "127.0.0.5", 80)
    c = await open_catalog(standin)
    try:
        before = list(c.workloads())
        probes = failed_probes()
        await standin.stop()
        await until(lambda: c.report()["stale"], "marked stale")
        assert "cannot connect" in c.report()["consul"]["reason"]
        await until(lambda: failed_probes() >= probes + 3, "several failed retries")
        assert c.workloads() == before  # nothing dropped
        assert messages(caplog, STALE_LOG) == 1  # once per state change, not per retry
        foreign(standin, "vm-2", "web-2", "web", "127.0.0.6", 80)  # changed while away
        await standin.start()
        await until(lambda: not c.report()["stale"], "fresh again")
        await until(lambda: len(c.workloads(ServiceKey("web"))) == 2, "the change made meanwhile")
        assert messages(caplog, FRESH_LOG) == 1
        assert messages(caplog, STALE_LOG) == 1
    finally:
        await c.close()


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_answers(standin: ConsulStandIn, status: int) -> None:
    foreign(standin, "vm-1", "web-1", "web", "127.0.0.5", 80)
    c = await open_catalog(standin)
    try:
        standin.fail_with(status)
        await until(lambda: c.report()["stale"], "marked stale")
        assert str(status) in c.report()["consul"]["reason"]
        assert len(c.workloads()) == 1
        standin.fail_with(None)
        await until(lambda: not c.report()["stale"], "fresh again")
    finally:
        await c.close()


async def test_a_hung_consul_is_noticed_and_left_behind(standin: ConsulStandIn) -> None:
    foreign(standin, "vm-1", "web-1", "web", "127.0.0.5", 80)
    c = await open_catalog(standin, request_timeout=0.5)
    try:
        standin.hang()
        await until(lambda: c.report()["stale"], "a hung Consul marked stale")
        assert "no answer within" in c.report()["consul"]["reason"]
        assert len(c.workloads()) == 1
        foreign(standin, "vm-2", "web-2", "web", "127.0.0.6", 80)
        standin.hang(False)
        await until(lambda: not c.report()["stale"], "fresh again")
        await until(lambda: len(c.workloads()) == 2, "the change made while hung")
    finally:
        await c.close()


async def test_an_empty_answer_never_drops_every_endpoint() -> None:
    policies = {"t": Policy(read=True, write=True)}
    s = ConsulStandIn(standin_host(), acl_tokens=policies)
    await s.start()
    try:
        foreign(s, "vm-1", "web-1", "web", "127.0.0.5", 80)
        c = await open_catalog(s, token="t")
        try:
            assert len(c.workloads()) == 1
            policies["t"] = Policy(read=False, write=False)  # the token lost service:read
            foreign(s, "vm-2", "web-2", "other", "127.0.0.6", 80)  # wakes the watch
            await until(lambda: c.report()["stale"], "an empty catalog is suspect")
            assert "lists no services" in c.report()["consul"]["reason"]
            assert len(c.workloads()) == 1
            policies["t"] = Policy(read=True, write=True)
            foreign(s, "vm-3", "web-3", "web", "127.0.0.7", 80)
            await until(lambda: len(c.workloads()) == 3, "reading again")
            await until(lambda: not c.report()["stale"], "fresh again")
        finally:
            await c.close()
    finally:
        await s.stop()


async def test_a_start_without_consul_serves_the_last_known_catalog(
    standin: ConsulStandIn, tmp_path: Path
) -> None:
    foreign(standin, "vm-1", "web-1", "web", "127.0.0.5", 80)
    c = await open_catalog(standin, data_dir=tmp_path)
    vip = await c.vip("web.default")
    await c.close()  # saves what it saw
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600
    await standin.stop()
    c = await open_catalog(standin, data_dir=tmp_path)
    try:
        assert [st.workload.id for st in c.workloads()] == ["consul:vm-1:web-1"]
        assert c.known_vip("web.default") == vip
        report = c.report()
        assert report["stale"] and report["consul"]["from_snapshot"]
        await standin.start()
        await until(lambda: not c.report()["stale"], "fresh once Consul answers")
    finally:
        await c.close()


async def test_a_damaged_snapshot_is_ignored(standin: ConsulStandIn, tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text("{not json")
    await standin.stop()
    c = await open_catalog(standin, data_dir=tmp_path)
    try:
        assert c.workloads() == [] and c.report()["stale"]
    finally:
        await c.close()


async def test_the_acl_token_is_sent_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    secret = "9f3c1c5e-token-that-must-not-leak"
    policies = {secret: Policy(read=True, write=True)}
    s = ConsulStandIn(standin_host(), acl_tokens=policies)
    await s.start()
    caplog.set_level(logging.DEBUG)
    try:
        c = await open_catalog(s, token=secret)
        try:
            await c.put(workload("api-1"))
            assert all(e.token for e in s.log)
            del policies[secret]  # revoked: every request is now "ACL not found"
            await until(lambda: c.report()["stale"], "refused requests")
            assert "ACL not found" in c.report()["consul"]["reason"]
            with pytest.raises(Exception, match="ACL"):
                await c.put(workload("api-2"))
            assert secret not in repr(c.options)
            assert secret not in str(c.report())
        finally:
            await c.close()
    finally:
        await s.stop()
    for r in caplog.records:
        assert secret not in r.getMessage()
        assert secret not in str(r.__dict__)


async def test_tls_to_consul_with_a_client_certificate(tmp_path: Path) -> None:
    host = standin_host()
    tls = make_tls(tmp_path, host)
    s = ConsulStandIn(host, ssl_context=tls.server)
    await s.start()
    try:
        foreign(s, "vm-1", "web-1", "web", "127.0.0.5", 80)
        c = await open_catalog(s, ca_file=tls.ca_file, cert_file=tls.cert_file,
                               key_file=tls.key_file)
        try:
            assert len(c.workloads()) == 1 and not c.report()["stale"]
        finally:
            await c.close()
        # without the client certificate Consul (verify_incoming) refuses the handshake
        c = await open_catalog(s, ca_file=tls.ca_file)
        try:
            assert c.report()["stale"] and c.workloads() == []
        finally:
            await c.close()
    finally:
        await s.stop()


async def test_consul_runs_the_checks_and_isthmus_does_not_probe(standin: ConsulStandIn
                                                                 ) -> None:
    agents: list[str] = []

    async def healthz(request: web.Request) -> web.Response:
        agents.append(request.headers.get("User-Agent", ""))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, standin.host, 0).start()
    port = runner.addresses[0][1]
    c = await open_catalog(standin)
    checker = HealthChecker(c, min_interval=0.05)
    await checker.start()
    try:
        url = f"http://{standin.host}:{port}/healthz"
        await c.put(workload("api-1", address=standin.host, ports={"http": port},
                             check={"http": url, "interval": "1s", "timeout": "1s"}),
                    owners=("api",))
        await until(lambda: c.get("api-1").health is Health.PASSING, "Consul's check passing")
        await until(lambda: len(agents) >= 3, "several of Consul's probes")
        assert checker.tracked == 0
        assert not any(a.startswith("isthmus-health") for a in agents)
        # a TTL heartbeat through the checker reaches Consul's agent
        await c.put(workload("api-2", check={"ttl": "30s"}))
        st = await checker.heartbeat("api-2")
        assert st.health is Health.PASSING
        assert standin.agent_checks()["service:api-2"].status == "passing"
    finally:
        await checker.stop()
        await c.close()
        await runner.cleanup()


def test_options_never_show_the_token() -> None:
    o = ConsulOptions(token="s3cret")
    assert "s3cret" not in repr(o) and "s3cret" not in str(o)


async def test_4xx_is_a_refusal_not_an_outage(standin: ConsulStandIn) -> None:
    from discovery.consul.client import ConsulRefused, call, make_client
    client = make_client(ConsulOptions(address=standin.address))
    try:
        with pytest.raises(ConsulRefused, match="413"):  # KV values are at most 512 kB
            await call("kv", client.kv.put("isthmus/big", "x" * 600_000), 2)
    finally:
        await client.close()


@pytest.mark.parametrize("wait", [300.0, 600.0])
async def test_the_http_client_outlasts_the_longest_blocking_query(wait: float) -> None:
    """aiohttp gives a session 300 s in total by default: a blocking query of the default
    5 minutes plus Consul's wait/16 of jitter was cut by the client and read as an outage."""
    from discovery.consul.client import make_client
    o = ConsulOptions(wait=wait, request_timeout=10.0)
    client = make_client(o)
    try:
        total = client.http._session.timeout.total
        assert total is None or total > wait + wait / 16 + o.request_timeout
    finally:
        await client.close()


@pytest.mark.parametrize(("missed", "reissued"), [(1, False), (3, True)])
async def test_only_an_outage_re_issues_every_query(standin: ConsulStandIn, missed: int,
                                                    reissued: bool) -> None:
    """One slow or failed liveness probe re-issues only the queries that failed (with 5,000
    services, re-issuing all of them after one slow probe fed the overload that slowed it);
    after an outage (probes failed in a row) every query is re-issued."""
    for n in range(10):
        foreign(standin, f"vm-{n}", f"s{n}-1", f"s{n}", f"127.0.3.{n + 1}", 80)
    c = await open_catalog(standin, wait=60.0)
    try:
        await until(lambda: standin.requests["GET health/service"] == 20, "blocking queries")
        standin.fail_next("GET status/leader", missed)
        await until(lambda: c.report()["stale"], "the failed probe")
        await until(lambda: not c.report()["stale"], "fresh again")
        await asyncio.sleep(0.3)
        after = standin.requests["GET health/service"]
        assert (after > 20) is reissued, after
    finally:
        await c.close()
