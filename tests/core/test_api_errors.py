"""Inputs that used to get a 500 get a clear 4xx in the API's error shape, and responses match
docs/openapi.yaml's schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .conftest import ApiSession

SPEC = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml").read_text())


def as_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` in JSON Schema's words (type: [T, "null"])."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


COMPONENTS = as_json_schema(SPEC["components"])


def check_schema(instance: Any, name: str) -> None:
    jsonschema.validate(
        instance, {"$ref": f"#/components/schemas/{name}", "components": COMPONENTS}
    )


BODY = {"service": "web", "address": "10.0.0.5", "ports": {"http": 80},
        "check": {"http": "http://10.0.0.5/", "interval": "5s"}}


async def test_a_superscript_index_is_a_400(api: ApiSession) -> None:
    for value in ("²", "٣", "1" * 40, "-1"):
        status, body, _ = await api.call("GET", f"/v1/workloads?index={value}")
        assert status == 400, (value, body)
        assert body["field"] == "index"
        check_schema(body, "Error")


async def test_json_nested_deep_is_a_400(api: ApiSession) -> None:
    for depth in (33, 1000, 100_000):
        raw = "[" * depth + "]" * depth
        status, body, _ = await api.call(
            "PUT", "/v1/workloads/x", data=raw, headers={"Content-Type": "application/json"}
        )
        assert status == 400, (depth, body)
        assert "nested more than 32 levels" in body["error"]
    status, _, _ = await api.call("GET", "/v1/workloads/x")
    assert status == 404  # nothing was written


async def test_405_says_what_is_allowed(api: ApiSession) -> None:
    status, body, r = await api.call("POST", "/v1/workloads/x", json=BODY)
    assert status == 405
    assert set(r.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "PUT", "DELETE"}
    check_schema(body, "Error")


async def test_the_bearer_scheme_is_case_insensitive(api: ApiSession) -> None:
    for scheme in ("bearer", "BEARER", "Bearer"):
        status, _, _ = await api.call(
            "GET", "/v1/status", token="", headers={"Authorization": f"{scheme} {api.token}"}
        )
        assert status == 200, scheme
    status, body, _ = await api.call("GET", "/v1/status", token="",
                                     headers={"Authorization": f"Basic {api.token}"})
    assert status == 401
    check_schema(body, "Error")


async def test_workload_responses_match_the_spec(api: ApiSession) -> None:
    status, body, _ = await api.call("PUT", "/v1/workloads/w-1", json=BODY)
    assert status == 201
    check_schema(body, "Workload")
    status, body, _ = await api.call("GET", "/v1/workloads")
    assert status == 200
    for w in body:
        check_schema(w, "Workload")
    status, body, _ = await api.call("GET", "/v1/status")
    check_schema(body, "Status")
    status, body, _ = await api.call("PUT", "/v1/workloads/w-2", json={**BODY, "ports": {}})
    assert status == 422
    check_schema(body, "Error")
