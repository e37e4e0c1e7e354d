"""Values past the limits are refused with 422 (or 409 for the listener budget) before anything
is written, so nothing stored can make a later read fail."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from discovery.durations import parse_duration
from isthmus import config as configmod
from isthmus.appliance import Appliance
from isthmus.identity import ensure_local_pki

from .conftest import ApiSession, loopback_host, make_config

pytestmark = pytest.mark.timeout(60)

BODY = {"service": "reviews", "address": "10.0.0.5", "ports": {"http": 9080}}
NINES = "9" * 400


async def _running(raw: dict[str, Any]) -> AsyncIterator[ApiSession]:
    app = Appliance(configmod.validate(raw))
    await app.start()
    s = ApiSession(app.api_url, Path(app.config.api.token_file).read_text().strip())
    try:
        yield s
    finally:
        await s.close()
        await app.stop()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiSession]:
    async for s in _running(make_config(tmp_path)):
        yield s


async def test_an_infinite_ttl_is_refused_and_the_catalog_stays_readable(api: ApiSession) -> None:
    _, _, r = await api.call("GET", "/v1/workloads")
    index = r.headers["X-Isthmus-Index"]
    status, err, _ = await api.call(
        "PUT", "/v1/workloads/x", {**BODY, "check": {"ttl": f"{NINES}s"}}
    )
    assert status == 422, err
    assert err["field"] == "check.ttl"
    status, listed, r = await api.call("GET", "/v1/workloads")
    assert (status, listed, r.headers["X-Isthmus-Index"]) == (200, [], index)
    assert (await api.call("GET", "/v1/status"))[0] == 200


@pytest.mark.parametrize(
    "check, field",
    [
        ({"tcp": "10.0.0.5:1", "interval": "99999999999999d"}, "check.interval"),
        ({"tcp": "10.0.0.5:1", "interval": "25h", "timeout": "1s"}, "check.interval"),
        ({"tcp": "10.0.0.5:1", "interval": "1h", "timeout": "6m"}, "check.timeout"),
        ({"ttl": "8d"}, "check.ttl"),
        ({"ttl": "30s", "deregister_after": "31d"}, "check.deregister_after"),
        ({"ttl": f"1{'0' * 40}ms"}, "check.ttl"),
    ],
)
async def test_every_duration_has_a_ceiling(
    api: ApiSession, check: dict[str, Any], field: str
) -> None:
    status, err, _ = await api.call("PUT", "/v1/workloads/x", {**BODY, "check": check})
    assert status == 422, err
    assert err["field"] == field and "at most" in err["error"]
    assert (await api.call("GET", "/v1/workloads"))[1] == []


async def test_a_bootstrap_token_ttl_past_every_limit_is_a_422(api: ApiSession) -> None:
    status, err, _ = await api.call("POST", "/v1/bootstrap-tokens", {"ttl": "99999999999999d"})
    assert status == 422, err
    assert err["field"] == "ttl"


@pytest.mark.parametrize("text", ["inf", "nan", f"{NINES}s", "1e9s", "3650001d", "9" * 70 + "s"])
def test_parse_duration_refuses_what_no_clock_can_hold(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_duration(text)


def test_config_durations_have_bounds(tmp_path: Path) -> None:
    raw = make_config(tmp_path, drain_timeout="99999999999999d")
    with pytest.raises(configmod.ConfigError, match=r"drain_timeout: .* at most 1h"):
        configmod.validate(raw)


async def test_ports_per_workload_are_capped(api: ApiSession) -> None:
    ports = {f"tcp-{i}": 10000 + i for i in range(17)}
    status, err, _ = await api.call("PUT", "/v1/workloads/x", {**BODY, "ports": ports})
    assert status == 422 and err["field"] == "ports" and "16" in err["error"], err
    ports.popitem()
    assert (await api.call("PUT", "/v1/workloads/x", {**BODY, "ports": ports}))[0] == 201


async def test_checks_faster_than_the_floor_are_refused(tmp_path: Path) -> None:
    raw = make_config(tmp_path, discovery={"min_check_interval": "1s"})
    async for api in _running(raw):
        status, err, _ = await api.call(
            "PUT", "/v1/workloads/x", {**BODY, "check": {"tcp": "10.0.0.5:1", "interval": "1ms",
                                                         "timeout": "1ms"}}
        )
        assert status == 422, err
        assert err["field"] == "check.interval"
        assert "discovery.min_check_interval" in err["error"] and "1s" in err["error"]
        status, err, _ = await api.call(
            "PUT", "/v1/workloads/y", {**BODY, "check": {"ttl": "10ms"}}
        )
        assert status == 422 and err["field"] == "check.ttl", err
        assert (await api.call("GET", "/v1/workloads"))[1] == []
        status, _, _ = await api.call(
            "PUT", "/v1/workloads/x", {**BODY, "check": {"tcp": "10.0.0.5:1", "interval": "1s",
                                                         "timeout": "1s"}}
        )
        assert status == 201


def test_a_static_workload_faster_than_the_floor_is_a_config_error(tmp_path: Path) -> None:
    raw = make_config(tmp_path, discovery={
        "min_check_interval": "1s",
        "workloads": [{"id": "s", **BODY, "check": {"tcp": "10.0.0.5:1", "interval": "100ms",
                                                     "timeout": "50ms"}}],
    })
    with pytest.raises(configmod.ConfigError, match=r"discovery\.workloads\.0\.check\.interval"):
        configmod.validate(raw)


async def test_registrations_past_the_listener_budget_are_refused(tmp_path: Path) -> None:
    """Each service port costs the egress one listener per VIP (the service VIP and one per
    cluster serving it): two ports of a local service are four listeners."""
    host = loopback_host()
    raw = make_config(tmp_path, roles=["control", "egress"], control={"listen": f"{host}:0"},
                      egress={"max_listeners": 8,
                              "vip_cidr": f"127.251.{os.getpid() % 250}.0/24"})
    ensure_local_pki(configmod.validate(raw))
    two = {"http": 9080, "tcp": 9081}
    async for api in _running(raw):
        assert (await api.call("PUT", "/v1/workloads/a", {**BODY, "ports": two}))[0] == 201
        body_b = {**BODY, "service": "ratings", "ports": two}
        assert (await api.call("PUT", "/v1/workloads/b", body_b))[0] == 201
        body_c = {**BODY, "service": "details", "ports": {"http": 80}}
        status, err, _ = await api.call("PUT", "/v1/workloads/c", body_c)
        assert status == 409, err
        assert "listener budget" in err["error"] and "8" in err["error"]
        assert "egress.max_listeners" in err["error"]
        # what does not add listeners is never refused, even at the budget
        assert (await api.call("PUT", "/v1/workloads/b", body_b))[0] == 200
        assert (await api.call("PUT", "/v1/workloads/b2", body_b))[0] == 201
        status, err, _ = await api.call(
            "PUT", "/v1/workloads/b", {**body_b, "ports": {**two, "grpc": 9090}}
        )
        assert status == 409, err
        status, out, _ = await api.call("GET", "/v1/status")
        assert out["limits"]["egress_listeners"]["budget"] == 8
        assert out["limits"]["egress_listeners"]["wanted"] == 8
        assert (await api.call("DELETE", "/v1/workloads/a"))[0] == 204
        assert (await api.call("PUT", "/v1/workloads/c", body_c))[0] == 201
        assert [w["id"] for w in (await api.call("GET", "/v1/workloads"))[1]] == ["b", "b2", "c"]
