"""The appliance configuration (DESIGN §7): YAML in, typed immutable objects out.

Every key has a default except `cluster` and `trust_domain`. A bad file is reported whole:
one line per problem naming the key path, the value and what was expected. Every duration and
number has bounds (docs/configuration.md, docs/security.md).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from discovery.addresses import AddressError, split_host_port
from discovery.durations import format_limit, parse_duration
from discovery.health import DEFAULT_MAX_PROBES_PER_SECOND
from discovery.limits import DEFAULT_MIN_CHECK_INTERVAL
from discovery.names import LABEL_EXPECTED, is_label
from discovery.schema import StaticWorkload, describe_errors

DEFAULT_CONFIG_PATHS = ("/etc/isthmus/isthmus.yaml",)
KNOWN_ROLES = ("control", "ingress", "egress", "dns", "agent")


class ConfigError(Exception):
    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


# --- field types -----------------------------------------------------------------------------


def _label(value: object) -> object:
    if not is_label(value):
        raise ValueError(f"expected {LABEL_EXPECTED}")
    return value


def _dns_name(value: object) -> object:
    if not isinstance(value, str) or len(value) > 253 or not all(
        is_label(p) for p in value.split(".")
    ):
        raise ValueError("expected a DNS name of lowercase labels separated by '.'")
    return value


def _listen(value: object) -> str:
    """`HOST:PORT` to listen on: an IP address (or `localhost`) and a port 0-65535."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("expected IP:PORT, e.g. 127.0.0.1:15000 or [::1]:15000")
    try:
        host, _ = split_host_port(value)
    except AddressError:
        raise ValueError("expected IP:PORT with a port from 0 to 65535") from None
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("expected IP:PORT where IP is an IPv4 or IPv6 address") from None
    return value


def _endpoint(value: object) -> str:
    """`HOST:PORT` to connect to: an IP address or DNS name and a port 1-65535."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("expected HOST:PORT")
    try:
        host, _ = split_host_port(value, min_port=1)
    except AddressError:
        raise ValueError("expected HOST:PORT with a port from 1 to 65535") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(is_label(p.lower()) for p in host.split(".")):
            raise ValueError("expected HOST:PORT where HOST is an IP address or DNS name") from None
    return value


def _cidr(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a CIDR such as 240.240.0.0/16")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"expected a CIDR such as 240.240.0.0/16 ({e})") from None
    if net.num_addresses < 4:
        raise ValueError("expected a range of at least 4 addresses")
    return value


def _duration_between(minimum: float, maximum: float) -> BeforeValidator:
    def check(value: object) -> float:
        seconds = parse_duration(value, maximum)
        if seconds < minimum:
            raise ValueError(f"expected a duration of at least {format_limit(minimum)}")
        return seconds

    return BeforeValidator(check)


def _loopback_listen(value: str) -> str:
    """The aiomonitor console has no authentication and can cancel any task: loopback only."""
    host = split_host_port(value)[0]
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(
            "expected a loopback address (127.0.0.1, [::1] or localhost): the monitor console "
            "has no authentication and can cancel any task; reach it remotely through SSH"
        )
    return value


def _network(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an IP address or CIDR such as 198.51.100.0/24")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("expected an IP address or CIDR such as 198.51.100.0/24") from None
    return value


def _glob(value: str) -> str:
    # A glob over `name.namespace`; reject what could never match a service.
    if not value or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789-.*?[]!" for c in value):
        raise ValueError("expected a glob over NAME.NAMESPACE such as '*.default'")
    fnmatch.translate(value)
    return value


Label = Annotated[StrictStr, BeforeValidator(_label)]
DnsName = Annotated[StrictStr, BeforeValidator(_dns_name)]
Listen = Annotated[StrictStr, BeforeValidator(_listen)]
HostPort = Annotated[StrictStr, BeforeValidator(_endpoint)]
Cidr = Annotated[StrictStr, BeforeValidator(_cidr)]
# A timeout of a listener: more than nothing, at most an hour.
Timeout = Annotated[float, _duration_between(0.001, 3600.0)]
Network = Annotated[StrictStr, BeforeValidator(_network)]
Count = Annotated[StrictInt, Field(ge=1, le=1_000_000)]
DrainTimeout = Annotated[float, _duration_between(0.0, 3600.0)]
CheckFloor = Annotated[float, _duration_between(0.001, 3600.0)]
LoopbackListen = Annotated[Listen, AfterValidator(_loopback_listen)]
ExportGlob = Annotated[StrictStr, AfterValidator(_glob)]
PathStr = Annotated[StrictStr, Field(min_length=1)]


class _Section(BaseModel):
    """One section of the YAML file (`ingress:`, `egress:` ...): named `*Section`, so that it is
    never confused with the data plane's `*Config` dataclasses (`gateway.ingress.IngressConfig`
    ...), which the appliance builds from the sections."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalitySection(_Section):
    region: StrictStr = ""
    zone: StrictStr = ""


