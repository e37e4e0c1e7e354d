"""Cross-cluster SNI: formatting, parsing, and property round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.names import ServiceKey
from gateway.errors import SniError
from gateway.proto.sni import (
    FederationSni,
    ServiceSni,
    federation_sni,
    parse_sni,
    service_sni,
    validate_trust_domain,
)

TD = "mesh.example.org"


def test_service_sni_round_trip() -> None:
    text = service_sni("http", ServiceKey("reviews", "default"), "east", TD)
    assert text == "http.reviews.default.east.mesh.example.org"
    parsed = parse_sni(text, TD)
    assert parsed == ServiceSni("http", ServiceKey("reviews", "default"), "east", TD)
    assert str(parsed) == text


def test_federation_sni_round_trip() -> None:
    text = federation_sni("west", TD)
    assert text == "federation.west.mesh.example.org"
    assert parse_sni(text, TD) == FederationSni("west", TD)


def test_single_label_trust_domain_and_upper_case() -> None:
    parsed = parse_sni("TCP-db.Orders.Shop.East.Local", "local")
    assert parsed == ServiceSni("tcp-db", ServiceKey("orders", "shop"), "east", "local")


def test_port_named_federation_is_a_service() -> None:
    parsed = parse_sni("federation.reviews.default.east." + TD, TD)
    assert isinstance(parsed, ServiceSni)
    assert parsed.port == "federation"


@pytest.mark.parametrize(
    "name",
    [
        "http.reviews.default.east.other.org",  # another trust domain
        "mesh.example.org",
        ".mesh.example.org",
        "reviews.default.east.mesh.example.org",  # three labels
        "a.http.reviews.default.east.mesh.example.org",  # five labels
        "federation.mesh.example.org",
        "federation.a.b.mesh.example.org",  # three labels, not peering
        "http.Rev_iews.default.east.mesh.example.org",
        "http..default.east.mesh.example.org",
        "http.-reviews.default.east.mesh.example.org",
        "federation.-east.mesh.example.org",
        "x" * 64 + ".reviews.default.east.mesh.example.org",
        "http.reviews.default.east.xmesh.example.org",
        "http.reviews.default." + "e" * 250 + ".mesh.example.org",
        "http.reviews.default.\u212aast.mesh.example.org",  # KELVIN SIGN folds to "k"
    ],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(SniError):
        parse_sni(name, TD)


@pytest.mark.parametrize("td", ["", "a..b", "Mesh_Example.org", "x" * 254, "-a.org", "a.org."])
def test_bad_trust_domains(td: str) -> None:
    with pytest.raises(SniError):
        validate_trust_domain(td)
    with pytest.raises(SniError):
        federation_sni("east", td)


def test_format_refuses_bad_parts() -> None:
    with pytest.raises(SniError, match="port name"):
        service_sni("Http", ServiceKey("reviews"), "east", TD)
    with pytest.raises(SniError, match="cluster"):
        service_sni("http", ServiceKey("reviews"), "east.1", TD)
    with pytest.raises(SniError, match="longer than 253"):
        service_sni("h" * 63, ServiceKey("r" * 63, "n" * 63), "c" * 63, TD)
    with pytest.raises(ValueError):  # SniError is a ValueError for callers that group them
        federation_sni("", TD)


label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
trust_domain = st.lists(label, min_size=1, max_size=4).map(".".join)


@settings(max_examples=300, deadline=None)
@given(label, label, label, label, trust_domain)
def test_property_round_trip(port: str, name: str, ns: str, cluster: str, td: str) -> None:
    try:
        text = service_sni(port, ServiceKey(name, ns), cluster, td)
    except SniError:
        assert len(f"{port}.{name}.{ns}.{cluster}.{td}") > 253
        return
    parsed = parse_sni(text, td)
    assert parsed == ServiceSni(port, ServiceKey(name, ns), cluster, td)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300), trust_domain)
def test_fuzz_parse_only_raises_sni_error(text: str, td: str) -> None:
    try:
        parsed = parse_sni(text, td)
    except SniError:
        return
    assert str(parsed) == text.lower()
