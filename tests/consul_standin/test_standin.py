"""The Consul stand-in keeps Consul's documented semantics, checked with py-consul (the real
client) so that the wire format is the library's, and against the documentation's examples."""

from __future__ import annotations

import asyncio
import copy

import consul
import pytest
from aiohttp import web

from tests.consul_standin import fixtures
from tests.consul_standin.fixture import client_for, standin_host
from tests.consul_standin.standin import ConsulStandIn, Policy


async def test_catalog_register_example_reads_back_like_the_health_example(standin) -> None:
    standin.register_entity(copy.deepcopy(fixtures.CATALOG_REGISTER_PAYLOAD))
    c = client_for(standin)
    try:
        index, services = await c.catalog.services()
        assert services["redis"] == ["primary", "v1"]
        assert int(index) > 0
        _, entries = await c.health.service("redis")
    finally:
        await c.close()
    (entry,) = entries
    doc = fixtures.HEALTH_SERVICE_RESPONSE[0]
    # the same shape as the documented response, key for key
    for part in ("Node", "Service"):
        assert set(doc[part]) - {"Namespace"} <= set(entry[part]), part
    assert set(doc["Checks"][0]) - {"Namespace"} <= set(entry["Checks"][0])
    assert entry["Node"]["Node"] == "t2.320"
    assert entry["Node"]["Meta"] == {"somekey": "somevalue"}
    assert entry["Service"]["TaggedAddresses"]["lan"] == {"Address": "127.0.0.1", "Port": 8000}
    assert [ch["CheckID"] for ch in entry["Checks"]] == ["service:redis1"]
    assert entry["Checks"][0]["Definition"]["TCP"] == "localhost:8888"


async def test_catalog_deregister_example_removes_the_instance(standin) -> None:
    standin.register_entity(copy.deepcopy(fixtures.CATALOG_REGISTER_PAYLOAD))
    c = client_for(standin)
    try:
        p = fixtures.CATALOG_DEREGISTER_SERVICE_PAYLOAD
        assert await c.catalog.deregister(p["Node"], service_id=p["ServiceID"])
        _, entries = await c.health.service("redis")
        _, services = await c.catalog.services()
    finally:
        await c.close()
    assert entries == []
    assert "redis" not in services


async def test_agent_self_and_leader_answer_like_the_examples(standin) -> None:
    c = client_for(standin)
    try:
        me = await c.agent.self()
        leader = await c.status.leader()
    finally:
        await c.close()
    assert set(fixtures.AGENT_SELF_CONFIG) <= set(me["Config"])
    assert me["Config"]["NodeName"] == standin.node_name
    assert isinstance(leader, str) and leader.endswith(":8300")