class TrustSection(_Section):
    bundle: PathStr = "/etc/isthmus/pki/bundle.pem"
    ca_cert: PathStr = "/etc/isthmus/pki/cluster-ca.pem"
    ca_key: PathStr = "/etc/isthmus/pki/cluster-ca.key"
    # This node's own identity, which it (re)writes: under data_dir unless set (see Config), so
    # two appliances on one host never take each other's.
    cert: PathStr = "/var/lib/isthmus/pki/node.pem"
    key: PathStr = "/var/lib/isthmus/pki/node.key"


Scope = Literal["admin", "read", "workloads", "traffic", "tokens"]


class ApiToken(_Section):
    token_file: PathStr
    scopes: list[Scope] = Field(min_length=1)


class _HttpListener(_Section):
    """Limits of an HTTP listener (docs/security.md): slow or idle clients are closed, and no
    source, nor all of them together, can hold more connections than these."""

    header_timeout: Timeout = 10.0  # connection ready to its first complete request head
    idle_timeout: Timeout = 60.0  # keep-alive: a response to the next complete request head
    max_connections: Count = 256  # also at most a share of the open-files limit
    max_connections_per_source: Count = 64  # an IPv4 address or an IPv6 /64


class ApiSection(_HttpListener):
    listen: Listen = "127.0.0.1:15000"
    token_file: PathStr = "/etc/isthmus/api-token"
    tokens: list[ApiToken] = []  # extra, narrower tokens (the token_file one is admin)
    max_body: Annotated[StrictInt, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    console: StrictBool = True  # the web console at /ui/ (static files; the API checks tokens)
    # Recent events the console lists (GET /v1/events): a ring of this many, oldest dropped.
    events: Annotated[StrictInt, Field(ge=10, le=100_000)] = 1000


class ControlSection(_HttpListener):
    listen: Listen = "0.0.0.0:15012"
    # After a restart of the control node, agents get this long to reconnect before their
    # workloads are held critical.
    agent_grace: Annotated[float, _duration_between(0.0, 3600.0)] = 30.0
    # Workloads of an agent disconnected this long are deregistered (null: never).
    agent_reap_after: Annotated[float, _duration_between(60.0, 365 * 86400.0)] | None = (
        72 * 3600.0
    )
    handshake_timeout: Timeout = 10.0  # TLS: accept to a finished handshake
    max_connections: Count = 4096  # every agent keeps a WebSocket open
    max_connections_per_source: Count = 32


class AgentSection(_Section):
    control: HostPort | None = None
    bootstrap_token_file: PathStr = "/etc/isthmus/bootstrap-token"


class MetricsSection(_Section):
    listen: Listen = "0.0.0.0:15090"
    enabled: StrictBool = True


class IngressSection(_Section):
    listen: Listen = "0.0.0.0:15443"
    public_address: HostPort | None = None
    # Connections before their relay ("pending": ClientHello, handshake, endpoint connect) are
    # shared by source so that a flood from one address cannot starve the peers.
    client_hello_timeout: Timeout = 2.0
    handshake_timeout: Timeout = 10.0
    max_pending: Count = 512
    max_pending_per_source: Count = 16  # unknown sources: an IPv4 address or an IPv6 /64
    max_pending_per_peer: Count = 128  # known peers
    reserved_pending_share: Annotated[float, Field(ge=0, le=0.9)] = 0.5  # for known peers only
    peer_sources: list[Network] = []  # peers' source addresses, beyond federation.peers

    @model_validator(mode="after")
    def _deadlines(self) -> IngressSection:
        if self.client_hello_timeout >= self.handshake_timeout:
            raise ValueError(
                f"client_hello_timeout ({self.client_hello_timeout:g}s) must be shorter than "
                f"handshake_timeout ({self.handshake_timeout:g}s)"
            )
        return self


class EgressSection(_Section):
    vip_cidr: Cidr = "127.240.0.0/16"
    # Remote clusters through multiplexed tunnels (streams on a few mutual-TLS connections per
    # remote ingress); false gives every client connection a TLS connection of its own.
    multiplex: StrictBool = True
    tunnel_connections: Annotated[StrictInt, Field(ge=1, le=64)] = 2
    # A tunnel OPEN unanswered for 0.5 s, with nothing heard from the peer since, sends a PING;
    # no frame back within this and the tunnel's waiting OPENs fail at once (retried elsewhere).
    tunnel_probe_timeout: Annotated[float, _duration_between(0.1, 60.0)] = 1.0
    # VIP listeners (file descriptors) at most; null: a quarter of the open-file limit.
    max_listeners: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None


def _is_corefile_path(value: object) -> bool:
    """A Corefile always has a server block; text without '{' can only be a file's path."""
    return isinstance(value, str) and "{" not in value and "\n" not in value.strip()


def _corefile(value: object) -> object:
    if not _is_corefile_path(value):
        return value
    assert isinstance(value, str)
    path = Path(os.path.expanduser(value.strip()))
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(
            f"expected a Corefile's text (such as 'global:53 {{ global }}') or the path of a "
            f"Corefile; cannot read {str(path)!r}: {why}"
        ) from None


class DnsSection(_Section):
    listen: Listen = "0.0.0.0:53"
    # The Corefile's text, or the path of a file holding it.
    corefile: Annotated[StrictStr, BeforeValidator(_corefile)] | None = None
    # Open TCP connections per listener, in all and from one source (an IPv4 address or an
    # IPv6 /64): one host holding connections cannot keep the others' TCP queries out.
    max_tcp_connections: Count = 1000
    max_tcp_connections_per_source: Count = 64


def _consul_address(value: object) -> str:
    """`http://HOST:PORT` or `https://HOST:PORT` of the local Consul agent."""
    if not isinstance(value, str):
        raise ValueError("expected http://HOST:PORT or https://HOST:PORT")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https") or "/" in rest.rstrip("/"):
        raise ValueError("expected http://HOST:PORT or https://HOST:PORT (no path)")
    _endpoint(rest.rstrip("/"))
    return f"{scheme}://{rest.rstrip('/')}"


def _meta_key(value: object) -> str:
    # Consul's rule for service meta keys; its `consul-` prefix is reserved.
    if (not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", value)
            or value.startswith("consul-")):
        raise ValueError(
            "expected a Consul meta key: 1-128 letters, digits, '_' or '-', not starting "
            "with 'consul-'"
        )
    return value


def _datacenter(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError("expected a Consul datacenter name: letters, digits, '_' or '-'")
    return value


ConsulAddress = Annotated[StrictStr, BeforeValidator(_consul_address)]
MetaKey = Annotated[StrictStr, AfterValidator(_meta_key)]


class ConsulTlsSection(_Section):
    ca_file: PathStr | None = None  # null: the system's CAs
    cert_file: PathStr | None = None  # a client certificate, for Consul's verify_incoming
    key_file: PathStr | None = None

    @model_validator(mode="after")
    def _pair(self) -> ConsulTlsSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


class ConsulLocalitySection(_Section):
    region: MetaKey = "region"  # node meta keys holding a workload's locality
    zone: MetaKey = "zone"


class ConsulSection(_Section):
    address: ConsulAddress = "http://127.0.0.1:8500"
    token_file: PathStr | None = None
    datacenter: Annotated[StrictStr, AfterValidator(_datacenter)] | None = None
    tls: ConsulTlsSection = ConsulTlsSection()
    stale_reads: StrictBool = False
    warning_is: Literal["passing", "critical"] = "passing"
    namespace_meta_key: MetaKey = "isthmus-namespace"
    namespace_tag_prefix: Annotated[StrictStr, Field(min_length=1, max_length=128)] = (
        "isthmus-namespace="
    )
    port_name_meta_key: MetaKey = "isthmus-port"
    port_meta_prefix: MetaKey = "isthmus-port-"
    default_port_name: Label = "tcp"
    locality_node_meta: ConsulLocalitySection = ConsulLocalitySection()
    kv_prefix: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None
    ignore_services: list[Annotated[StrictStr, Field(min_length=1)]] = ["consul"]
    wait: Annotated[float, _duration_between(1.0, 600.0)] = 300.0
    request_timeout: Annotated[float, _duration_between(0.1, 300.0)] = 10.0
    liveness_interval: Annotated[float, _duration_between(0.1, 3600.0)] = 10.0
    retry_max: Annotated[float, _duration_between(0.1, 3600.0)] = 30.0
    query_min_interval: Annotated[float, _duration_between(0.01, 3600.0)] = 1.0
    max_connections: Annotated[StrictInt, Field(ge=16, le=100_000)] = 192
    startup_timeout: Annotated[float, _duration_between(0.0, 3600.0)] = 10.0

    @model_validator(mode="after")
    def _meta_keys(self) -> ConsulSection:
        if self.port_name_meta_key.startswith(self.port_meta_prefix):
            raise ValueError(
                f"port_name_meta_key {self.port_name_meta_key!r} starts with port_meta_prefix "
                f"{self.port_meta_prefix!r}: it would read as a port of its own"
            )
        return self


class DiscoverySection(_Section):
    backend: Literal["embedded", "consul"] = "embedded"
    consul: ConsulSection = ConsulSection()
    workloads: list[StaticWorkload] = []
    max_concurrent_checks: Annotated[StrictInt, Field(ge=1, le=100000)] = 1024
    # No check runs more often than this; registrations asking for more are refused (422).
    min_check_interval: CheckFloor = DEFAULT_MIN_CHECK_INTERVAL
    # Probes started per second across every workload.
    max_checks_per_second: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = (
        DEFAULT_MAX_PROBES_PER_SECOND
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> DiscoverySection:
        seen: set[str] = set()
        for w in self.workloads:
            if w.id in seen:
                raise ValueError(f"workload id {w.id!r} appears more than once")
            seen.add(w.id)
        return self


class PeerSection(_Section):
    cluster: Label
    address: HostPort


class FederationSection(_Section):
    peers: list[PeerSection] = []
    export: list[ExportGlob] = ["*.default"]
    # A peer whose link has been down this long shows as `unreachable` instead of `stale`.
    peer_unreachable_after: Annotated[float, _duration_between(1.0, 7 * 86400.0)] = 300.0


class MonitorSection(_Section):
    enabled: StrictBool = False
    listen: LoopbackListen = "127.0.0.1:20101"


class LogSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class Config(_Section):
    cluster: Label
    trust_domain: DnsName
    node: Label = Field(default_factory=lambda: _default_node())
    locality: LocalitySection = LocalitySection()
    roles: list[Literal["control", "ingress", "egress", "dns", "agent"]] = Field(
        default=["control"], min_length=1
    )
    data_dir: PathStr = "/var/lib/isthmus"
    trust: TrustSection = TrustSection()
    api: ApiSection = ApiSection()
    control: ControlSection = ControlSection()
    agent: AgentSection = AgentSection()
    metrics: MetricsSection = MetricsSection()
    ingress: IngressSection = IngressSection()
    egress: EgressSection = EgressSection()
    dns: DnsSection = DnsSection()
    discovery: DiscoverySection = DiscoverySection()
    federation: FederationSection = FederationSection()
    monitor: MonitorSection = MonitorSection()
    log: LogSection = LogSection()
    workers: Annotated[StrictInt, Field(ge=1, le=256)] = 1
    drain_timeout: DrainTimeout = 10.0

    @model_validator(mode="before")
    @classmethod
    def _identity_under_data_dir(cls, raw: Any) -> Any:
        """trust.cert/trust.key default to <data_dir>/pki/node.{pem,key}."""
        if not isinstance(raw, Mapping):
            return raw
        data_dir = raw.get("data_dir", "/var/lib/isthmus")
        trust = raw.get("trust", {})
        if not isinstance(data_dir, str) or not data_dir or not isinstance(trust, Mapping):
            return raw  # the field validators report what is wrong
        filled = dict(trust)
        filled.setdefault("cert", str(Path(data_dir) / "pki" / "node.pem"))
        filled.setdefault("key", str(Path(data_dir) / "pki" / "node.key"))
        return {**raw, "trust": filled}

    @model_validator(mode="after")
    def _roles(self) -> Config:
        if len(set(self.roles)) != len(self.roles):
            raise ValueError(f"roles {self.roles}: each role may appear once")
        if "agent" in self.roles and "control" in self.roles:
            raise ValueError("roles: 'agent' (a VM) and 'control' cannot be combined")
        return self


def _default_node() -> str:
    raw = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in raw).strip("-")[:63]
    return cleaned if is_label(cleaned) else "node"


# --- loading -------------------------------------------------------------------------------

PATH_KEYS = (
    ("data_dir",),
    ("trust", "bundle"), ("trust", "ca_cert"), ("trust", "ca_key"),
    ("trust", "cert"), ("trust", "key"),
    ("api", "token_file"), ("agent", "bootstrap_token_file"),
    ("discovery", "consul", "token_file"),
    ("discovery", "consul", "tls", "ca_file"),
    ("discovery", "consul", "tls", "cert_file"),
    ("discovery", "consul", "tls", "key_file"),
)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file are relative to the file, not to the working directory."""
    for keys in PATH_KEYS:
        node: Any = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            p = Path(os.path.expanduser(node[keys[-1]]))
            node[keys[-1]] = str(p if p.is_absolute() else (base / p))
    dns = raw.get("dns")
    if isinstance(dns, dict) and _is_corefile_path(dns.get("corefile")):
        p = Path(os.path.expanduser(dns["corefile"].strip()))
        dns["corefile"] = str(p if p.is_absolute() else base / p)
    api = raw.get("api")
    if isinstance(api, dict) and isinstance(api.get("tokens"), list):
        for t in api["tokens"]:
            if isinstance(t, dict) and isinstance(t.get("token_file"), str):
                p = Path(os.path.expanduser(t["token_file"]))
                t["token_file"] = str(p if p.is_absolute() else base / p)


def validate(raw: object, source: str = "config") -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError([f"expected a mapping of keys at the top level, got {raw!r}"], source)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        problems = [f"{path}: {msg}" if path else msg for path, msg in describe_errors(e)]
        raise ConfigError(problems, source) from None
    problems = _below_check_floor(cfg.discovery)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _below_check_floor(d: DiscoverySection) -> list[str]:
    """Static workloads meet `discovery.min_check_interval` like API registrations do."""
    floor = d.min_check_interval
    problems = []
    for i, w in enumerate(d.workloads):
        c = w.check
        if c is None:
            continue
        field, value = ("ttl", c.ttl) if c.ttl is not None else ("interval", c.interval)
        if value < floor:
            problems.append(
                f"discovery.workloads.{i}.check.{field}: {format_limit(value)} is below "
                f"discovery.min_check_interval ({format_limit(floor)})"
            )
    return problems


def _loopback(listen: str) -> bool:
    host = split_host_port(listen)[0]
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def listeners_in_use(cfg: Config) -> list[tuple[str, str]]:
    """(key, address) of every listener this config opens. The control listener is counted for
    the control role (it opens when the node holds the cluster CA)."""
    roles = set(cfg.roles)
    candidates = [
        ("api.listen", cfg.api.listen, bool({"control", "agent"} & roles)),
        ("control.listen", cfg.control.listen, "control" in roles),
        ("metrics.listen", cfg.metrics.listen, cfg.metrics.enabled),
        ("ingress.listen", cfg.ingress.listen, "ingress" in roles),
        ("dns.listen", cfg.dns.listen, bool({"dns", "agent"} & roles)),
        ("monitor.listen", cfg.monitor.listen, cfg.monitor.enabled),
    ]
    return [(key, listen) for key, listen, used in candidates if used]


def exposed_listeners(cfg: Config) -> list[tuple[str, str]]:
    """(key, address) of every listener this config opens beyond loopback."""
    return [(key, listen) for key, listen in listeners_in_use(cfg) if not _loopback(listen)]


def load(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a config file; `overrides` replace top-level keys (e.g. data_dir from
    the command line) before validation, so what derives from them follows."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror}"], str(p)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{where}invalid YAML: {problem}"], str(p)) from None
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw.update(overrides or {})
        _resolve_paths(raw, p.resolve().parent)
    return validate(raw, str(p))


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local/state")
    return Path(base) / "isthmus"


# Roles that read the routing table, which this build computes on the control node itself.
NEEDS_CONTROL = frozenset({"dns", "ingress", "egress"})


def role_problems(cfg: Config) -> list[str]:
    """What start-up refuses about the roles that the schema alone cannot see."""
    roles = set(cfg.roles)
    out = []
    if "agent" in roles:
        if cfg.agent.control is None:
            out.append("agent.control: required for an agent (its control node HOST:PORT)")
        return out
    if roles & NEEDS_CONTROL and "control" not in roles:
        out.append(
            f"roles: {sorted(roles & NEEDS_CONTROL)} need 'control' on the same node in this "
            "build (the routing table is computed there)"
        )
    return out


def local_default(data_dir: str | None = None) -> Config:
    """`isthmus run` with no config: one cluster `local` on loopback, state under the user's
    state directory, every listener on 127.0.0.1."""
    d = Path(data_dir) if data_dir else state_dir()
    pki = d / "pki"
    return validate(
        {
            "cluster": "local",
            "trust_domain": "local.isthmus",
            "roles": ["control", "ingress", "egress", "dns"],
            "node": _default_node(),
            "data_dir": str(d),
            "trust": {
                "bundle": str(pki / "bundle.pem"),
                "ca_cert": str(pki / "cluster-ca.pem"),
                "ca_key": str(pki / "cluster-ca.key"),
                "cert": str(pki / "node.pem"),
                "key": str(pki / "node.key"),
            },
            "api": {"listen": "127.0.0.1:15000", "token_file": str(d / "api-token")},
            "control": {"listen": "127.0.0.1:15012"},
            "metrics": {"listen": "127.0.0.1:15090"},
            "ingress": {"listen": "127.0.0.1:15443"},
            "dns": {"listen": "127.0.0.1:15053"},
        },
        "built-in default",
    )


