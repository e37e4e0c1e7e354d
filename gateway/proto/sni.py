"""Cross-cluster server names (DESIGN §3).

- a service port: `<port>.<name>.<namespace>.<cluster>.<trust_domain>`, where `<port>` is the
  service's port *name* (a DNS label; names are what local endpoints agree on, numbers are not);
- peering: the reserved `federation.<cluster>.<trust_domain>`;
- health probes of an ingress: the reserved `probe.<cluster>.<trust_domain>` (the ingress
  completes the mutual-TLS handshake and closes; no endpoint or peering handler is involved);
- multiplexed tunnels: the reserved `tunnel.<cluster>.<trust_domain>` (`gateway.proto.mux`: each
  stream names its service port with a service SNI in its OPEN frame).

The trust domain may contain dots, so a name is parsed against a known trust domain: strip
`.<trust_domain>`, then two labels left mean peering and four mean a service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from discovery.names import LABEL_EXPECTED, ServiceKey, is_label
from gateway.errors import SniError

__all__ = [
    "FEDERATION_LABEL",
    "MAX_SNI",
    "PROBE_LABEL",
    "TUNNEL_LABEL",
    "FederationSni",
    "ProbeSni",
    "ServiceSni",
    "TunnelSni",
    "federation_sni",
    "parse_sni",
    "probe_sni",
    "service_sni",
    "tunnel_sni",
    "validate_trust_domain",
]

FEDERATION_LABEL = "federation"
PROBE_LABEL = "probe"
TUNNEL_LABEL = "tunnel"
MAX_SNI = 253


@dataclass(frozen=True, slots=True)
class ServiceSni:
    port: str
    service: ServiceKey
    cluster: str
    trust_domain: str

    def __str__(self) -> str:
        s = self.service
        return f"{self.port}.{s.name}.{s.namespace}.{self.cluster}.{self.trust_domain}"


@dataclass(frozen=True, slots=True)
class _ReservedSni:
    """`<LABEL>.<cluster>.<trust_domain>`: a name of the ingress itself, not of a service."""

    LABEL: ClassVar[str]
    cluster: str
    trust_domain: str

    def __str__(self) -> str:
        return f"{self.LABEL}.{self.cluster}.{self.trust_domain}"


@dataclass(frozen=True, slots=True)
class FederationSni(_ReservedSni):
    LABEL: ClassVar[str] = FEDERATION_LABEL


@dataclass(frozen=True, slots=True)
class ProbeSni(_ReservedSni):
    LABEL: ClassVar[str] = PROBE_LABEL


@dataclass(frozen=True, slots=True)
class TunnelSni(_ReservedSni):
    LABEL: ClassVar[str] = TUNNEL_LABEL


_RESERVED: dict[str, type[_ReservedSni]] = {
    c.LABEL: c for c in (FederationSni, ProbeSni, TunnelSni)
}


def validate_trust_domain(trust_domain: str) -> str:
    """Return the trust domain if it can end a host name (dot-separated DNS labels)."""
    if not trust_domain or len(trust_domain) > MAX_SNI:
        raise SniError(f"trust domain {trust_domain!r} must be 1-{MAX_SNI} characters")
    for label in trust_domain.split("."):
        if not is_label(label):
            raise SniError(
                f"trust domain {trust_domain!r}: label {label!r} is not {LABEL_EXPECTED}"
            )
    return trust_domain


def _check_label(what: str, value: str) -> None:
    if not is_label(value):
        raise SniError(f"{what} {value!r} is not {LABEL_EXPECTED}")


def _check_length(sni: str) -> str:
    if len(sni) > MAX_SNI:
        raise SniError(f"server name of {len(sni)} characters is longer than {MAX_SNI}")
    return sni


def service_sni(port: str, service: ServiceKey, cluster: str, trust_domain: str) -> str:
    """Format the SNI an egress sends to reach `service`'s `port` in `cluster`."""
    _check_label("port name", port)
    _check_label("service name", service.name)
    _check_label("namespace", service.namespace)
    _check_label("cluster", cluster)
    validate_trust_domain(trust_domain)
    return _check_length(str(ServiceSni(port, service, cluster, trust_domain)))


def _reserved_sni(kind: type[_ReservedSni], cluster: str, trust_domain: str) -> str:
    _check_label("cluster", cluster)
    validate_trust_domain(trust_domain)
    return _check_length(str(kind(cluster, trust_domain)))


def federation_sni(cluster: str, trust_domain: str) -> str:
    """Format the reserved SNI that carries peering to `cluster`."""
    return _reserved_sni(FederationSni, cluster, trust_domain)


def probe_sni(cluster: str, trust_domain: str) -> str:
    """Format the reserved SNI that health-probes `cluster`'s ingress."""
    return _reserved_sni(ProbeSni, cluster, trust_domain)


def tunnel_sni(cluster: str, trust_domain: str) -> str:
    """Format the reserved SNI of a multiplexed tunnel to `cluster`'s ingress."""
    return _reserved_sni(TunnelSni, cluster, trust_domain)


def parse_sni(
    server_name: str, trust_domain: str
) -> ServiceSni | FederationSni | ProbeSni | TunnelSni:
    """Parse a server name under `trust_domain`; raises SniError saying what is wrong."""
    if not server_name.isascii():  # lower() would fold e.g. KELVIN SIGN into "k"
        raise SniError(f"server name {server_name!r} is not ASCII")
    name = server_name.lower()
    _check_length(name)
    suffix = "." + validate_trust_domain(trust_domain)
    if not name.endswith(suffix):
        raise SniError(f"server name {server_name!r} is not under trust domain {trust_domain!r}")
    labels = name[: -len(suffix)].split(".")
    if len(labels) == 2 and labels[0] in _RESERVED:
        _check_label("cluster", labels[1])
        return _RESERVED[labels[0]](labels[1], trust_domain)
    if len(labels) != 4:
        raise SniError(
            f"server name {server_name!r} is neither <port>.<name>.<namespace>.<cluster>."
            f"{trust_domain} nor {FEDERATION_LABEL}|{PROBE_LABEL}|{TUNNEL_LABEL}.<cluster>."
            f"{trust_domain}"
        )
    port, svc, namespace, cluster = labels
    _check_label("port name", port)
    _check_label("service name", svc)
    _check_label("namespace", namespace)
    _check_label("cluster", cluster)
    return ServiceSni(port, ServiceKey(svc, namespace), cluster, trust_domain)
