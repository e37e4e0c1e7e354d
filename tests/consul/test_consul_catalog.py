"""ConsulCatalog against the Consul stand-in: reading with blocking queries, registering through
the agent, ownership, VIPs, health."""

from __future__ import annotations

import asyncio
import json

import pytest

from discovery.errors import Conflict, InvalidInput, NotFound, StoreError
from discovery.model import Health
from discovery.names import ServiceKey
from tests.consul_standin.fixture import standin_host
from tests.consul_standin.standin import ConsulStandIn

from .helpers import foreign, open_catalog, until, workload


async def test_reads_the_catalog_and_follows_changes(standin: ConsulStandIn) -> None:
    foreign(standin, "vm-1", "web-1", "web", "127.0.0.5", 8080,
            node_meta={"region": "eu", "zone": "eu-1"}, Meta={"isthmus-port": "http"})
    c = await open_catalog(standin)
    try:
        (st,) = c.workloads(ServiceKey("web"))
        w = st.workload
        assert (w.id, w.address, dict(w.ports)) == ("consul:vm-1:web-1", "127.0.0.5",
                                                    {"http": 8080})
        assert (w.locality.region, w.locality.zone, w.source) == ("eu", "eu-1", "consul:vm-1")
        assert st.health is Health.PASSING
        assert c.report()["stale"] is False
        index = c.index
        foreign(standin, "vm-2", "web-2", "web", "127.0.0.6", 8080)
        await until(lambda: len(c.workloads(ServiceKey("web"))) == 2, "the new instance")
        assert c.changes_since(index) == {"consul:vm-2:web-2"}
        standin.register_entity({"Node": "vm-1", "Address": "127.0.0.5", "SkipNodeUpdate": True,
                                 "Check": {"CheckID": "serfHealth", "Name": "Serf Health Status",
                                           "Status": "critical", "Output": "gone"}})
        await until(lambda: c.get("consul:vm-1:web-1").health is Health.CRITICAL,
                    "a critical node check")
        assert c.get("consul:vm-1:web-1").output == "Serf Health Status: gone"
        standin.deregister_entity({"Node": "vm-2", "ServiceID": "web-2"})
        await until(lambda: len(c.workloads(ServiceKey("web"))) == 1, "the instance removed")
    finally:
        await c.close()


async def test_only_the_changed_service_is_read_again(standin: ConsulStandIn) -> None:
    for n in range(20):
        foreign(standin, f"vm-{n}", f"svc{n}-1", f"svc{n}", f"127.0.1.{n + 1}", 80)
    c = await open_catalog(standin, wait=60.0)  # no blocking query returns by itself here
    try:
        await until(lambda: len(c.workloads()) == 20, "20 services")
        # each service: its first read, then its blocking query, now held by the stand-in
        await until(lambda: standin.requests["GET health/service"] == 40, "20 blocking queries")
        before = standin.requests["GET health/service"]
        foreign(standin, "vm-x", "svc7-2", "svc7", "127.0.2.1", 80)
        await until(lambda: len(c.workloads(ServiceKey("svc7"))) == 2, "svc7's new instance")
        await asyncio.sleep(0.2)
        # one watch returned and was re-issued: the other 19 services were not read again
        assert standin.requests["GET health/service"] - before == 1
    finally:
        await c.close()


async def test_an_index_that_goes_backwards_starts_a_fresh_read(standin: ConsulStandIn) -> None:
    foreign(standin, "vm-1", "web-1", "web", "127.0.0.5", 80)
    old = standin.snapshot()
    c = await open_catalog(standin, wait=1.0)
    try:
        foreign(standin, "vm-2", "web-2", "web", "127.0.0.6", 80)
        await until(lambda: len(c.workloads()) == 2, "two instances")
        standin.restore(old)  # web-2 never happened; every index is lower
        # a blocking query on the higher index returns at its wait; the lower index it then
        # sees resets it, and the fresh read drops web-2
        await until(lambda: len(c.workloads()) == 1, "the restored catalog")
        foreign(standin, "vm-3", "web-3", "web", "127.0.0.7", 80)
        await until(lambda: len(c.workloads()) == 2, "changes after the reset")
    finally:
        await c.close()


