"""SPIFFE IDs of Isthmus (DESIGN §3): cluster CAs, gateways and agents."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from discovery.names import LABEL_EXPECTED, is_label
from federation.trust.errors import InvalidIdentity

SCHEME = "spiffe://"
TRUST_DOMAIN_EXPECTED = "a DNS name: dot-separated labels, each " + LABEL_EXPECTED
_MAX_TRUST_DOMAIN = 253


class Kind(enum.StrEnum):
    GATEWAY = "gateway"
    AGENT = "agent"


def is_trust_domain(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_TRUST_DOMAIN
        and all(is_label(part) for part in value.split("."))
    )


def check_trust_domain(value: str) -> str:
    if not is_trust_domain(value):
        raise InvalidIdentity(f"trust domain {value!r} is not {TRUST_DOMAIN_EXPECTED}")
    return value


def check_label(what: str, value: str) -> str:
    if not is_label(value):
        raise InvalidIdentity(f"{what} {value!r} is not {LABEL_EXPECTED}")
    return value


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """`spiffe://<td>/cluster/<c>` (a cluster CA) or
    `spiffe://<td>/cluster/<c>/<gateway|agent>/<node>` (a workload identity)."""

    trust_domain: str
    cluster: str
    kind: Kind | None = None
    node: str | None = None

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        check_label("cluster", self.cluster)
        if (self.kind is None) != (self.node is None):
            raise InvalidIdentity("a SPIFFE ID names both a kind and a node, or neither")
        if self.kind is not None:
            object.__setattr__(self, "kind", _kind(self.kind))
        if self.node is not None:
            check_label("node", self.node)

    @classmethod
    def for_cluster(cls, trust_domain: str, cluster: str) -> SpiffeId:
        return cls(trust_domain, cluster)

    @classmethod
    def for_node(cls, trust_domain: str, cluster: str, kind: Kind | str, node: str) -> SpiffeId:
        return cls(trust_domain, cluster, _kind(kind), node)

    @property
    def is_cluster(self) -> bool:
        return self.kind is None

    @property
    def cluster_id(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.cluster)

    @property
    def path(self) -> str:
        base = f"/cluster/{self.cluster}"
        return base if self.kind is None else f"{base}/{self.kind.value}/{self.node}"

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse a URI; raises InvalidIdentity saying what was expected."""
        if not uri.startswith(SCHEME):
            raise InvalidIdentity(f"{uri!r} is not a spiffe:// URI")
        rest = uri[len(SCHEME) :]
        td, sep, path = rest.partition("/")
        if not sep:
            raise InvalidIdentity(f"{uri!r} has no path")
        parts = path.split("/")
        if len(parts) == 2 and parts[0] == "cluster":
            return cls(td, parts[1])
        if len(parts) == 4 and parts[0] == "cluster" and parts[2] in _KINDS:
            return cls(td, parts[1], Kind(parts[2]), parts[3])
        raise InvalidIdentity(
            f"{uri!r} is not spiffe://<trust-domain>/cluster/<cluster>[/gateway|agent/<node>]"
        )


_KINDS = {k.value for k in Kind}


def _kind(value: Kind | str) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        raise InvalidIdentity(f"kind {value!r} is not one of {sorted(_KINDS)}") from None
