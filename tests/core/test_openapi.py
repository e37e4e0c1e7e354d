"""docs/openapi.yaml describes exactly the routes the app serves."""

from __future__ import annotations

from pathlib import Path

import yaml
from openapi_spec_validator import validate

from isthmus.appliance import Appliance

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
METHODS = {"get", "put", "post", "delete", "patch"}


def spec_routes() -> set[tuple[str, str]]:
    spec = yaml.safe_load(SPEC.read_text())
    return {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method in ops
        if method in METHODS
    }


def app_routes(appliance: Appliance) -> set[tuple[str, str]]:
    runner = appliance._runners[0]
    return {
        (r.method, r.resource.canonical)
        for r in runner.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }


def test_spec_is_valid_openapi() -> None:
    validate(yaml.safe_load(SPEC.read_text()))


async def test_spec_and_app_have_the_same_routes(appliance: Appliance) -> None:
    served, described = app_routes(appliance), spec_routes()
    assert served - described == set(), "routes served but not in docs/openapi.yaml"
    assert described - served == set(), "routes in docs/openapi.yaml but not served"
