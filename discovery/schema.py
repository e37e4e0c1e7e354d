"""The workload registration body (API, CLI and `discovery.workloads` in the config).

Validated with pydantic so every problem is reported at once with its path; then turned into
the catalog's own immutable `Workload` value.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from discovery.addresses import AddressError, split_host_port
from discovery.durations import parse_duration
from discovery.errors import InvalidInput
from discovery.model import Check, CheckKind, Locality, Workload, format_duration
from discovery.names import DEFAULT_NAMESPACE, LABEL_EXPECTED, ServiceKey, is_label

MAX_LABELS = 64
# Each service port costs every egress one listener (one file descriptor) per VIP.
MAX_PORTS = 16
MAX_URL = 2048
# Ceilings per duration field (docs/catalog.md): beyond these a value is a typo, not a plan.
MAX_CHECK_INTERVAL = 24 * 3600.0
MAX_CHECK_TIMEOUT = 300.0
MAX_CHECK_TTL = 7 * 86400.0
MAX_DEREGISTER_AFTER = 30 * 86400.0

# Identifiers are matched whole with `fullmatch` (never `match` and `$`, which also accepts a
# final "\n"), so the check does not depend on which regex engine runs it.
WORKLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
WORKLOAD_ID_EXPECTED = (
    "1-128 chars of letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
)
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9._/-]{1,63}")


def _label(value: object) -> object:
    if not is_label(value):
        raise ValueError(f"expected {LABEL_EXPECTED}")
    return value


def _duration_at_most(maximum: float) -> BeforeValidator:
    def check(value: object) -> float:
        seconds = parse_duration(value, maximum)
        if seconds <= 0:
            raise ValueError("expected a positive duration")
        return seconds

    return BeforeValidator(check)


def _host(value: str) -> str:
    """An IP address or a DNS host name."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if (
        len(value) > 253
        or not labels
        or not all(is_label(p.lower()) for p in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError("expected an IP address or a DNS host name")
    return value.lower()


def _host_port(value: object) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("expected HOST:PORT")
    try:
        host, port = split_host_port(value, min_port=1)
    except AddressError:
        raise ValueError("expected HOST:PORT with a port from 1 to 65535") from None
    host = _host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _label_key(value: str) -> str:
    if LABEL_KEY_RE.fullmatch(value) is None:
        raise ValueError("expected 1-63 chars of letters, digits, '.', '_', '/' or '-'")
    return value


def _workload_id(value: str) -> str:
    if WORKLOAD_ID_RE.fullmatch(value) is None:
        raise ValueError(f"expected {WORKLOAD_ID_EXPECTED}")
    return value


Label = Annotated[StrictStr, BeforeValidator(_label)]
# Parsed to seconds (each with its ceiling); written back as a duration string, the form the
# API takes.
_AS_DURATION = PlainSerializer(format_duration, return_type=str, when_used="json")
Interval = Annotated[float, _duration_at_most(MAX_CHECK_INTERVAL), _AS_DURATION]
Timeout = Annotated[float, _duration_at_most(MAX_CHECK_TIMEOUT), _AS_DURATION]
Ttl = Annotated[float, _duration_at_most(MAX_CHECK_TTL), _AS_DURATION]
DeregisterAfter = Annotated[float, _duration_at_most(MAX_DEREGISTER_AFTER), _AS_DURATION]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
LabelKey = Annotated[StrictStr, Field(min_length=1, max_length=63), AfterValidator(_label_key)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalitySpec(_Strict):
    region: Annotated[StrictStr, Field(max_length=63)] = ""
    zone: Annotated[StrictStr, Field(max_length=63)] = ""


class CheckSpec(_Strict):
    http: Annotated[StrictStr, Field(max_length=MAX_URL)] | None = None
    tcp: StrictStr | None = None
    ttl: Ttl | None = None
    interval: Interval = 10.0
    timeout: Timeout = 2.0
    success_threshold: Annotated[StrictInt, Field(ge=1, le=100)] = 1
    failure_threshold: Annotated[StrictInt, Field(ge=1, le=100)] = 1
    deregister_after: DeregisterAfter | None = None

    @field_validator("http")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        # urlsplit silently drops tabs and newlines; the probe would send what is stored
        if any(c.isspace() or not c.isprintable() for c in v):
            raise ValueError("expected a URL without whitespace or control characters")
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host")
        try:
            _ = parts.port
        except ValueError as e:
            raise ValueError(f"expected a valid port in the URL ({e})") from None
        return v

    @field_validator("tcp")
    @classmethod
    def _tcp(cls, v: str | None) -> str | None:
        return None if v is None else _host_port(v)

    @model_validator(mode="after")
    def _exactly_one(self) -> CheckSpec:
        kinds = [k for k in ("http", "tcp", "ttl") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("expected exactly one of 'http', 'tcp' or 'ttl'")
        if self.timeout > self.interval and self.ttl is None:
            raise ValueError("expected 'timeout' no longer than 'interval'")
        return self

    def to_check(self) -> Check:
        if self.ttl is not None:
            kind, target = CheckKind.TTL, ""
        elif self.http is not None:
            kind, target = CheckKind.HTTP, self.http
        else:
            kind, target = CheckKind.TCP, self.tcp or ""
        return Check(
            kind=kind,
            target=target,
            interval=self.interval,
            timeout=self.timeout,
            ttl=self.ttl or 0.0,
            success_threshold=self.success_threshold,
            failure_threshold=self.failure_threshold,
            deregister_after=self.deregister_after,
        )


class WorkloadSpec(_Strict):
    service: Label
    namespace: Label = DEFAULT_NAMESPACE
    address: StrictStr
    ports: dict[Label, Port] = Field(min_length=1, max_length=MAX_PORTS)
    labels: dict[LabelKey, Annotated[StrictStr, Field(max_length=253)]] = Field(
        default_factory=dict, max_length=MAX_LABELS
    )
    locality: LocalitySpec = LocalitySpec()
    weight: Annotated[StrictInt, Field(ge=0, le=10000)] = 1
    check: CheckSpec | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        # The gateways connect to it as it is: no name resolution on the data path.
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(
                "expected the workload's IPv4 or IPv6 address (the gateways connect to it "
                "directly; host names are not resolved)"
            ) from None

    def to_workload(self, workload_id: str, cluster: str, source: str = "api") -> Workload:
        return Workload(
            id=workload_id,
            service=ServiceKey(self.service, self.namespace),
            address=self.address,
            ports=dict(self.ports),
            cluster=cluster,
            labels=dict(self.labels),
            locality=Locality(self.locality.region, self.locality.zone),
            weight=self.weight,
            check=None if self.check is None else self.check.to_check(),
            source=source,
        )


class StaticWorkload(WorkloadSpec):
    """A registration in the config file: the API body plus its id."""

    id: Annotated[StrictStr, AfterValidator(_workload_id)]

    def to_body(self) -> dict[str, Any]:
        """The registration body as the API and the agent channel take it (durations as
        strings such as '500ms')."""
        return self.model_dump(mode="json", exclude={"id"}, exclude_none=True)


def error_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def describe_errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(path, message) per problem, the message naming the value and what was expected."""
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
        path = ".".join(filter(None, [prefix, error_path(loc)]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and err["type"] != "missing":
            shown = repr(err["input"])
            if len(shown) > 80:
                shown = shown[:77] + "..."
            msg = f"{msg} (got {shown})"
        out.append((path, msg))
    return out


def parse_workload(body: object, workload_id: str, cluster: str, source: str = "api") -> Workload:
    """Validate a registration body; raises InvalidInput naming the first field, all problems."""
    if WORKLOAD_ID_RE.fullmatch(workload_id) is None:
        raise InvalidInput(
            f"workload id {workload_id!r}: expected {WORKLOAD_ID_EXPECTED}", field="id"
        )
    try:
        spec = WorkloadSpec.model_validate(body)
    except ValidationError as e:
        problems = describe_errors(e)
        raise InvalidInput(
            "; ".join(f"{p}: {m}" if p else m for p, m in problems),
            field=problems[0][0] or None,
            problems=problems,
        ) from None
    return spec.to_workload(workload_id, cluster, source)
