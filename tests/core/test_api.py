"""The control API on a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isthmus import config as configmod
from isthmus.appliance import Appliance

from .conftest import ApiSession, make_config

BODY = {
    "service": "reviews",
    "namespace": "default",
    "address": "10.0.0.5",
    "ports": {"http": 9080},
    "labels": {"version": "v2"},
    "locality": {"region": "eu-west", "zone": "eu-west-1a"},
    "weight": 1,
}


async def test_health_needs_no_token(api: ApiSession) -> None:
    status, body, _ = await api.call("GET", "/v1/health", token="")
    assert (status, body) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/workloads"),
        ("PUT", "/v1/workloads/a"),
        ("GET", "/v1/services"),
        ("GET", "/v1/status"),
        ("DELETE", "/v1/workloads/a"),
    ],
)
async def test_every_other_route_needs_a_token(api: ApiSession, method: str, path: str) -> None:
    status, body, _ = await api.call(method, path, token="")
    assert status == 401 and "bearer" in body["error"]
    status, body, _ = await api.call(method, path, token="wrong")
    assert status == 401 and body["error"] == "invalid bearer token"


async def test_scoped_tokens(tmp_path: Path) -> None:
    (tmp_path / "ro").write_text("read-only-token\n")
    raw = make_config(
        tmp_path, api={"tokens": [{"token_file": str(tmp_path / "ro"), "scopes": ["read"]}]}
    )
    app = Appliance(configmod.validate(raw))
    await app.start()
    s = ApiSession(app.api_url, "read-only-token")
    try:
        assert (await s.call("GET", "/v1/workloads"))[0] == 200
        status, body, _ = await s.call("PUT", "/v1/workloads/a", BODY)
        assert status == 403 and "'workloads' scope" in body["error"]
    finally:
        await s.close()
        await app.stop()


async def test_register_read_replace_delete(api: ApiSession) -> None:
    status, body, r = await api.call("PUT", "/v1/workloads/vm-1", BODY)
    assert status == 201
    assert body["cluster"] == "east" and body["health"] == "passing"
    assert body["labels"] == {"version": "v2"} and body["ports"] == {"http": 9080}
    assert int(r.headers["X-Isthmus-Index"]) >= 1
    status, again, _ = await api.call("PUT", "/v1/workloads/vm-1", {**BODY, "weight": 3})
    assert status == 200 and again["weight"] == 3
    status, got, _ = await api.call("GET", "/v1/workloads/vm-1")
    assert got == again
    status, lst, _ = await api.call("GET", "/v1/workloads?service=reviews.default")
    assert [w["id"] for w in lst] == ["vm-1"]
    status, lst, _ = await api.call("GET", "/v1/workloads?service=ratings.default")
    assert lst == []
    status, services, _ = await api.call("GET", "/v1/services")
    assert services[0]["name"] == "reviews" and services[0]["vip"].startswith("127.240.")
    assert services[0]["clusters"] == {"east": {"healthy": 1, "total": 1}}
    status, svc, _ = await api.call("GET", "/v1/services/default/reviews")
    assert svc["endpoints"]["east"][0]["id"] == "vm-1" and svc["traffic"] is None
    assert (await api.call("GET", "/v1/services/default/nope"))[0] == 404
    status, _, _ = await api.call("DELETE", "/v1/workloads/vm-1")
    assert status == 204
    status, body, _ = await api.call("DELETE", "/v1/workloads/vm-1")
    assert status == 404 and "not registered" in body["error"]


async def test_status(api: ApiSession) -> None:
    await api.call("PUT", "/v1/workloads/vm-1", BODY)
    status, body, _ = await api.call("GET", "/v1/status")
    assert status == 200
    assert body["cluster"] == "east" and body["roles"] == ["control"]
    assert body["catalog"]["workloads"] == 1 and body["catalog"]["health"]["passing"] == 1


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "expected a JSON object"),
        (json.dumps({**BODY, "colour": "red"}).encode(), 422, "colour: unknown field"),
        (json.dumps({**BODY, "ports": {"http": "80"}}).encode(), 422, "ports.http"),
        (json.dumps({**BODY, "ports": {"http": 70000}}).encode(), 422, "ports.http"),
        (json.dumps({**BODY, "service": "Reviews"}).encode(), 422, "service: expected a DNS label"),
        (json.dumps({**BODY, "address": "10.0.0.999"}).encode(), 422, "address"),
        (json.dumps({**BODY, "check": {"http": "ftp://x"}}).encode(), 422, "check.http"),
        (json.dumps({**BODY, "check": {"tcp": "a:1", "ttl": "5s"}}).encode(), 422, "exactly one"),
        (json.dumps({**BODY, "check": {"ttl": "soon"}}).encode(), 422, "check.ttl"),
        (json.dumps({k: v for k, v in BODY.items() if k != "address"}).encode(), 422, "address"),
    ],
)
async def test_bad_bodies_are_rejected_and_change_nothing(
    api: ApiSession, raw: bytes, status: int, needle: str
) -> None:
    await api.call("PUT", "/v1/workloads/keep", BODY)
    _, before, _ = await api.call("GET", "/v1/workloads")
    got, body, _ = await api.call(
        "PUT", "/v1/workloads/keep", data=raw, headers={"Content-Type": "application/json"}
    )
    assert got == status, body
    assert needle in body["error"]
    if status == 422:
        assert body["field"]
    _, after, _ = await api.call("GET", "/v1/workloads")
    assert after == before


async def test_all_problems_reported_at_once(api: ApiSession) -> None:
    status, body, _ = await api.call(
        "PUT", "/v1/workloads/x", {"service": "BAD", "address": "", "ports": {}, "extra": 1}
    )
    assert status == 422
    fields = {p["field"] for p in body["problems"]}
    assert {"service", "address", "ports", "extra"} <= fields


async def test_invalid_workload_id(api: ApiSession) -> None:
    status, body, _ = await api.call("PUT", "/v1/workloads/-bad", BODY)
    assert status == 422 and body["field"] == "id"


async def test_oversized_body_is_413(api: ApiSession) -> None:
    big = {**BODY, "labels": {"x": "y" * (2 * 1024 * 1024)}}
    status, body, _ = await api.call("PUT", "/v1/workloads/big", big)
    assert status == 413 and "too large" in body["error"]
    assert (await api.call("GET", "/v1/workloads/big"))[0] == 404


async def test_unknown_route_and_method(api: ApiSession) -> None:
    status, body, _ = await api.call("GET", "/v1/nothing")
    assert status == 404 and "no route" in body["error"]
    status, body, _ = await api.call("POST", "/v1/workloads/a", BODY)
    assert status == 405


async def test_blocking_query(api: ApiSession) -> None:
    _, _, r = await api.call("GET", "/v1/workloads")
    index = int(r.headers["X-Isthmus-Index"])
    blocked = asyncio.create_task(api.call("GET", f"/v1/workloads?index={index}&wait=10s"))
    await asyncio.sleep(0.1)
    assert not blocked.done()
    await api.call("PUT", "/v1/workloads/new", BODY)
    status, body, r2 = await asyncio.wait_for(blocked, 5)
    assert status == 200 and [w["id"] for w in body] == ["new"]
    assert int(r2.headers["X-Isthmus-Index"]) > index
    status, body, _ = await api.call("GET", "/v1/workloads?index=abc")
    assert status == 400 and body["field"] == "index"
    status, body, _ = await api.call("GET", f"/v1/workloads?index={index}&wait=never")
    assert status == 400 and body["field"] == "wait"


async def test_heartbeat_route(api: ApiSession) -> None:
    await api.call("PUT", "/v1/workloads/t", {**BODY, "check": {"ttl": "30s"}})
    status, body, _ = await api.call("PUT", "/v1/workloads/t/heartbeat")
    assert status == 200 and body["health"] == "passing"
    await api.call("PUT", "/v1/workloads/p", BODY)
    status, body, _ = await api.call("PUT", "/v1/workloads/p/heartbeat")
    assert status == 422 and "TTL" in body["error"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "service": st.sampled_from(["reviews", "Bad", "", "a" * 70]) | json_values,
        "namespace": st.sampled_from(["default", "x_y"]) | json_values,
        "address": st.sampled_from(["10.0.0.5", "::1", "host.example", "1.2.3"]) | json_values,
        "ports": st.dictionaries(
            st.sampled_from(["http", "tcp", "BAD"]),
            st.integers(-5, 70000) | json_values,
            max_size=3,
        )
        | json_values,
        "labels": json_values,
        "locality": json_values,
        "weight": st.integers(-3, 20000) | json_values,
        "check": st.fixed_dictionaries(
            {},
            optional={
                "http": st.sampled_from(["http://x:1/h", "nope"]) | json_values,
                "tcp": st.sampled_from(["10.0.0.1:80", "x"]) | json_values,
                "ttl": st.sampled_from(["5s", "0s", "x"]) | json_values,
                "interval": json_values,
                "timeout": json_values,
            },
        )
        | json_values,
        "junk": json_values,
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies)
async def test_property_any_body_is_stored_or_rejected_cleanly(api: ApiSession, body: dict) -> None:
    _, before, _ = await api.call("GET", "/v1/workloads/prop")
    status, resp, _ = await api.call("PUT", "/v1/workloads/prop", body)
    assert status in (200, 201, 422), resp
    if status == 422:
        assert resp["error"] and isinstance(resp.get("field"), str)
        _, after, _ = await api.call("GET", "/v1/workloads/prop")
        assert after == before
    else:
        assert resp["service"] == body["service"]
