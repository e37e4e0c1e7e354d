"""The export feed peers pull from each other: protocol values and the versioned state.

Sans-IO. On the wire a feed is a stream of frames (4-byte big-endian length, then a JSON
object). The subscriber opens with `subscribe` naming the epoch and version it last saw; the
publisher answers with a full `snapshot` when it cannot tell the difference (first contact, a
restart — new epoch — or a version older than its change log), else a `delta`; then a `delta`
for every change and a `heartbeat` while nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_FRAME = 16 * 1024 * 1024
MAX_SERVICES = 100_000
CHANGELOG = 50_000
_LEN = struct.Struct(">I")


class FeedError(ValueError):
    """A malformed or oversized frame or feed message."""


# --- frames -----------------------------------------------------------------------------------


def encode_frame(message: Mapping[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FeedError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


class MessageDecoder:
    """Feed bytes in, get whole JSON messages out; a frame over the limit is an error at its
    header, before any of its body is buffered."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > self.max_frame:
                raise FeedError(f"frame of {size} bytes exceeds the {self.max_frame}-byte limit")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            try:
                msg = json.loads(body)
            except ValueError as e:
                raise FeedError(f"frame is not JSON: {e}") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise FeedError("frame is not an object with a 'type'")
            out.append(msg)
        return out


# --- exported state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportedService:
    name: str
    namespace: str
    ports: Mapping[str, int]
    healthy: int
    total: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "ports": dict(self.ports),
            "healthy": self.healthy,
            "total": self.total,
        }


@dataclass
class FeedState:
    """What one side exports: its services, its gateways and locality, the policies it knows."""

    cluster: str
    locality: dict[str, str] = field(default_factory=dict)
    gateways: list[str] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)


class ExportFeed:
    """The publisher's versioned state with a bounded change log of keys."""

    def __init__(self, cluster: str, locality: Mapping[str, str], gateways: list[str]) -> None:
        self.epoch = secrets.token_hex(8)
        self.version = 0
        self.state = FeedState(cluster, dict(locality), list(gateways))
        self._log: OrderedDict[str, int] = OrderedDict()  # key -> version of its last change
        self._oldest = 0  # versions <= this may have been forgotten
        self._changed = asyncio.Event()

    def _touch(self, key: str) -> None:
        self.version += 1
        self._log.pop(key, None)
        self._log[key] = self.version
        while len(self._log) > CHANGELOG:
            _, v = self._log.popitem(last=False)
            self._oldest = v
        self._changed.set()
        self._changed = asyncio.Event()

    def set_services(self, services: Mapping[str, ExportedService]) -> None:
        current = self.state.services
        for key in [k for k in current if k not in services]:
            del current[key]
            self._touch(f"svc:{key}")
        for key, svc in services.items():
            value = svc.to_json()
            if current.get(key) != value:
                current[key] = value
                self._touch(f"svc:{key}")

    def update_services(self, changed: Mapping[str, ExportedService | None]) -> None:
        """Apply only these (None: no longer exported); the rest stays as it is."""
        current = self.state.services
        for key, svc in changed.items():
            if svc is None:
                if current.pop(key, None) is not None:
                    self._touch(f"svc:{key}")
                continue
            value = svc.to_json()
            if current.get(key) != value:
                current[key] = value
                self._touch(f"svc:{key}")

    def set_policy(self, key: str, policy: dict[str, Any]) -> None:
        if self.state.policies.get(key) != policy:
            self.state.policies[key] = policy
            self._touch(f"policy:{key}")

    def set_meta(self, locality: Mapping[str, str], gateways: list[str]) -> None:
        if dict(locality) != self.state.locality or list(gateways) != self.state.gateways:
            self.state.locality, self.state.gateways = dict(locality), list(gateways)
            self._touch("meta")

    def snapshot(self) -> dict[str, Any]:
        s = self.state
        return {
            "type": "snapshot",
            "epoch": self.epoch,
            "version": self.version,
            "cluster": s.cluster,
            "locality": s.locality,
            "gateways": s.gateways,
            "services": s.services,
            "policies": list(s.policies.values()),
        }

    def since(self, epoch: str | None, version: int) -> dict[str, Any]:
        """What a subscriber at (epoch, version) needs: a delta if we can, else a snapshot."""
        if epoch != self.epoch or version < self._oldest or version > self.version:
            return self.snapshot()
        services: dict[str, Any] = {}
        policies = []
        meta = False
        for key, v in reversed(self._log.items()):
            if v <= version:
                break
            kind, _, name = key.partition(":")
            if kind == "svc":
                services[name] = self.state.services.get(name)
            elif kind == "policy":
                policies.append(self.state.policies[name])
            else:
                meta = True
        out: dict[str, Any] = {
            "type": "delta",
            "epoch": self.epoch,
            "version": self.version,
            "services": services,
            "policies": policies,
        }
        if meta:
            out.update(locality=self.state.locality, gateways=self.state.gateways)
        return out

    async def wait(self, version: int, timeout: float) -> None:
        if self.version > version:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass


