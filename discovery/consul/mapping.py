"""Consul service instances to Isthmus workloads and back, without I/O.

Reading: one entry of `GET /v1/health/service/:service` (its `Node`, `Service` and `Checks`)
becomes a `WorkloadState`:

- name: the Consul service name, lowercased (it must then be a DNS label);
- namespace: the service meta key `namespace_meta_key`, else a tag `<namespace_tag_prefix><ns>`,
  else `default`;
- ports: `Service.Port` named by the meta key `port_name_meta_key` (else `default_port_name`),
  plus meta `<port_meta_prefix><name>: <port>`, plus tagged addresses with a port under any key
  that is a DNS label and not one of Consul's own (`lan`, `wan`, ...);
- address: `Service.Address`, else the node's address (an IP address: gateways never resolve);
- locality: the node meta keys `region_node_meta` and `zone_node_meta`;
- health: any critical check (the node's included) makes it critical, else any warning makes
  it `warning_is`, else passing;
- labels: service meta outside the reserved keys, and tags of the form `key=value`.

Writing: a `Workload` becomes the body of `PUT /v1/agent/service/register`, with its check
translated, and the Isthmus fields Consul has no place for (owner, namespace, extra ports, a
weight of 0, locality, the check's own parameters) in reserved `isthmus-*` meta keys, so that
reading it back gives the same workload.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from discovery.embedded import _parse_check
from discovery.model import Check, CheckKind, Health, Locality, Workload, WorkloadState
from discovery.model import format_duration as fmt
from discovery.names import LABEL_EXPECTED, ServiceKey, is_label
from discovery.schema import LABEL_KEY_RE, MAX_LABELS, MAX_PORTS, WORKLOAD_ID_RE

# Meta keys Isthmus writes on the services it registers (Consul allows [A-Za-z0-9_-] keys).
META_SOURCE = "isthmus-source"  # the owner: "api", "config" or an agent's SPIFFE ID
META_REV = "isthmus-rev"  # a new value on every write: tells a write's own echo in a read
META_CHECK = "isthmus-check"  # the check's parameters, as the embedded store records them
META_WEIGHT = "isthmus-weight"  # only for weight 0: Consul's weights are at least 1
META_REGION = "isthmus-region"
META_ZONE = "isthmus-zone"
RESERVED_META_PREFIX = "isthmus-"
MAX_META_VALUE = 512  # Consul refuses longer meta values
MAX_OUTPUT = 512
MAX_WEIGHT = 10_000
# Tagged addresses Consul itself uses; any other key with a port names a port.
CONSUL_TAGGED = frozenset(
    {"lan", "wan", "lan_ipv4", "lan_ipv6", "wan_ipv4", "wan_ipv6", "virtual", "consul-virtual"}
)
SERVICE_MAINTENANCE = "_service_maintenance:"
NODE_MAINTENANCE = "_node_maintenance"


class Unmappable(ValueError):
    """A Consul service instance that cannot be an Isthmus workload; the message says why."""


@dataclass(frozen=True, slots=True)
class MappingRules:
    cluster: str
    namespace_meta_key: str = "isthmus-namespace"
    namespace_tag_prefix: str = "isthmus-namespace="
    port_name_meta_key: str = "isthmus-port"
    port_meta_prefix: str = "isthmus-port-"
    default_port_name: str = "tcp"
    region_node_meta: str = "region"
    zone_node_meta: str = "zone"
    warning_is: Health = Health.PASSING


@dataclass(frozen=True, slots=True)
class Instance:
    """One Consul service instance as a workload, with what the store needs to write it."""

    consul_name: str
    node: str
    service_id: str
    state: WorkloadState
    registered: bool  # by Isthmus: it carries META_SOURCE
    rev: str
    maintenance: bool  # the instance's own maintenance mode is on

    @property
    def id(self) -> str:
        return self.state.workload.id


def check_id(service_id: str) -> str:
    """The CheckID of the check Isthmus registers with a service (Consul's own default)."""
    return f"service:{service_id}"


def foreign_id(node: str, service_id: str) -> str:
    """The workload id of an instance registered in Consul outside Isthmus: service IDs are
    unique per node only, so the node is part of it."""
    candidate = f"consul:{node}:{service_id}"
    if WORKLOAD_ID_RE.fullmatch(candidate):
        return candidate
    digest = hashlib.sha256(f"{node}\0{service_id}".encode()).hexdigest()[:24]
    return f"consul:{digest}"


# --- reading ----------------------------------------------------------------------------------


def map_entry(entry: Any, rules: MappingRules) -> Instance:
    """One `GET /v1/health/service/:service` entry; raises Unmappable naming what is wrong."""
    if not isinstance(entry, Mapping):
        raise Unmappable("expected an object with Node, Service and Checks")
    node = _mapping(entry.get("Node"))
    svc = _mapping(entry.get("Service"))
    checks = entry.get("Checks") if isinstance(entry.get("Checks"), list) else []
    node_name = _text(node.get("Node"))
    service_id = _text(svc.get("ID"))
    consul_name = _text(svc.get("Service"))
    if not node_name or not service_id:
        raise Unmappable("expected Node.Node and Service.ID")
    meta = _text_map(svc.get("Meta"))
    tags = [t for t in svc.get("Tags") or [] if isinstance(t, str)]
    name = consul_name.lower()
    if not is_label(name):
        raise Unmappable(f"service name {consul_name!r}: expected {LABEL_EXPECTED}")
    registered = META_SOURCE in meta
    namespace = _namespace(meta, tags, rules)
    address = _text(svc.get("Address")) or _text(node.get("Address"))
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError:
        raise Unmappable(
            f"address {address!r}: expected an IP address (gateways connect to it directly)"
        ) from None
    ports = _ports(svc, meta, rules, address)
    health, output, warned, maintenance = _health(checks, service_id, rules)
    node_meta = _text_map(node.get("Meta"))
    locality = Locality(
        _short(meta.get(META_REGION) or node_meta.get(rules.region_node_meta, "")),
        _short(meta.get(META_ZONE) or node_meta.get(rules.zone_node_meta, "")),
    )
    if registered and WORKLOAD_ID_RE.fullmatch(service_id):
        wid, source = service_id, meta[META_SOURCE]
    else:
        wid, source = foreign_id(node_name, service_id), f"consul:{node_name}"
    workload = Workload(
        id=wid,
        service=ServiceKey(name, namespace),
        address=address,
        ports=ports,
        cluster=rules.cluster,
        labels=_labels(meta, tags, rules, registered),
        locality=locality,
        weight=_weight(svc, meta, warned),
        check=_check(meta, checks, service_id) if registered else None,
        source=source,
    )
    return Instance(
        consul_name=consul_name,
        node=node_name,
        service_id=service_id,
        state=WorkloadState(workload, health, output),
        registered=registered,
        rev=meta.get(META_REV, ""),
        maintenance=maintenance,
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _text_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _short(value: str) -> str:
    return value if len(value) <= 63 else ""


def _namespace(meta: Mapping[str, str], tags: list[str], rules: MappingRules) -> str:
    value = meta.get(rules.namespace_meta_key)
    where = f"meta {rules.namespace_meta_key!r}"
    if value is None:
        found = [t[len(rules.namespace_tag_prefix):] for t in tags
                 if rules.namespace_tag_prefix and t.startswith(rules.namespace_tag_prefix)]
        if not found:
            return "default"
        value, where = found[0], f"tag {rules.namespace_tag_prefix + found[0]!r}"
    # Never a fallback to `default` for a bad value: the service would land in a namespace
    # (and an export) its owner did not choose.
    if not is_label(value):
        raise Unmappable(f"namespace {value!r} from {where}: expected {LABEL_EXPECTED}")
    return value


def _port(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    return value if isinstance(value, int) and 1 <= value <= 65535 else None


def _ports(
    svc: Mapping[str, Any], meta: Mapping[str, str], rules: MappingRules, address: str
) -> dict[str, int]:
    ports: dict[str, int] = {}
    main = _port(svc.get("Port"))
    if main is not None:
        named = meta.get(rules.port_name_meta_key, "")
        ports[named if is_label(named) else rules.default_port_name] = main
    prefix = rules.port_meta_prefix
    for key in sorted(meta):
        if key.startswith(prefix) and is_label(key[len(prefix):]):
            port = _port(meta[key])
            if port is not None:
                ports.setdefault(key[len(prefix):], port)
    tagged = _mapping(svc.get("TaggedAddresses"))
    for key in sorted(tagged):
        value = tagged[key]
        if key in CONSUL_TAGGED or not is_label(key) or not isinstance(value, Mapping):
            continue
        port = _port(value.get("Port", value.get("port")))
        at = _text(value.get("Address", value.get("address")))
        if port is not None and (not at or at == address):
            ports.setdefault(key, port)
    if not ports:
        raise Unmappable(
            "no port: Service.Port is 0 and no meta key or tagged address names a port"
        )
    if len(ports) > MAX_PORTS:
        raise Unmappable(f"{len(ports)} ports: expected at most {MAX_PORTS}")
    return ports


def _health(
    checks: list[Any], service_id: str, rules: MappingRules
) -> tuple[Health, str, bool, bool]:
    """(health, output of the worst check, a warning counted, own maintenance mode on)."""
    worst: tuple[int, str] | None = None
    warned = maintenance = False
    for c in sorted((c for c in checks if isinstance(c, Mapping)),
                    key=lambda c: _text(c.get("CheckID"))):
        cid, status = _text(c.get("CheckID")), _text(c.get("Status"))
        if cid == SERVICE_MAINTENANCE + service_id:
            maintenance = True
        if status == "passing":
            continue
        rank = 1 if status == "warning" else 2  # anything unknown counts as critical
        warned = warned or rank == 1
        text = _text(c.get("Output")) or _text(c.get("Notes"))
        line = f"{_text(c.get('Name')) or cid}: {text}" if text else _text(c.get("Name")) or cid
        if worst is None or rank > worst[0]:
            worst = (rank, line[:MAX_OUTPUT])
    if worst is None:
        return Health.PASSING, "", False, maintenance
    if worst[0] == 2:
        return Health.CRITICAL, worst[1], warned, maintenance
    return rules.warning_is, worst[1], warned, maintenance


def _weight(svc: Mapping[str, Any], meta: Mapping[str, str], warned: bool) -> int:
    raw = meta.get(META_WEIGHT)
    if raw is not None and raw.isascii() and raw.isdigit() and int(raw) <= MAX_WEIGHT:
        return int(raw)
    weights = _mapping(svc.get("Weights"))
    value = weights.get("Warning" if warned else "Passing", 1)
    if not isinstance(value, int) or isinstance(value, bool):
        return 1
    return max(0, min(MAX_WEIGHT, value))


def _labels(
    meta: Mapping[str, str], tags: list[str], rules: MappingRules, registered: bool
) -> dict[str, str]:
    """Isthmus writes labels as `key=value` tags (and the namespace into meta): every such tag
    of a service it registered is a label, whatever its key."""
    reserved = {rules.namespace_meta_key, rules.port_name_meta_key}
    found: dict[str, str] = {}
    for key in sorted(meta):
        if (key in reserved or key.startswith(RESERVED_META_PREFIX)
                or key.startswith(rules.port_meta_prefix)):
            continue
        found[key] = meta[key]
    for tag in sorted(tags):
        if (not registered and rules.namespace_tag_prefix
                and tag.startswith(rules.namespace_tag_prefix)):
            continue
        key, eq, value = tag.partition("=")
        if eq:
            found.setdefault(key, value)
    valid = {k: v for k, v in found.items() if LABEL_KEY_RE.fullmatch(k) and len(v) <= 253}
    return dict(sorted(valid.items())[:MAX_LABELS])


def _check(meta: Mapping[str, str], checks: list[Any], service_id: str) -> Check | None:
    raw = meta.get(META_CHECK)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        if isinstance(record, list) and len(record) == 8 and record[1] is None:
            record[1] = _check_target(record[0], checks, service_id)
        return _parse_check(record)
    except (ValueError, TypeError):
        return None  # the health still comes from Consul; only the description is lost


def _check_target(kind: Any, checks: list[Any], service_id: str) -> str:
    """A URL too long for a meta value is read from the check's own definition."""
    for c in checks:
        if isinstance(c, Mapping) and c.get("CheckID") == check_id(service_id):
            definition = _mapping(c.get("Definition"))
            return _text(definition.get("HTTP" if kind == "http" else "TCP"))
    return ""


# --- writing ----------------------------------------------------------------------------------


def registration(workload: Workload, rules: MappingRules, rev: str) -> dict[str, Any]:
    """Keyword arguments for py-consul's `agent.service.register` (the body of
    `PUT /v1/agent/service/register?replace-existing-checks=true`)."""
    w = workload
    names = list(w.ports)
    main = names[0]
    meta = {
        META_SOURCE: w.source,
        rules.namespace_meta_key: w.service.namespace,
        rules.port_name_meta_key: main,
        META_REV: rev,
    }
    for name in names[1:]:
        meta[rules.port_meta_prefix + name] = str(w.ports[name])
    if w.weight == 0:
        meta[META_WEIGHT] = "0"
    if w.locality.region:
        meta[META_REGION] = w.locality.region
    if w.locality.zone:
        meta[META_ZONE] = w.locality.zone
    if w.check is not None:
        meta[META_CHECK] = _check_record(w.check)
    weight = max(1, w.weight)
    return {
        "name": w.service.name,
        "service_id": w.id,
        "address": w.address,
        "port": w.ports[main],
        "tags": [f"{k}={v}" for k, v in sorted(w.labels.items())],
        "meta": meta,
        "weights": {"Passing": weight, "Warning": weight},
        "check": None if w.check is None else consul_check(w.id, w.check),
        "replace_existing_checks": True,
    }


def _check_record(c: Check) -> str:
    record: list[Any] = [c.kind.value, c.target, c.interval, c.timeout, c.ttl,
                         c.success_threshold, c.failure_threshold, c.deregister_after]
    text = json.dumps(record, separators=(",", ":"))
    if len(text) > MAX_META_VALUE:
        record[1] = None  # read back from the check's definition
        text = json.dumps(record, separators=(",", ":"))
    return text


def consul_check(service_id: str, c: Check) -> dict[str, Any]:
    """An Isthmus check as a Consul agent check: Consul's agent runs it from then on."""
    out: dict[str, Any] = {"CheckID": check_id(service_id), "Name": f"isthmus {c.kind.value} check"}
    if c.kind is CheckKind.TTL:
        out["TTL"] = fmt(c.ttl)
    else:
        out["HTTP" if c.kind is CheckKind.HTTP else "TCP"] = c.target
        out["Interval"] = fmt(c.interval)
        out["Timeout"] = fmt(c.timeout)
        if c.success_threshold > 1:
            out["SuccessBeforePassing"] = c.success_threshold
        if c.failure_threshold > 1:
            out["FailuresBeforeCritical"] = c.failure_threshold
    if c.deregister_after is not None:
        out["DeregisterCriticalServiceAfter"] = fmt(c.deregister_after)
    return out
