"""Identifiers are whole-string matches: a trailing newline (which `re.match` with `$` lets
through) is refused everywhere a name or an id is validated.

The attack: `PUT /v1/workloads/abc%0A` answered 201 and stored the id with its newline."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from discovery.errors import InvalidInput
from discovery.names import ServiceKey, is_label
from discovery.schema import StaticWorkload, WorkloadSpec, parse_workload
from federation.trust.errors import InvalidIdentity
from federation.trust.spiffe import SpiffeId, is_trust_domain
from isthmus import config as configmod

from .conftest import ApiSession

BODY = {"service": "web", "address": "10.0.0.5", "ports": {"http": 9080}}
TRAILING = ["abc\n", "abc\r\n", "abc\n\n", "\nabc", "ab\nc"]


@pytest.mark.parametrize("text", TRAILING)
def test_labels_and_service_keys(text: str) -> None:
    assert not is_label(text)
    with pytest.raises(ValueError):
        ServiceKey.parse(text)
    with pytest.raises(ValueError):
        ServiceKey.parse(f"web.{text}")


@pytest.mark.parametrize("text", TRAILING)
def test_workload_ids_and_fields(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_workload(BODY, text, "east")
    assert info.value.field == "id"
    for body, field in [
        ({**BODY, "service": text}, "service"),
        ({**BODY, "namespace": text}, "namespace"),
        ({**BODY, "ports": {text: 1}}, "ports"),
        ({**BODY, "labels": {text: "v"}}, "labels"),
    ]:
        with pytest.raises(InvalidInput) as info:
            parse_workload(body, "w", "east")
        assert (info.value.field or "").startswith(field), (body, info.value.field)
    with pytest.raises(ValidationError):
        StaticWorkload.model_validate({**BODY, "id": text})


def test_the_rest_of_a_workload_is_still_accepted() -> None:
    w = parse_workload({**BODY, "labels": {"app.kubernetes.io/name": "web"}}, "web-1:a_b", "e")
    assert w.id == "web-1:a_b" and w.labels == {"app.kubernetes.io/name": "web"}
    assert WorkloadSpec.model_validate(BODY).service == "web"


@pytest.mark.parametrize("port", ["8\n", "٣", "²", "+80", " 80"])
def test_tcp_check_ports_are_ascii_digits(port: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_workload({**BODY, "check": {"tcp": f"10.0.0.5:{port}"}}, "w", "east")
    assert (info.value.field or "").startswith("check")


@pytest.mark.parametrize("text", TRAILING)
def test_spiffe_names(text: str) -> None:
    with pytest.raises(InvalidIdentity):
        SpiffeId.for_node("mesh.test", "east", "agent", text)
    with pytest.raises(InvalidIdentity):
        SpiffeId.for_node("mesh.test", text, "agent", "vm-1")
    assert not is_trust_domain(f"mesh.{text}")
    with pytest.raises(InvalidIdentity):
        SpiffeId.parse(f"spiffe://mesh.test/cluster/east/agent/{text}")


def test_config_names() -> None:
    raw = {"cluster": "east\n", "trust_domain": "mesh.test\n", "node": "gw-1\n"}
    with pytest.raises(configmod.ConfigError) as info:
        configmod.validate(raw)
    text = " ".join(info.value.problems)
    assert "cluster" in text and "trust_domain" in text and "node" in text


async def test_api_refuses_an_id_with_a_trailing_newline(api: ApiSession) -> None:
    status, out, _ = await api.call("PUT", "/v1/workloads/abc%0A", BODY)
    assert status == 422 and out["field"] == "id", out
    status, out, _ = await api.call("PUT", "/v1/workloads/abc", {**BODY, "service": "web\n"})
    assert status == 422 and out["field"] == "service", out
    status, listed, _ = await api.call("GET", "/v1/workloads")
    assert status == 200 and listed == []
    status, _, _ = await api.call("PUT", "/v1/workloads/abc", BODY)
    assert status == 201


@pytest.mark.parametrize("port", ["²", "٣"])
def test_ports_in_addresses_are_ascii_digits(port: str) -> None:
    """`str.isdigit` also takes '²' (int() then raises a bare ValueError) and '٣' (read as 3)."""
    from discovery.addresses import split_host_port
    from dns.corefile import parse_corefile
    from dns.errors import CorefileError
    from dns.server import parse_listen
    from dns.wire import text_to_wire
    from federation.hlc import Stamp

    with pytest.raises(CorefileError):  # not a bare ValueError from int()
        parse_corefile(f"global:{port} {{ global }}")
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="expected a port from 0 to 65535"):
        split_host_port(f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="WALLMS"):
        Stamp.parse(f"1{port}.0.east")
    raw = {"cluster": "e", "trust_domain": "t.d", "api": {"listen": f"127.0.0.1:{port}"}}
    with pytest.raises(configmod.ConfigError, match=r"api\.listen: expected IP:PORT"):
        configmod.validate(raw)
    # a \DDD escape takes ASCII digits only; other characters stand for themselves
    assert text_to_wire(f"a\\{port * 3}.b") == text_to_wire(f"a{port * 3}.b")