# --- the subscriber's copy ----------------------------------------------------------------------


def _service(name: str, raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise FeedError(f"services.{name}: expected an object")
    ports = raw.get("ports")
    healthy, total = raw.get("healthy"), raw.get("total")
    if (
        not isinstance(ports, dict)
        or not all(
            isinstance(k, str) and isinstance(v, int) and 0 < v < 65536 for k, v in ports.items()
        )
        or not isinstance(healthy, int)
        or not isinstance(total, int)
        or not 0 <= healthy <= total
    ):
        raise FeedError(f"services.{name}: malformed (ports, healthy, total)")
    return {
        "name": raw.get("name"),
        "namespace": raw.get("namespace"),
        "ports": ports,
        "healthy": healthy,
        "total": total,
    }


def apply_message(state: FeedState | None, msg: Mapping[str, Any]) -> FeedState:
    """The subscriber's state after a snapshot or delta; raises FeedError, leaving `state`
    untouched, when the message is malformed."""
    kind = msg.get("type")
    services_raw = msg.get("services")
    if not isinstance(services_raw, dict):
        raise FeedError("'services' must be an object")
    if kind == "snapshot":
        cluster = msg.get("cluster")
        if not isinstance(cluster, str):
            raise FeedError("snapshot without a cluster")
        new = FeedState(cluster)
    elif kind == "delta":
        if state is None:
            raise FeedError("delta before any snapshot")
        new = FeedState(
            state.cluster, dict(state.locality), list(state.gateways), dict(state.services), {}
        )
    else:
        raise FeedError(f"unexpected message type {kind!r}")
    if "locality" in msg:
        loc = msg["locality"]
        if not isinstance(loc, dict) or not all(isinstance(v, str) for v in loc.values()):
            raise FeedError("'locality' must map to strings")
        new.locality = {k: v for k, v in loc.items() if k in ("region", "zone")}
    if "gateways" in msg:
        gws = msg["gateways"]
        if not isinstance(gws, list) or not all(isinstance(g, str) and ":" in g for g in gws):
            raise FeedError("'gateways' must be a list of HOST:PORT")
        new.gateways = list(gws)
    for name, raw in services_raw.items():
        if raw is None:
            new.services.pop(name, None)
        else:
            new.services[name] = _service(name, raw)
    if len(new.services) > MAX_SERVICES:
        raise FeedError(f"more than {MAX_SERVICES} exported services")
    policies = msg.get("policies", [])
    if not isinstance(policies, list):
        raise FeedError("'policies' must be a list")
    for p in policies:
        if not isinstance(p, dict):
            raise FeedError("a policy must be an object")
        new.policies[f"{p.get('service')}.{p.get('namespace')}"] = p
    return new