async def test_warning_is_configurable(standin: ConsulStandIn) -> None:
    check = {"CheckID": "c1", "Name": "load", "Status": "warning", "ServiceID": "web-1",
             "Output": "busy"}
    foreign(standin, "vm-1", "web-1", "web", "127.0.0.5", 80, checks=[check],
            Weights={"Passing": 10, "Warning": 2})
    from discovery.consul.mapping import MappingRules
    passing = await open_catalog(standin)
    critical = await open_catalog(standin, rules=MappingRules("east", warning_is=Health.CRITICAL))
    try:
        (a,), (b,) = passing.workloads(), critical.workloads()
        assert (a.health, a.workload.weight) == (Health.PASSING, 2)
        assert (b.health, b.output) == (Health.CRITICAL, "load: busy")
    finally:
        await passing.close()
        await critical.close()


async def test_unmappable_instances_are_skipped_and_reported(standin: ConsulStandIn) -> None:
    foreign(standin, "vm-1", "db-1", "db", "db.internal", 5432)
    foreign(standin, "vm-2", "db-2", "db", "127.0.0.6", 5432)
    c = await open_catalog(standin)
    try:
        assert [st.workload.id for st in c.workloads()] == ["consul:vm-2:db-2"]
        consul_report = c.report()["consul"]
        (skipped,) = consul_report["skipped"]
        assert skipped["service"] == "db" and skipped["instance"] == "db-1"
        assert "IP address" in skipped["reason"]
    finally:
        await c.close()


async def test_consuls_own_service_is_ignored_by_default(standin: ConsulStandIn) -> None:
    foreign(standin, "server-1", "consul", "consul", "127.0.0.2", 8300)
    c = await open_catalog(standin)
    try:
        assert c.workloads() == []
    finally:
        await c.close()


# --- registering ----------------------------------------------------------------------------------


async def test_a_registration_goes_to_the_agent_with_its_check(standin: ConsulStandIn) -> None:
    c = await open_catalog(standin)
    try:
        w = workload("api-1", labels={"version": "v2"},
                     check={"http": "http://127.0.0.9:8080/healthz", "interval": "5s",
                            "timeout": "1s", "failure_threshold": 3, "deregister_after": "10m"})
        st = await c.put(w, owners=("api",))
        assert st.health is Health.UNKNOWN  # not checked yet
        assert c.get("api-1").workload == w  # read-your-writes
        svc = standin.agent_services()["api-1"]
        assert (svc.name, svc.address, svc.port, svc.tags) == ("api", "127.0.0.9", 8080,
                                                                ["version=v2"])
        assert svc.meta["isthmus-source"] == "api" and svc.meta["isthmus-namespace"] == "default"
        chk = standin.agent_checks()["service:api-1"]
        assert (chk.type, chk.definition["HTTP"], chk.interval, chk.timeout) == (
            "http", "http://127.0.0.9:8080/healthz", 5.0, 1.0)
        assert (chk.failures_before, chk.deregister_after) == (3, 600.0)
        owner = json.loads(standin.state.kv["isthmus/east/owners/api-1"].value)
        assert (owner["source"], owner["node"]) == ("api", standin.node_name)
        # Consul's agent runs the check (nothing listens: critical), and the catalog follows
        await until(lambda: c.get("api-1").health is Health.CRITICAL, "Consul's check result")
        assert c.get("api-1").workload == w
        assert c.report()["consul"]["pending_writes"] == 0
    finally:
        await c.close()