async def test_a_blocking_read_returns_on_a_change_with_a_higher_index(standin) -> None:
    c = client_for(standin)
    try:
        index, _ = await c.catalog.services()
        waiting = asyncio.create_task(c.catalog.services(index=index, wait="30s"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # it blocks: nothing changed yet
        assert await c.agent.service.register("web", service_id="web-1", port=80)
        async with asyncio.timeout(10):
            new_index, services = await waiting
    finally:
        await c.close()
    assert int(new_index) > int(index)
    assert "web" in services


async def test_a_change_to_one_service_does_not_move_anothers_index(standin) -> None:
    c = client_for(standin)
    try:
        await c.agent.service.register("a", service_id="a-1", port=80)
        await c.agent.service.register("b", service_id="b-1", port=80)
        a_index, _ = await c.health.service("a")
        b_index, _ = await c.health.service("b")
        blocked = asyncio.create_task(c.health.service("a", index=a_index, wait="1s"))
        await c.agent.service.register("b", service_id="b-2", port=81)
        async with asyncio.timeout(10):
            after, entries = await blocked
        b_after, b_entries = await c.health.service("b")
    finally:
        await c.close()
    assert after == a_index and len(entries) == 1  # returned at its wait, unchanged
    assert int(b_after) > int(b_index) and len(b_entries) == 2


async def test_a_restored_snapshot_sends_the_index_backwards(standin) -> None:
    c = client_for(standin)
    try:
        await c.agent.service.register("web", service_id="web-1", port=80)
        old = standin.snapshot()
        await c.agent.service.register("web", service_id="web-2", port=80)
        high, _ = await c.health.service("web")
        standin.restore(old)
        # a client blocking with its (now too high) index waits out its wait, then sees the
        # lower index: the case Consul's docs tell clients to reset on
        async with asyncio.timeout(10):
            low, entries = await c.health.service("web", index=high, wait="1s")
    finally:
        await c.close()
    assert int(low) < int(high)
    assert [e["Service"]["ID"] for e in entries] == ["web-1"]


async def test_agent_registration_takes_snake_case_and_runs_a_ttl_check(standin) -> None:
    c = client_for(standin)
    try:
        ok = await c.agent.service.register(
            "api", service_id="api-1", address="127.0.0.1", port=8080,
            tagged_addresses={"grpc": {"address": "127.0.0.1", "port": 9090}},
            check={"CheckID": "service:api-1", "Name": "ttl", "TTL": "30s",
                   "DeregisterCriticalServiceAfter": "1m"},
        )
        assert ok
        _, (entry,) = await c.health.service("api")
        assert entry["Service"]["TaggedAddresses"]["grpc"] == {"Address": "127.0.0.1",
                                                               "Port": 9090}
        statuses = {ch["CheckID"]: ch["Status"] for ch in entry["Checks"]}
        assert statuses == {"service:api-1": "critical", "serfHealth": "passing"}
        assert await c.agent.check.ttl_pass("service:api-1", notes="alive")
        _, (entry,) = await c.health.service("api")
        check = next(ch for ch in entry["Checks"] if ch["CheckID"] == "service:api-1")
        assert (check["Status"], check["Output"], check["Type"]) == ("passing", "alive", "ttl")
        assert check["Definition"]["DeregisterCriticalServiceAfter"] == "1m0s"
        assert await c.agent.service.maintenance("api-1", True, reason="held by a test")
        _, held = await c.health.service("api")
        _, passing = await c.health.service("api", passing=True)
    finally:
        await c.close()
    maintenance = next(
        ch for ch in held[0]["Checks"] if ch["CheckID"] == "_service_maintenance:api-1")
    assert (maintenance["Status"], maintenance["Notes"]) == ("critical", "held by a test")
    assert passing == []


async def test_the_documented_register_payload_and_its_script_check(standin) -> None:
    c = client_for(standin)
    payload = copy.deepcopy(fixtures.AGENT_SERVICE_REGISTER_PAYLOAD)
    try:
        # the stand-in runs no scripts, and says so
        with pytest.raises(consul.base.ConsulException, match="only HTTP, TCP and TTL"):
            await c.agent.service.register(
                payload["Name"], service_id=payload["ID"], port=payload["Port"],
                check=payload["Check"])
        check = {"TTL": "10s", "DeregisterCriticalServiceAfter": "90m"}
        assert await c.agent.service.register(
            payload["Name"], service_id=payload["ID"], address=payload["Address"],
            port=payload["Port"], tags=payload["Tags"], meta=payload["Meta"],
            weights=payload["Weights"], check=check)
        _, (entry,) = await c.health.service("redis")
    finally:
        await c.close()
    assert entry["Service"]["Weights"] == {"Passing": 10, "Warning": 1}
    assert entry["Service"]["Meta"] == {"redis_version": "4.0"}
    assert [ch["CheckID"] for ch in entry["Checks"]] == ["serfHealth", "service:redis1"]


async def test_an_http_check_is_run_by_the_agent(standin) -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    host = standin.host
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    c = client_for(standin)
    try:
        await c.agent.service.register(
            "web", service_id="web-1", address=host, port=port,
            check=consul.Check.http(f"http://{host}:{port}/healthz", "100ms", timeout="1s"))

        async def passing() -> bool:
            _, entries = await c.health.service("web", passing=True)
            return bool(entries)

        async with asyncio.timeout(10):
            while not await passing():
                await asyncio.sleep(0.05)
    finally:
        await c.close()
        await runner.cleanup()


async def test_a_critical_service_is_reaped_after_its_deregister_time() -> None:
    s = ConsulStandIn(standin_host(), reap_floor=0.2)  # Consul's floor is a minute
    await s.start()
    c = client_for(s)
    try:
        await c.agent.service.register(
            "web", service_id="web-1", port=80,
            check={"TTL": "10s", "DeregisterCriticalServiceAfter": "200ms"})
        async with asyncio.timeout(10):
            while (await c.health.service("web"))[1]:
                await asyncio.sleep(0.05)
    finally:
        await c.close()
        await s.stop()


async def test_kv_check_and_set(standin) -> None:
    c = client_for(standin)
    try:
        assert await c.kv.put("isthmus/x", "1", cas=0)
        assert not await c.kv.put("isthmus/x", "2", cas=0)  # exists: a new-only write fails
        _, entry = await c.kv.get("isthmus/x")
        assert entry["Value"] == b"1"
        assert not await c.kv.put("isthmus/x", "3", cas=entry["ModifyIndex"] + 1)
        assert await c.kv.put("isthmus/x", "3", cas=entry["ModifyIndex"])
        _, entries = await c.kv.get("isthmus/", recurse=True)
        assert [e["Key"] for e in entries] == ["isthmus/x"]
        _, missing = await c.kv.get("isthmus/none")
        assert missing is None
        assert set(fixtures.KV_READ_RESPONSE[0]) <= set(entries[0])
    finally:
        await c.close()


async def test_acl_tokens_are_checked() -> None:
    s = ConsulStandIn(standin_host(), acl_tokens={"w": Policy(read=True, write=True),
                                                   "r": Policy(read=True, write=False)})
    await s.start()
    try:
        writer, reader = client_for(s, "w"), client_for(s, "r")
        anonymous, unknown = client_for(s), client_for(s, "nope")
        assert await writer.agent.service.register("web", service_id="web-1", port=80)
        with pytest.raises(consul.ACLPermissionDenied, match="Permission denied"):
            await reader.agent.service.register("web", service_id="web-2", port=80)
        with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
            await unknown.catalog.services()
        _, seen = await anonymous.catalog.services()  # filtered, as Consul does
        assert seen == {}
        _, seen = await reader.catalog.services()
        assert "web" in seen
        # py-consul sends the token in a header on every request
        assert [e.token for e in s.log] == [True, True, True, False, True]
    finally:
        for cl in (writer, reader, anonymous, unknown):
            await cl.close()
        await s.stop()


async def test_injected_5xx_and_hang(standin) -> None:
    c = client_for(standin)
    try:
        standin.fail_with(500)
        with pytest.raises(consul.ConsulException, match="500"):
            await c.catalog.services()
        standin.fail_with(None)
        standin.hang()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await c.catalog.services()
        standin.hang(False)
        index, _ = await c.catalog.services()
        assert int(index) > 0
    finally:
        await c.close()


async def test_stop_and_start_on_the_same_address(standin) -> None:
    c = client_for(standin)
    try:
        await c.agent.service.register("web", service_id="web-1", port=80)
        await standin.stop()
        with pytest.raises(OSError):
            await c.catalog.services()
        await standin.start()
        _, services = await c.catalog.services()
    finally:
        await c.close()
    assert "web" in services  # the data outlives the listener


async def test_a_check_or_a_whole_node_can_be_deregistered(standin) -> None:
    standin.register_entity(copy.deepcopy(fixtures.CATALOG_REGISTER_PAYLOAD))
    c = client_for(standin)
    try:
        assert await c.catalog.deregister("t2.320", check_id="service:redis1")
        _, (entry,) = await c.health.service("redis")
        assert entry["Checks"] == []
        assert await c.catalog.deregister("t2.320")
        _, entries = await c.health.service("redis")
    finally:
        await c.close()
    assert entries == [] and "t2.320" not in standin.state.nodes
