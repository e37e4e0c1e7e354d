"""Consul service instances to workloads and back, without a server (sans-IO)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.consul.mapping import (
    META_CHECK,
    Instance,
    MappingRules,
    Unmappable,
    check_id,
    consul_check,
    foreign_id,
    map_entry,
    registration,
)
from discovery.model import Check, CheckKind, Health, Locality, Workload
from discovery.names import ServiceKey
from discovery.schema import WORKLOAD_ID_RE, parse_workload
from tests.consul_standin import fixtures

RULES = MappingRules(cluster="east")


def doc_entry() -> dict[str, Any]:
    return copy.deepcopy(fixtures.HEALTH_SERVICE_RESPONSE[0])


def test_the_documented_health_entry() -> None:
    inst = map_entry(doc_entry(), RULES)
    w = inst.state.workload
    assert (inst.consul_name, inst.node, inst.service_id) == ("redis", "foobar", "redis")
    assert w.id == "consul:foobar:redis"  # not registered by Isthmus: the node is part of it
    assert w.source == "consul:foobar"
    assert w.service == ServiceKey("redis", "default")
    assert w.address == "10.1.10.12"
    # Consul's own tagged addresses (lan, wan) are addresses, not port names
    assert dict(w.ports) == {"tcp": 8000}
    assert dict(w.labels) == {"redis_version": "4.0"}
    assert w.weight == 10  # Weights.Passing
    assert w.locality == Locality()
    assert w.check is None
    assert inst.state.health is Health.PASSING
    assert not inst.registered and not inst.maintenance


def test_the_documented_critical_check_makes_it_critical() -> None:
    e = doc_entry()
    e["Checks"][0] = copy.deepcopy(fixtures.AGENT_CRITICAL_CHECK)
    inst = map_entry(e, RULES)
    assert inst.state.health is Health.CRITICAL
    assert inst.state.output.startswith("Service 'web' check: Get \"http://localhost/health\"")
    assert "connection refused" in inst.state.output


def test_a_critical_node_check_makes_every_instance_on_it_critical() -> None:
    e = doc_entry()
    e["Checks"][1]["Status"] = "critical"
    e["Checks"][1]["Output"] = "Agent not live or unreachable"
    inst = map_entry(e, RULES)
    assert inst.state.health is Health.CRITICAL
    assert inst.state.output == "Serf Health Status: Agent not live or unreachable"


@pytest.mark.parametrize(("warning_is", "health", "weight"), [
    (Health.PASSING, Health.PASSING, 1),  # Weights.Warning applies
    (Health.CRITICAL, Health.CRITICAL, 1),
])
def test_what_warning_means_is_configurable(warning_is: Health, health: Health, weight: int
                                            ) -> None:
    e = doc_entry()
    e["Checks"][0]["Status"] = "warning"
    e["Checks"][0]["Output"] = "HTTP 429"
    inst = map_entry(e, MappingRules(cluster="east", warning_is=warning_is))
    assert inst.state.health is health
    assert inst.state.output == "Service 'redis' check: HTTP 429"
    assert inst.state.workload.weight == weight


def test_an_unknown_status_counts_as_critical() -> None:
    e = doc_entry()
    e["Checks"][0]["Status"] = "maintenance?"
    assert map_entry(e, RULES).state.health is Health.CRITICAL


def test_namespace_from_meta_then_tag_then_default() -> None:
    e = doc_entry()
    e["Service"]["Tags"] = ["primary", "isthmus-namespace=payments"]
    assert map_entry(e, RULES).state.workload.service.namespace == "payments"
    e["Service"]["Meta"]["isthmus-namespace"] = "billing"
    assert map_entry(e, RULES).state.workload.service.namespace == "billing"
    rules = MappingRules(cluster="east", namespace_meta_key="team", namespace_tag_prefix="ns:")
    e = doc_entry()
    e["Service"]["Tags"] = ["ns:ops"]
    assert map_entry(e, rules).state.workload.service.namespace == "ops"
    e["Service"]["Meta"]["team"] = "web"
    assert map_entry(e, rules).state.workload.service.namespace == "web"
    # the namespace tag is not a label
    assert "isthmus-namespace" not in map_entry(doc_entry(), RULES).state.workload.labels


@pytest.mark.parametrize("bad", ["Payments", "pay_ments", "", "-x"])
def test_a_bad_namespace_is_refused_never_defaulted(bad: str) -> None:
    e = doc_entry()
    e["Service"]["Meta"]["isthmus-namespace"] = bad
    with pytest.raises(Unmappable, match="namespace"):
        map_entry(e, RULES)


def test_port_names_from_meta_and_tagged_addresses() -> None:
    e = doc_entry()
    s = e["Service"]
    s["Meta"].update({"isthmus-port": "http", "isthmus-port-grpc": "9090",
                      "isthmus-port-bad_name": "1", "isthmus-port-admin": "99999"})
    s["TaggedAddresses"]["metrics"] = {"Address": "10.1.10.12", "Port": 9100}
    s["TaggedAddresses"]["elsewhere"] = {"Address": "10.9.9.9", "Port": 7000}
    w = map_entry(e, RULES).state.workload
    assert dict(w.ports) == {"http": 8000, "grpc": 9090, "metrics": 9100}
    assert "isthmus-port" not in w.labels and "isthmus-port-grpc" not in w.labels
    named = MappingRules(cluster="east", default_port_name="http")
    assert dict(map_entry(doc_entry(), named).state.workload.ports) == {"http": 8000}


def test_no_port_at_all_is_unmappable() -> None:
    e = doc_entry()
    e["Service"]["Port"] = 0
    with pytest.raises(Unmappable, match="no port"):
        map_entry(e, RULES)


def test_locality_from_node_meta_and_the_workloads_own() -> None:
    e = doc_entry()
    e["Node"]["Meta"].update({"region": "eu-west", "zone": "eu-west-1a"})
    assert map_entry(e, RULES).state.workload.locality == Locality("eu-west", "eu-west-1a")
    rules = MappingRules(cluster="east", region_node_meta="dc-region", zone_node_meta="az")
    e["Node"]["Meta"].update({"dc-region": "us", "az": "us-1"})
    assert map_entry(e, rules).state.workload.locality == Locality("us", "us-1")
    e["Service"]["Meta"]["isthmus-zone"] = "us-2"
    assert map_entry(e, rules).state.workload.locality == Locality("us", "us-2")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("Address", "redis.example.com", "IP address"),
    ("Service", "my_service", "service name"),
])
def test_unmappable_instances_say_why(field: str, value: str, message: str) -> None:
    e = doc_entry()
    e["Service"][field] = value
    if field == "Address":
        e["Node"]["Address"] = value
    with pytest.raises(Unmappable, match=message):
        map_entry(e, RULES)


def test_an_upper_case_name_is_lowercased_and_an_empty_address_is_the_nodes() -> None:
    e = doc_entry()
    e["Service"]["Service"] = "Redis"
    e["Service"]["Address"] = ""
    w = map_entry(e, RULES).state.workload
    assert w.service.name == "redis"
    assert w.address == "10.1.10.12"


def test_maintenance_mode_is_seen() -> None:
    e = doc_entry()
    e["Checks"].append({"Node": "foobar", "CheckID": "_service_maintenance:redis",
                        "Name": "Service Maintenance Mode", "Status": "critical",
                        "Notes": "agent vm-1 disconnected", "Output": "", "ServiceID": "redis"})
    inst = map_entry(e, RULES)
    assert inst.maintenance
    assert inst.state.health is Health.CRITICAL
    assert inst.state.output == "Service Maintenance Mode: agent vm-1 disconnected"


@pytest.mark.parametrize("garbage", [None, [], {"Node": "x"}, {"Service": {"ID": 3}}])
def test_garbage_is_unmappable_not_a_crash(garbage: Any) -> None:
    with pytest.raises(Unmappable):
        map_entry(garbage, RULES)


def test_foreign_ids_are_valid_workload_ids() -> None:
    assert foreign_id("node-1", "web-1") == "consul:node-1:web-1"
    odd = foreign_id("node 1", "web/1")
    assert WORKLOAD_ID_RE.fullmatch(odd) and odd.startswith("consul:")
    assert foreign_id("node 1", "web/1") == odd != foreign_id("node 1", "web/2")
    assert WORKLOAD_ID_RE.fullmatch(foreign_id("n" * 100, "s" * 100))


# --- writing, and reading back what was written -----------------------------------------------


def as_consul_entry(reg: dict[str, Any], node: str = "agent-1", status: str = "passing"
                    ) -> dict[str, Any]:
    """What `GET /v1/health/service/:service` shows of an agent registration."""
    checks = [{"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status",
               "Status": "passing", "ServiceID": ""}]
    if reg["check"] is not None:
        c = reg["check"]
        checks.append({"Node": node, "CheckID": c["CheckID"], "Name": c["Name"],
                       "Status": status, "ServiceID": reg["service_id"],
                       "Definition": {"HTTP": c.get("HTTP", ""), "TCP": c.get("TCP", "")}})
    return {
        "Node": {"Node": node, "Address": "10.0.0.1", "Meta": {}},
        "Service": {"ID": reg["service_id"], "Service": reg["name"], "Tags": reg["tags"],
                    "Address": reg["address"], "Port": reg["port"], "Meta": reg["meta"],
                    "Weights": reg["weights"], "TaggedAddresses": {}},
        "Checks": checks,
    }


def round_trip(w: Workload) -> Instance:
    return map_entry(as_consul_entry(registration(w, RULES, "rev1")), RULES)


def workload(**body: Any) -> Workload:
    base = {"service": "reviews", "address": "10.0.0.5", "ports": {"http": 9080}}
    return parse_workload({**base, **body}, "reviews-1", "east", source="api")


@pytest.mark.parametrize("body", [
    {},
    {"namespace": "payments", "ports": {"http": 9080, "grpc": 9090, "admin": 9901},
     "labels": {"version": "v2", "app.kubernetes.io/name": "reviews"},
     "locality": {"region": "eu-west", "zone": "eu-west-1a"}, "weight": 7},
    {"weight": 0},
    {"labels": {"isthmus-namespace": "x", "isthmus-port-http": "1"}},  # reserved-looking keys
    {"check": {"http": "http://10.0.0.5:9080/healthz", "interval": "5s", "timeout": "1s",
               "success_threshold": 2, "failure_threshold": 3, "deregister_after": "90m"}},
    {"check": {"tcp": "10.0.0.5:9080", "interval": "30s"}},
    {"check": {"ttl": "30s", "deregister_after": "1h"}},
    {"check": {"http": "http://10.0.0.5:9080/" + "x" * 1500, "interval": "5s"}},
])
def test_a_registration_reads_back_as_the_same_workload(body: dict[str, Any]) -> None:
    w = workload(**body)
    inst = round_trip(w)
    assert inst.state.workload == w
    assert inst.registered and inst.rev == "rev1" and inst.id == "reviews-1"


def test_a_long_url_is_kept_out_of_the_meta_value() -> None:
    w = workload(check={"http": "http://10.0.0.5:9080/" + "x" * 1500, "interval": "5s"})
    reg = registration(w, RULES, "r")
    assert all(len(v) <= 512 for v in reg["meta"].values())
    assert reg["check"]["HTTP"] == w.check.target


def test_the_check_is_translated_for_consuls_agent() -> None:
    http = Check(CheckKind.HTTP, "http://10.0.0.5/healthz", interval=5, timeout=1,
                 success_threshold=2, failure_threshold=3, deregister_after=5400)
    assert consul_check("w1", http) == {
        "CheckID": "service:w1", "Name": "isthmus http check", "HTTP": "http://10.0.0.5/healthz",
        "Interval": "5s", "Timeout": "1s", "SuccessBeforePassing": 2,
        "FailuresBeforeCritical": 3, "DeregisterCriticalServiceAfter": "90m"}
    assert consul_check("w1", Check(CheckKind.TCP, "10.0.0.5:80", interval=0.5, timeout=0.25)) \
        == {"CheckID": "service:w1", "Name": "isthmus tcp check", "TCP": "10.0.0.5:80",
            "Interval": "500ms", "Timeout": "250ms"}
    assert consul_check("w1", Check(CheckKind.TTL, "", ttl=30)) == {
        "CheckID": "service:w1", "Name": "isthmus ttl check", "TTL": "30s"}
    assert check_id("w1") == "service:w1"


def test_registration_uses_consul_weights_of_at_least_one() -> None:
    reg = registration(workload(weight=0), RULES, "r")
    assert reg["weights"] == {"Passing": 1, "Warning": 1}
    assert reg["meta"]["isthmus-weight"] == "0"
    assert reg["replace_existing_checks"] is True


def test_a_damaged_check_record_loses_only_the_description() -> None:
    reg = registration(workload(check={"ttl": "30s"}), RULES, "r")
    reg["meta"][META_CHECK] = "[not json"
    inst = map_entry(as_consul_entry(reg, status="critical"), RULES)
    assert inst.state.workload.check is None
    assert inst.state.health is Health.CRITICAL


labels = st.dictionaries(st.from_regex(r"[a-z][a-z0-9._/-]{0,20}", fullmatch=True),
                         st.text(alphabet="abcxyz019 -", max_size=30), max_size=5)
ports = st.dictionaries(st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True),
                        st.integers(1, 65535), min_size=1, max_size=16)


@settings(max_examples=200, deadline=None)
@given(labels=labels, ports=ports, weight=st.integers(0, 10000),
       ns=st.sampled_from(["default", "payments", "a1"]),
       region=st.sampled_from(["", "us", "eu-west"]))
def test_any_valid_registration_reads_back_the_same(labels, ports, weight, ns, region) -> None:
    w = workload(labels=labels, ports=ports, weight=weight, namespace=ns,
                 locality={"region": region})
    assert round_trip(w).state.workload == w