async def test_ttl_heartbeats_pass_through_to_the_agent(standin: ConsulStandIn) -> None:
    c = await open_catalog(standin)
    try:
        await c.put(workload("api-1", check={"ttl": "30s"}))
        await until(lambda: c.get("api-1").health is Health.CRITICAL, "TTL not passed yet")
        st = await c.heartbeat("api-1")
        assert st.health is Health.PASSING
        assert standin.agent_checks()["service:api-1"].status == "passing"
        await until(lambda: c.get("api-1").health is Health.PASSING, "the heartbeat in a read")
        await c.put(workload("api-2"))
        with pytest.raises(InvalidInput, match="no TTL check"):
            await c.heartbeat("api-2")
        with pytest.raises(NotFound):
            await c.heartbeat("nope")
    finally:
        await c.close()


async def test_deregistration(standin: ConsulStandIn) -> None:
    c = await open_catalog(standin)
    try:
        await c.put(workload("api-1"))
        await until(lambda: c.report()["consul"]["pending_writes"] == 0, "the write seen")
        await c.delete("api-1", owners=("api",))
        with pytest.raises(NotFound):
            c.get("api-1")
        assert "api-1" not in standin.agent_services()
        assert "isthmus/east/owners/api-1" not in standin.state.kv
        await until(lambda: c.report()["consul"]["pending_writes"] == 0, "the removal seen")
        with pytest.raises(NotFound):
            c.get("api-1")
        with pytest.raises(NotFound):
            await c.delete("api-1")
    finally:
        await c.close()


async def test_an_agent_may_only_change_what_it_registered(standin: ConsulStandIn) -> None:
    agent = "spiffe://mesh.test/cluster/east/agent/vm-1"
    c = await open_catalog(standin)
    try:
        await c.put(workload("w1", source=agent), owners=(agent,))
        with pytest.raises(Conflict, match=f"belongs to {agent}"):
            await c.put(workload("w1", source="api"), owners=("api",))
        with pytest.raises(Conflict, match=f"belongs to {agent}"):
            await c.delete("w1", owners=("api",))
        other = "spiffe://mesh.test/cluster/east/agent/vm-2"
        with pytest.raises(Conflict):
            await c.put(workload("w1", source=other), owners=(other,))
        assert c.get("w1").workload.source == agent
        await c.put(workload("w1", source=agent, weight=3), owners=(agent,))
        await c.delete("w1")  # unconditional (the API's DELETE): any owner
        assert "w1" not in standin.agent_services()
    finally:
        await c.close()


async def test_of_two_replicas_racing_for_a_new_id_exactly_one_wins(standin: ConsulStandIn
                                                                    ) -> None:
    a, b = await open_catalog(standin), await open_catalog(standin)
    agent = "spiffe://mesh.test/cluster/east/agent/vm-1"
    try:
        for n in range(10):
            wid = f"race-{n}"
            results = await asyncio.gather(
                a.put(workload(wid, source="api"), owners=("api",)),
                b.put(workload(wid, source=agent), owners=(agent,)),
                return_exceptions=True,
            )
            won = [r for r in results if not isinstance(r, BaseException)]
            lost = [r for r in results if isinstance(r, BaseException)]
            assert len(won) == 1 and len(lost) == 1, results
            assert isinstance(lost[0], Conflict)
            owner = json.loads(standin.state.kv[f"isthmus/east/owners/{wid}"].value)["source"]
            assert standin.agent_services()[wid].meta["isthmus-source"] == owner
    finally:
        await a.close()
        await b.close()


async def test_consul_services_registered_outside_isthmus_are_read_only(standin: ConsulStandIn
                                                                        ) -> None:
    foreign(standin, "vm-1", "web-1", "web", "127.0.0.5", 80)
    c = await open_catalog(standin)
    try:
        with pytest.raises(Conflict, match="outside Isthmus"):
            await c.delete("consul:vm-1:web-1")
        with pytest.raises(Conflict, match="outside Isthmus"):
            await c.put(workload("consul:vm-1:web-1"))
        await c.set_health("consul:vm-1:web-1", Health.CRITICAL, "ignored")
        assert standin.requests["PUT agent/service/maintenance"] == 0
    finally:
        await c.close()


