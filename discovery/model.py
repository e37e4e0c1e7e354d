"""Catalog values: immutable, slotted (a catalog holds 100,000 of them)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from discovery.names import ServiceKey


class Health(enum.StrEnum):
    PASSING = "passing"
    CRITICAL = "critical"
    UNKNOWN = "unknown"


class CheckKind(enum.StrEnum):
    HTTP = "http"
    TCP = "tcp"
    TTL = "ttl"


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""

    def to_json(self) -> dict[str, str]:
        return {"region": self.region, "zone": self.zone}


EMPTY_LOCALITY = Locality()


@dataclass(frozen=True, slots=True)
class Check:
    """An active or TTL health check. Durations are seconds."""

    kind: CheckKind
    target: str  # URL for http, HOST:PORT for tcp, "" for ttl
    interval: float = 10.0
    timeout: float = 2.0
    ttl: float = 0.0
    success_threshold: int = 1
    failure_threshold: int = 1
    deregister_after: float | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.kind is CheckKind.TTL:
            out["ttl"] = format_duration(self.ttl)
        else:
            out[self.kind.value] = self.target
            out["interval"] = format_duration(self.interval)
            out["timeout"] = format_duration(self.timeout)
        if self.success_threshold != 1:
            out["success_threshold"] = self.success_threshold
        if self.failure_threshold != 1:
            out["failure_threshold"] = self.failure_threshold
        if self.deregister_after is not None:
            out["deregister_after"] = format_duration(self.deregister_after)
        return out


@dataclass(frozen=True, slots=True)
class Workload:
    """A registered workload (a VM process or a pod) and its desired state.

    `ports` and `labels` are owned by the value: built once, never mutated afterwards."""

    id: str
    service: ServiceKey
    address: str
    ports: Mapping[str, int]
    cluster: str
    labels: Mapping[str, str] = field(default_factory=dict)
    locality: Locality = EMPTY_LOCALITY
    weight: int = 1
    check: Check | None = None
    # who registered it: "api", "config" (follows config reloads) or the agent's SPIFFE ID
    # ("agent:<node>" in records of older releases); conditional writes check it
    source: str = "api"

    def to_json(self, health: Health) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id,
            "service": self.service.name,
            "namespace": self.service.namespace,
            "address": self.address,
            "ports": dict(self.ports),
            "labels": dict(self.labels),
            "locality": self.locality.to_json(),
            "weight": self.weight,
            "cluster": self.cluster,
            "health": health.value,
        }
        if self.check is not None:
            out["check"] = self.check.to_json()
        return out


@dataclass(frozen=True, slots=True)
class WorkloadState:
    """A workload with its current health, as the catalog reports it."""

    workload: Workload
    health: Health
    output: str = ""

    def to_json(self) -> dict[str, object]:
        out = self.workload.to_json(self.health)
        if self.output:
            out["health_output"] = self.output
        return out


def format_duration(seconds: float) -> str:
    if seconds == int(seconds):
        s = int(seconds)
        if s and s % 3600 == 0:
            return f"{s // 3600}h"
        if s and s % 60 == 0:
            return f"{s // 60}m"
        return f"{s}s"
    ms = seconds * 1000
    if ms == round(ms):
        return f"{round(ms)}ms"
    return f"{seconds:.9f}".rstrip("0") + "s"  # exact enough to parse back to the same value