async def test_held_critical_is_the_agents_maintenance_mode(standin: ConsulStandIn) -> None:
    c = await open_catalog(standin)
    try:
        await c.put(workload("w1"))
        await until(lambda: c.get("w1").health is Health.PASSING, "no check: passing")
        await c.set_health("w1", Health.CRITICAL, "agent vm-1 disconnected")
        assert "_service_maintenance:w1" in standin.agent_checks()
        await until(lambda: c.get("w1").health is Health.CRITICAL, "held critical")
        assert c.get("w1").output == "Service Maintenance Mode: agent vm-1 disconnected"
        await c.set_health("w1", Health.PASSING)
        assert "_service_maintenance:w1" not in standin.agent_checks()
        await until(lambda: c.get("w1").health is Health.PASSING, "released")
    finally:
        await c.close()


async def test_a_write_while_consul_is_away_fails_clearly(standin: ConsulStandIn) -> None:
    c = await open_catalog(standin)
    try:
        await standin.stop()
        with pytest.raises(StoreError, match="cannot connect"):
            await c.put(workload("api-1"))
        with pytest.raises(NotFound):
            c.get("api-1")
    finally:
        await c.close()


async def test_datacenter_mismatch_refuses_to_start(standin: ConsulStandIn) -> None:
    with pytest.raises(StoreError, match="datacenter is 'dc9'"):
        await open_catalog(standin, datacenter="dc9")


# --- VIPs -----------------------------------------------------------------------------------------


async def test_vips_agree_across_replicas_and_restarts(standin: ConsulStandIn) -> None:
    keys = [f"svc{n}.default" for n in range(30)] + ["svc0.default.east"]
    a, b = await open_catalog(standin), await open_catalog(standin)
    try:
        got_a, got_b = await asyncio.gather(
            asyncio.gather(*(a.vip(k) for k in keys)),
            asyncio.gather(*(b.vip(k) for k in reversed(keys))),
        )
        assert got_a == list(reversed(got_b))
        assert len(set(got_a)) == len(keys)  # no two keys share an address
    finally:
        await a.close()
        await b.close()
    c = await open_catalog(standin)
    try:
        assert [c.known_vip(k) for k in keys] == got_a  # loaded at start: stable forever
    finally:
        await c.close()


async def test_the_vip_range_runs_out_cleanly(standin: ConsulStandIn) -> None:
    from discovery.errors import VipExhausted
    c = await open_catalog(standin, vip_cidr="127.250.0.0/30")  # 2 usable addresses
    try:
        await c.vip("a.default")
        await c.vip("b.default")
        with pytest.raises(VipExhausted):
            await c.vip("c.default")
    finally:
        await c.close()


async def test_stale_reads_ask_any_server(standin: ConsulStandIn) -> None:
    foreign(standin, "vm-1", "web-1", "web", "127.0.0.5", 80)
    c = await open_catalog(standin, stale_reads=True)
    try:
        reads = [e for e in standin.log if e.method == "GET" and e.endpoint in
                 ("GET catalog/services", "GET health/service")]
        assert reads and all(e.query.get("stale") == "1" for e in reads)
    finally:
        await c.close()


async def test_a_second_standin_address_is_its_own_catalog() -> None:
    s = ConsulStandIn(standin_host(), datacenter="dc2")
    await s.start()
    try:
        c = await open_catalog(s)
        try:
            assert c.report()["consul"]["datacenter"] == "dc2"
        finally:
            await c.close()
    finally:
        await s.stop()


async def test_vm_agents_register_through_their_channel_into_consul(standin: ConsulStandIn
                                                                    ) -> None:
    from discovery.health import HealthChecker
    from federation.agentlink import _handle
    from federation.trust.spiffe import Kind, SpiffeId

    vm1 = SpiffeId.for_node("mesh.test", "east", Kind.AGENT, "vm-1")
    vm2 = SpiffeId.for_node("mesh.test", "east", Kind.AGENT, "vm-2")
    body = {"service": "web", "address": "127.0.0.21", "ports": {"http": 80},
            "check": {"tcp": "127.0.0.21:80", "interval": "10s"}}
    c = await open_catalog(standin)
    checker = HealthChecker(c)
    await checker.start()
    try:
        def msg(kind: str, **more: object) -> str:
            return json.dumps({"type": kind, "id": "web-vm1", **more})

        reply = await _handle(c, "east", vm1, msg("register", workload=body))
        assert reply["ok"], reply
        assert standin.agent_services()["web-vm1"].meta["isthmus-source"] == str(vm1)
        assert standin.agent_checks()["service:web-vm1"].type == "tcp"
        reply = await _handle(c, "east", vm2, msg("register", workload=body))
        assert not reply["ok"] and "belongs to" in reply["error"]
        reply = await _handle(c, "east", vm2, msg("deregister"))
        assert not reply["ok"] and "belongs to" in reply["error"]
        # the agent's channel drops: its workloads are held critical, in Consul
        checker.source_down(str(vm1), "agent vm-1 disconnected")
        await until(lambda: "_service_maintenance:web-vm1" in standin.agent_checks(),
                    "maintenance mode on")
        checker.source_up(str(vm1))
        await until(lambda: "_service_maintenance:web-vm1" not in standin.agent_checks(),
                    "maintenance mode off")
        reply = await _handle(c, "east", vm1, msg("leave"))
        assert reply["removed"] == ["web-vm1"]
        assert "web-vm1" not in standin.agent_services()
    finally:
        await checker.stop()
        await c.close()


async def test_a_write_is_shown_until_the_catalog_shows_it(standin: ConsulStandIn) -> None:
    foreign(standin, "vm-1", "api-0", "api", "127.0.0.5", 80)
    c = await open_catalog(standin)
    try:
        standin.sync_delay = 0.5  # anti-entropy takes a while
        await c.put(workload("api-1"))
        # another change to the service wakes its watch before our write reached the catalog
        foreign(standin, "vm-2", "api-2", "api", "127.0.0.6", 80)
        await until(lambda: len(c.workloads(ServiceKey("api"))) == 3, "the other change")
        assert c.report()["consul"]["pending_writes"] == 1
        c.get("api-1")  # still shown: the read that missed it did not remove it
        await until(lambda: c.report()["consul"]["pending_writes"] == 0, "our write in a read")
        assert c.get("api-1").workload == workload("api-1")
        await c.delete("api-1")
        foreign(standin, "vm-3", "api-3", "api", "127.0.0.7", 80)
        await until(lambda: len(c.workloads(ServiceKey("api"))) == 3, "the next change")
        with pytest.raises(NotFound):
            c.get("api-1")  # not shown again by a read from before the deregistration landed
        await until(lambda: c.report()["consul"]["pending_writes"] == 0, "the removal in a read")
        with pytest.raises(NotFound):
            c.get("api-1")
    finally:
        await c.close()


async def test_more_services_than_connections_take_turns(standin: ConsulStandIn,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    for n in range(12):
        foreign(standin, f"vm-{n}", f"t{n}-1", f"t{n}", f"127.0.4.{n + 1}", 80)
    c = await open_catalog(standin, max_connections=16, wait=2.0)  # 8 watch connections
    try:
        assert len(c.workloads()) == 12  # every service read all the same
        report = c.report()["consul"]
        assert (report["services_watched"], report["watch_connections"]) == (12, 8)
        assert sum("take turns" in r.getMessage() for r in caplog.records) == 1
        foreign(standin, "vm-x", "t3-2", "t3", "127.0.4.99", 80)
        await until(lambda: len(c.workloads(ServiceKey("t3"))) == 2, "a change, in turn")
    finally:
        await c.close()
