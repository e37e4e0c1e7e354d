"""The Consul STAND-IN: one Consul agent and its servers in one aiohttp app, on loopback.

It implements what Consul's HTTP API documentation says of the endpoints Isthmus uses, and is
driven in the tests by py-consul, the real client:

- `X-Consul-Index` on every read; blocking reads with `index` and `wait` (at most 10m, plus up
  to wait/16 of jitter); a blocking read whose index is not behind the current one waits, also
  when the client's index is *ahead* (after a restore), exactly the case Consul's docs ask
  clients to handle by resetting to 0;
- per-service indexes for `/v1/health/service/:service` (a change to one service does not
  wake the watchers of another), the services table's index for `/v1/catalog/services`;
- the local agent: service register/deregister (camel or snake case keys, checks translated to
  agent checks it runs itself: HTTP, TCP, TTL, DeregisterCriticalServiceAfter), maintenance
  mode, TTL pass/warn/fail; the catalog: register/deregister of other nodes' services;
- KV with check-and-set (`cas`) and recursive reads;
- ACL tokens (`X-Consul-Token`, `Authorization: Bearer`, `?token=`): an unknown token is
  403 "ACL not found"; a token without the right is 403 "Permission denied"; reads the caller
  may not see are filtered out, as Consul does;
- fault injection: answer every request with a 5xx, hang every request, stop and start the
  listener on the same address, restore an older snapshot (indexes go backwards).

Every request is counted per endpoint (`requests`), for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import json
import random
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

MAX_WAIT = 600.0  # Consul limits `wait` to 10 minutes
DEFAULT_WAIT = 300.0
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_META_KEY = re.compile(r"[A-Za-z0-9_-]+")


def go_duration(text: Any) -> float:
    """A Go duration string ("10s", "1m30s", "500ms") in seconds; ValueError otherwise."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"invalid duration {text!r}")
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _GO_DURATION.finditer(text):
        if m.start() != pos:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"invalid duration {text!r}")
    return total


def go_format(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = (f"{int(h)}h" if h else "") + (f"{int(m)}m" if h or m else "")
    return out + f"{s:g}s"


def _key(d: dict[str, Any], name: str) -> Any:
    """Consul decodes bodies case-insensitively and accepts snake_case: `TaggedAddresses`,
    `taggedaddresses` and `tagged_addresses` are the same key."""
    want = name.lower()
    for k, v in d.items():
        if isinstance(k, str) and k.replace("_", "").lower() == want:
            return v
    return None


class ConsulError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


# --- the state --------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    address: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    meta: dict[str, str] = field(default_factory=dict)
    tagged: dict[str, str] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0


@dataclass
class Service:
    node: str
    id: str
    name: str
    tags: list[str] = field(default_factory=list)
    address: str = ""
    port: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    tagged: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    create_index: int = 0
    modify_index: int = 0

    def same(self, o: Service) -> bool:
        keys = ("name", "tags", "address", "port", "meta", "tagged", "weights")
        return all(getattr(self, k) == getattr(o, k) for k in keys)


@dataclass
class Check:
    node: str
    check_id: str
    name: str
    status: str = "critical"
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    type: str = ""
    definition: dict[str, Any] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0
    # run by the agent (only for checks registered through it)
    interval: float = 0.0
    timeout: float = 10.0
    ttl: float = 0.0
    deregister_after: float | None = None
    success_before: int = 0
    failures_before: int = 0


@dataclass
class KVEntry:
    key: str
    value: bytes
    flags: int = 0
    create_index: int = 0
    modify_index: int = 0
    lock_index: int = 0


@dataclass
class State:
    index: int = 1
    nodes: dict[str, Node] = field(default_factory=dict)
    services: dict[tuple[str, str], Service] = field(default_factory=dict)
    checks: dict[tuple[str, str], Check] = field(default_factory=dict)
    kv: dict[str, KVEntry] = field(default_factory=dict)
    services_index: int = 1
    checks_index: int = 1
    nodes_index: int = 1
    kv_index: int = 1
    service_index: dict[str, int] = field(default_factory=dict)
    extinction_index: int = 0
    # lookups, kept in step with the tables above
    by_name: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    by_node: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    node_checks: dict[str, set[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """What a token may do: `read` everything, `write` everything (stand-in granularity)."""

    read: bool = True
    write: bool = False


@dataclass
class Logged:
    method: str
    endpoint: str
    status: int
    token: bool
    query: dict[str, str] = field(default_factory=dict)


# --- the server -------------------------------------------------------------------------------


class ConsulStandIn:
    """A Consul agent (node `node_name`) and its catalog, on `host:port` (0: a free port, kept
    across stop/start)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        datacenter: str = "dc1",
        node_name: str = "standin-agent",
        node_meta: dict[str, str] | None = None,
        acl_tokens: dict[str, Policy] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        reap_floor: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.datacenter = datacenter
        self.node_name = node_name
        self.acl_tokens = acl_tokens  # None: ACLs disabled
        self.ssl_context = ssl_context
        # Consul reaps critical services no sooner than a minute; tests may lower it.
        self.reap_floor = reap_floor
        self.rng = rng or random.Random()
        # how long an agent registration takes to reach the catalog (Consul: anti-entropy,
        # usually milliseconds); 0: at once
        self.sync_delay = 0.0
        self.state = State()
        self.requests: collections.Counter[str] = collections.Counter()
        self.log: collections.deque[Logged] = collections.deque(maxlen=10_000)
        self.failure: tuple[int, str] | None = None
        self._fail_next: dict[str, tuple[int, int]] = {}
        self._released = asyncio.Event()  # clear: requests are held
        self._released.set()
        # blocked reads wait on a topic ("services", "service:<name>", "kv", "any"): a write
        # wakes only the reads it can concern, as Consul's watch sets do
        self._topics: dict[str, asyncio.Event] = {}
        self._touched: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._critical_since: dict[tuple[str, str], float] = {}
        self._counters: dict[tuple[str, str], list[int]] = {}
        self._ttl_deadline: dict[tuple[str, str], float] = {}
        self._write(lambda i: self._ensure_node(
            Node(node_name, host, meta=dict(node_meta or {}), tagged={"lan": host}), i))
        self._ensure_check(Check(node_name, "serfHealth", "Serf Health Status", "passing",
                                 output="Agent alive and reachable"))

    # lifecycle --------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/v1/{path:.*}", self._dispatch)
        # not Consul: the stand-in's own request counts, for benchmarks in another process
        app.router.add_get("/standin/requests", self._requests)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context,
                           reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        self._http = aiohttp.ClientSession()
        for key, chk in self.state.checks.items():
            if chk.interval or chk.ttl:
                self._run_check(key)
        self._reaper = asyncio.create_task(self._reap())

    async def stop(self) -> None:
        """Consul goes away: the listener closes, held requests are cut, checks stop."""
        for t in [*self._tasks.values(), *([self._reaper] if self._reaper else [])]:
            t.cancel()
        await asyncio.gather(*self._tasks.values(), *([self._reaper] if self._reaper else []),
                             return_exceptions=True)
        self._tasks.clear()
        self._reaper = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    # fault injection ----------------------------------------------------------------------------
    def fail_with(self, status: int | None, text: str = "rpc error making call: No cluster leader"
                  ) -> None:
        """Answer every request with `status` (None: answer normally again)."""
        self.failure = None if status is None else (status, text)

    def fail_next(self, endpoint: str, times: int, status: int = 500) -> None:
        """Answer the next `times` requests to `endpoint` ("GET status/leader") with `status`."""
        self._fail_next[endpoint] = (times, status)

    def hang(self, on: bool = True) -> None:
        """Hold every request (new and already blocking) until `hang(False)`."""
        if on:
            self._released.clear()
        else:
            self._released.set()

    def snapshot(self) -> State:
        return copy.deepcopy(self.state)

    def restore(self, snap: State) -> None:
        """A restored Raft snapshot: the data and every index go back to `snap`."""
        self.state = copy.deepcopy(snap)
        self._notify()

    # the data -----------------------------------------------------------------------------------
    def _write(self, apply: Callable[[int], Any]) -> Any:
        self.state.index += 1
        before = (self.state.services_index, self.state.kv_index, self.state.extinction_index)
        try:
            return apply(self.state.index)
        finally:
            after = (self.state.services_index, self.state.kv_index, self.state.extinction_index)
            for topic, b, a in zip(("services", "kv", "extinction"), before, after, strict=True):
                if a != b:
                    self._touched.add(topic)
            self._touched.add("any")
            self._notify(self._touched)
            self._touched = set()

    def _notify(self, topics: set[str] | None = None) -> None:
        """Wake the reads waiting on `topics` (None: every read)."""
        for topic in list(self._topics) if topics is None else topics:
            event = self._topics.pop(topic, None)
            if event is not None:
                event.set()

    def _topic(self, topic: str) -> asyncio.Event:
        return self._topics.setdefault(topic, asyncio.Event())

    def _touch_service(self, name: str, i: int) -> None:
        self.state.service_index[name] = i
        self._touched.add(f"service:{name}")

    def _ensure_node(self, node: Node, i: int) -> None:
        old = self.state.nodes.get(node.name)
        if old is not None and (old.address, old.meta, old.tagged) == (
                node.address, node.meta, node.tagged):
            return  # as Consul: an unchanged node is not written (no index moves)
        node.create_index = old.create_index if old else i
        node.modify_index = i
        self.state.nodes[node.name] = node
        self.state.nodes_index = i
        for key in self.state.by_node.get(node.name, ()):
            self._touch_service(self.state.services[key].name, i)

    def _ensure_service(self, svc: Service, i: int) -> bool:
        old = self.state.services.get((svc.node, svc.id))
        if old is not None and old.same(svc):
            return False
        svc.create_index = old.create_index if old else i
        svc.modify_index = i
        key = (svc.node, svc.id)
        self.state.services[key] = svc
        self.state.by_node.setdefault(svc.node, set()).add(key)
        if old is not None:
            self.state.by_name.get(old.name, set()).discard(key)
        self.state.by_name.setdefault(svc.name, set()).add(key)
        self.state.services_index = i
        if old is not None and old.name != svc.name:
            self._forget_service_name(old.name, i)
        self._touch_service(svc.name, i)
        return True

    def _forget_service_name(self, name: str, i: int) -> None:
        if not self.state.by_name.get(name):
            self.state.by_name.pop(name, None)
            self.state.service_index.pop(name, None)
            self.state.extinction_index = i
        else:
            self._touch_service(name, i)

    def _remove_service(self, node: str, sid: str, i: int) -> bool:
        svc = self.state.services.pop((node, sid), None)
        if svc is None:
            return False
        self.state.by_node.get(node, set()).discard((node, sid))
        self.state.by_name.get(svc.name, set()).discard((node, sid))
        for cid in sorted(self.state.node_checks.get(node, ())):
            if self.state.checks[(node, cid)].service_id == sid:
                self._drop_check((node, cid), i)
        self.state.services_index = i
        self._forget_service_name(svc.name, i)
        return True

    def _ensure_check(self, chk: Check, i: int | None = None) -> None:
        if i is None:
            self._write(lambda j: self._ensure_check(chk, j))
            return
        key = (chk.node, chk.check_id)
        old = self.state.checks.get(key)
        chk.create_index = old.create_index if old else i
        chk.modify_index = i
        if chk.service_id:
            svc = self.state.services.get((chk.node, chk.service_id))
            if svc is not None:
                chk.service_name, chk.service_tags = svc.name, list(svc.tags)
        self.state.checks[key] = chk
        self.state.node_checks.setdefault(chk.node, set()).add(chk.check_id)
        self.state.checks_index = i
        self._touch_for_check(chk, i)

    def _drop_check(self, key: tuple[str, str], i: int) -> None:
        chk = self.state.checks.pop(key, None)
        self.state.node_checks.get(key[0], set()).discard(key[1])
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        if chk is not None:
            self.state.checks_index = i
            self._touch_for_check(chk, i)

    def _touch_for_check(self, chk: Check, i: int) -> None:
        if chk.service_id:
            if chk.service_name:
                self._touch_service(chk.service_name, i)
        else:  # a node check: every service on the node
            for key in self.state.by_node.get(chk.node, ()):
                self._touch_service(self.state.services[key].name, i)

    def set_status(self, node: str, check_id: str, status: str, output: str = "") -> bool:
        """A check result: only a status change is written through (Consul holds output-only
        changes back for `check_update_interval`)."""
        chk = self.state.checks.get((node, check_id))
        if chk is None:
            return False
        if chk.status == status:
            chk.output = output
            return True
        updated = copy.copy(chk)
        updated.status, updated.output = status, output
        self._write(lambda i: self._ensure_check(updated, i))
        key = (node, check_id)
        if status == "critical":
            self._critical_since.setdefault(key, time.monotonic())
        else:
            self._critical_since.pop(key, None)
        return True

    # seeding from tests ---------------------------------------------------------------------------
    def register_entity(self, body: dict[str, Any]) -> None:
        """What `PUT /v1/catalog/register` does (another node's services, without an agent)."""
        self._catalog_register(body)

    def agent_services(self) -> dict[str, Service]:
        return {sid: self.state.services[(n, sid)]
                for n, sid in self.state.by_node.get(self.node_name, ())}

    def agent_checks(self) -> dict[str, Check]:
        return {cid: self.state.checks[(self.node_name, cid)]
                for cid in self.state.node_checks.get(self.node_name, ())}

    # HTTP ---------------------------------------------------------------------------------------
    async def _requests(self, request: web.Request) -> web.Response:
        return self._json(dict(self.requests))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/standin/"):
            return await handler(request)
        endpoint = _endpoint_name(request)
        self.requests[endpoint] += 1
        token = _token(request)
        status = 500
        try:
            if not self._released.is_set():
                await self._released.wait()
            if self.failure is not None:
                status, text = self.failure
                return web.Response(status=status, text=text)
            times, code = self._fail_next.get(endpoint, (0, 0))
            if times > 0:
                self._fail_next[endpoint] = (times - 1, code)
                status = code
                return web.Response(status=code, text="injected by the stand-in")
            if self.acl_tokens is not None and token is not None and token not in self.acl_tokens:
                status = 403
                return web.Response(status=403, text="ACL not found")
            response = await handler(request)
            status = response.status
            return response
        except ConsulError as e:
            status = e.status
            return web.Response(status=e.status, text=e.text)
        finally:
            self.log.append(Logged(request.method, endpoint, status, token is not None,
                                   {k: v for k, v in request.query.items() if k != "token"}))

    def _policy(self, request: web.Request) -> Policy | None:
        """None: the anonymous token of a default-deny ACL system."""
        if self.acl_tokens is None:
            return Policy(read=True, write=True)
        token = _token(request)
        return None if token is None else self.acl_tokens[token]

    def _require(self, request: web.Request, write: bool, what: str) -> None:
        p = self._policy(request)
        if p is None or not (p.write if write else p.read):
            raise ConsulError(403, f"Permission denied: token lacks permission '{what}'")

    def _may_read(self, request: web.Request) -> bool:
        p = self._policy(request)
        return p is not None and p.read

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        m = request.method
        routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", r"agent/self", self._agent_self),
            ("GET", r"status/leader", self._leader),
            ("GET", r"catalog/services", self._catalog_services),
            ("GET", r"health/service/(?P<name>[^/]+)", self._health_service),
            ("PUT", r"agent/service/register", self._agent_register),
            ("PUT", r"agent/service/deregister/(?P<sid>.+)", self._agent_deregister),
            ("PUT", r"agent/service/maintenance/(?P<sid>.+)", self._agent_maintenance),
            ("PUT", r"agent/check/(?P<verb>pass|warn|fail)/(?P<cid>.+)", self._agent_ttl),
            ("GET", r"agent/services", self._agent_services),
            ("PUT", r"catalog/register", self._catalog_register_http),
            ("PUT", r"catalog/deregister", self._catalog_deregister_http),
            ("GET", r"kv/(?P<key>.*)", self._kv_get),
            ("PUT", r"kv/(?P<key>.*)", self._kv_put),
            ("DELETE", r"kv/(?P<key>.*)", self._kv_delete),
        ]
        for method, pattern, handler in routes:
            found = re.fullmatch(pattern, path)
            if found and method == m:
                return await handler(request, **found.groupdict())
        if any(re.fullmatch(p, path) for _, p, _ in routes):
            raise ConsulError(405, f"method {m} not allowed")
        raise ConsulError(404, f"stand-in: no endpoint /v1/{path}")

    # reads ------------------------------------------------------------------------------------
    async def _block(self, request: web.Request, current: Callable[[], int],
                     topic: Callable[[], str] = lambda: "any") -> None:
        q = request.query
        if "index" not in q:
            return
        try:
            index = int(q["index"])
        except ValueError:
            raise ConsulError(400, f"Invalid index: {q['index']!r}") from None
        if index <= 0:
            return
        wait = DEFAULT_WAIT
        if "wait" in q:
            try:
                wait = min(go_duration(q["wait"]), MAX_WAIT)
            except ValueError as e:
                raise ConsulError(400, f"Invalid wait time: {e}") from None
        deadline = time.monotonic() + wait + self.rng.uniform(0, wait / 16)
        while current() <= index:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            event = self._topic(topic())
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                break
        if not self._released.is_set():  # hung while blocked: held like any other request
            await self._released.wait()

    def _json(self, data: Any, index: int | None = None, **headers: str) -> web.Response:
        h = {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0", **headers}
        if index is not None:
            h["X-Consul-Index"] = str(max(index, 1))
        return web.Response(text=json.dumps(data), content_type="application/json", headers=h)

    async def _agent_self(self, request: web.Request) -> web.Response:
        self._require(request, False, "agent:read")
        node = self.state.nodes[self.node_name]
        return self._json({
            "Config": {"Datacenter": self.datacenter, "NodeName": self.node_name,
                       "NodeID": node.id, "Server": True, "Revision": "standin",
                       "Version": "1.18.0-standin"},
            "Member": {"Name": self.node_name, "Addr": self.host, "Port": 8301,
                       "Tags": {"dc": self.datacenter, "role": "consul"}, "Status": 1},
            "Meta": dict(node.meta),
        })

    async def _leader(self, request: web.Request) -> web.Response:
        return self._json(f"{self.host}:8300")

    def _check_dc(self, request: web.Request) -> None:
        dc = request.query.get("dc")
        if dc and dc != self.datacenter:
            raise ConsulError(500, "No path to datacenter")

    async def _catalog_services(self, request: web.Request) -> web.Response:
        self._check_dc(request)
        await self._block(request, lambda: self.state.services_index, lambda: "services")
        out: dict[str, set[str]] = {}
        if self._may_read(request):
            for s in self.state.services.values():
                out.setdefault(s.name, set()).update(s.tags)
        headers = {} if self._may_read(request) else {"X-Consul-Results-Filtered-By-ACLs": "true"}
        return self._json({k: sorted(v) for k, v in sorted(out.items())},
                          self.state.services_index, **headers)

    def _service_index(self, name: str) -> int:
        st = self.state
        if name in st.service_index:
            return st.service_index[name]
        return st.extinction_index or max(st.services_index, st.checks_index, st.nodes_index)

    async def _health_service(self, request: web.Request, name: str) -> web.Response:
        self._check_dc(request)
        await self._block(request, lambda: self._service_index(name),
                          lambda: f"service:{name}" if name in self.state.service_index
                          else "any")
        passing = request.query.get("passing") not in (None, "0", "false")
        entries = []
        if self._may_read(request):
            for key in sorted(self.state.by_name.get(name, ())):
                svc = self.state.services[key]
                checks = [c for c in (self.state.checks[(svc.node, cid)]
                                      for cid in self.state.node_checks.get(svc.node, ()))
                          if c.service_id in ("", svc.id)]
                if passing and any(c.status != "passing" for c in checks):
                    continue
                entries.append({
                    "Node": _node_json(self.state.nodes[svc.node], self.datacenter),
                    "Service": _service_json(svc, self.datacenter),
                    "Checks": [_check_json(c) for c in sorted(checks, key=lambda c: c.check_id)],
                })
        return self._json(entries, self._service_index(name))

    async def _agent_services(self, request: web.Request) -> web.Response:
        self._require(request, False, "service:read")
        return self._json({sid: _service_json(s, self.datacenter)
                           for sid, s in self.agent_services().items()})

    # the agent --------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError as e:
            raise ConsulError(400, f"Request decode failed: {e}") from None
        if not isinstance(body, dict):
            raise ConsulError(400, "Request decode failed: expected a JSON object")
        return body

    async def _agent_register(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = _key(body, "Name")
        if not isinstance(name, str) or not name:
            raise ConsulError(400, "Missing service name")
        self._require(request, True, f"service:write on {name!r}")
        sid = _key(body, "ID") or name
        svc = Service(
            node=self.node_name, id=sid, name=name,
            tags=list(_key(body, "Tags") or []),
            address=_key(body, "Address") or "",
            port=int(_key(body, "Port") or 0),
            meta=_meta(_key(body, "Meta")),
            tagged=_tagged(_key(body, "TaggedAddresses")),
            weights=_weights(_key(body, "Weights")),
            enable_tag_override=bool(_key(body, "EnableTagOverride")),
        )
        raw_checks = list(_key(body, "Checks") or [])
        if _key(body, "Check"):
            raw_checks.insert(0, _key(body, "Check"))
        checks = [
            _agent_check(self.node_name, svc, c, n, len(raw_checks))
            for n, c in enumerate(raw_checks, 1)
        ]
        replace = request.query.get("replace-existing-checks") not in (None, "0", "false")
        keep = {c.check_id for c in checks}

        def apply(i: int) -> None:
            changed = self._ensure_service(svc, i)
            for key in [k for k, c in self.state.checks.items()
                        if c.node == self.node_name and c.service_id == sid
                        and c.check_id not in keep and replace
                        and not c.check_id.startswith("_service_maintenance:")]:
                self._drop_check(key, i)
            for c in checks:
                old = self.state.checks.get((self.node_name, c.check_id))
                if old is not None and old.definition == c.definition and old.type == c.type:
                    c.status, c.output = old.status, old.output  # a re-registration keeps it
                if old is None or not _same_check(old, c) or changed:
                    self._ensure_check(c, i)
        def sync() -> None:  # the agent's anti-entropy: into the catalog
            self._write(apply)
            now = time.monotonic()
            for c in checks:
                key = (self.node_name, c.check_id)
                if self.state.checks[key].status == "critical":
                    self._critical_since.setdefault(key, now)
                self._run_check(key)

        self._later(sync)
        return web.Response(status=200)

    def _later(self, sync: Callable[[], None]) -> None:
        """Apply an agent write to the catalog now, or after `sync_delay` (anti-entropy)."""
        if self.sync_delay > 0:
            asyncio.get_running_loop().call_later(self.sync_delay, sync)
        else:
            sync()

    async def _agent_deregister(self, request: web.Request, sid: str) -> web.Response:
        svc = self.state.services.get((self.node_name, sid))
        self._require(request, True, f"service:write on {svc.name if svc else sid!r}")
        if svc is not None:
            self._later(lambda: self._write(lambda i: self._remove_service(self.node_name, sid, i)))
        return web.Response(status=200)

    async def _agent_maintenance(self, request: web.Request, sid: str) -> web.Response:
        if "enable" not in request.query:
            raise ConsulError(400, "Missing value for enable")
        svc = self.state.services.get((self.node_name, sid))
        if svc is None:
            raise ConsulError(404, f'Unknown service ID "{sid}"')
        self._require(request, True, f"service:write on {svc.name!r}")
        enable = request.query["enable"].lower() == "true"
        cid = f"_service_maintenance:{sid}"
        if enable:
            reason = request.query.get("reason") or (
                "Maintenance mode is enabled for this service, but no reason was provided. "
                "This is a default message.")
            self._ensure_check(Check(self.node_name, cid, "Service Maintenance Mode", "critical",
                                     notes=reason, service_id=sid, type="maintenance"))
        elif (self.node_name, cid) in self.state.checks:
            self._write(lambda i: self._drop_check((self.node_name, cid), i))
        return web.Response(status=200)

    async def _agent_ttl(self, request: web.Request, verb: str, cid: str) -> web.Response:
        chk = self.state.checks.get((self.node_name, cid))
        if chk is None:
            raise ConsulError(404, f'Unknown check ID "{cid}"')
        svc = self.state.services.get((self.node_name, chk.service_id))
        self._require(request, True, f"service:write on {svc.name if svc else cid!r}")
        if not chk.ttl:
            raise ConsulError(500, f'CheckID "{cid}" does not have associated TTL')
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[verb]
        self._ttl_deadline[(self.node_name, cid)] = time.monotonic() + chk.ttl
        self.set_status(self.node_name, cid, status, request.query.get("note", ""))
        return web.Response(status=200)

    # the catalog (other nodes) -------------------------------------------------------------------
    async def _catalog_register_http(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._require(request, True, "node:write,service:write")
        self._catalog_register(body)
        return self._json(True)

    def _catalog_register(self, body: dict[str, Any]) -> None:
        node_name = _key(body, "Node")
        address = _key(body, "Address")
        if not node_name or not address:
            raise ConsulError(400, "Must provide node and address")
        node = Node(node_name, address, id=_key(body, "ID") or str(uuid.uuid4()),
                    meta=_meta(_key(body, "NodeMeta")),
                    tagged=dict(_key(body, "TaggedAddresses") or {}))
        raw_svc = _key(body, "Service")
        raw_checks = list(_key(body, "Checks") or [])
        if _key(body, "Check"):
            raw_checks.append(_key(body, "Check"))

        def apply(i: int) -> None:
            old = self.state.nodes.get(node_name)
            if old is None or not _key(body, "SkipNodeUpdate"):
                if old is not None:
                    node.id = old.id
                self._ensure_node(node, i)
            svc = None
            if raw_svc:
                sname = _key(raw_svc, "Service")
                svc = Service(
                    node=node_name, id=_key(raw_svc, "ID") or sname, name=sname,
                    tags=list(_key(raw_svc, "Tags") or []),
                    address=_key(raw_svc, "Address") or "",
                    port=int(_key(raw_svc, "Port") or 0),
                    meta=_meta(_key(raw_svc, "Meta")),
                    tagged=_tagged(_key(raw_svc, "TaggedAddresses")),
                    weights=_weights(_key(raw_svc, "Weights")),
                )
                self._ensure_service(svc, i)
            for rc in raw_checks:
                status = _key(rc, "Status") or "critical"
                if status not in ("passing", "warning", "critical"):
                    raise ConsulError(400, f"Invalid check status: {status!r}")
                self._ensure_check(Check(
                    node_name, _key(rc, "CheckID") or _key(rc, "Name"), _key(rc, "Name") or "",
                    status, notes=_key(rc, "Notes") or "", output=_key(rc, "Output") or "",
                    service_id=_key(rc, "ServiceID") or "",
                    definition=dict(_key(rc, "Definition") or {}),
                ), i)
        self._write(apply)

    async def _catalog_deregister_http(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._require(request, True, "node:write,service:write")
        self.deregister_entity(body)
        return self._json(True)

    def deregister_entity(self, body: dict[str, Any]) -> None:
        """What `PUT /v1/catalog/deregister` does."""
        node, sid, cid = _key(body, "Node"), _key(body, "ServiceID"), _key(body, "CheckID")

        def apply(i: int) -> None:
            if sid:
                self._remove_service(node, sid, i)
            elif cid:
                self._drop_check((node, cid), i)
            else:
                for key in sorted(self.state.by_node.get(node, ())):
                    self._remove_service(*key, i)
                for check in sorted(self.state.node_checks.get(node, ())):
                    self._drop_check((node, check), i)
                self.state.nodes.pop(node, None)
                self.state.nodes_index = i
        self._write(apply)

    # KV ---------------------------------------------------------------------------------------
    async def _kv_get(self, request: web.Request, key: str) -> web.Response:
        self._check_dc(request)
        self._require(request, False, f"key:read on {key!r}")
        keys_only = "keys" in request.query
        recurse = "recurse" in request.query or keys_only

        def current() -> int:
            if recurse:
                found = [e.modify_index for k, e in self.state.kv.items() if k.startswith(key)]
                return max(found, default=self.state.kv_index)
            e = self.state.kv.get(key)
            return e.modify_index if e else self.state.kv_index

        await self._block(request, current, lambda: "kv")
        entries = sorted((e for k, e in self.state.kv.items()
                          if (k.startswith(key) if recurse else k == key)), key=lambda e: e.key)
        if not entries:
            return web.Response(status=404, headers={"X-Consul-Index": str(current())})
        if keys_only:
            return self._json([e.key for e in entries], current())
        return self._json([_kv_json(e) for e in entries], current())

    async def _kv_put(self, request: web.Request, key: str) -> web.Response:
        self._require(request, True, f"key:write on {key!r}")
        value = await request.read()
        if len(value) > 512 * 1024:
            raise ConsulError(413, "Value exceeds 524288 byte limit")
        cas = request.query.get("cas")
        old = self.state.kv.get(key)
        if cas is not None:
            want = int(cas)
            if (want == 0 and old is not None) or (want and (old is None
                                                             or old.modify_index != want)):
                return self._json(False)
        flags = int(request.query.get("flags", "0"))

        def apply(i: int) -> None:
            self.state.kv[key] = KVEntry(key, value, flags, old.create_index if old else i, i)
            self.state.kv_index = i
        self._write(apply)
        return self._json(True)

    async def _kv_delete(self, request: web.Request, key: str) -> web.Response:
        self._require(request, True, f"key:write on {key!r}")
        cas = request.query.get("cas")
        old = self.state.kv.get(key)
        if cas is not None and (old is None or old.modify_index != int(cas)):
            return self._json(False)
        recurse = "recurse" in request.query

        def apply(i: int) -> None:
            for k in [k for k in self.state.kv if (k.startswith(key) if recurse else k == key)]:
                del self.state.kv[k]
            self.state.kv_index = i
        self._write(apply)
        return self._json(True)

    # the agent's check runner -----------------------------------------------------------------
    def _run_check(self, key: tuple[str, str]) -> None:
        chk = self.state.checks.get(key)
        if chk is None or self._runner is None or not (chk.interval or chk.ttl):
            return
        old = self._tasks.pop(key, None)
        if old is not None:
            old.cancel()
        if chk.ttl:
            self._ttl_deadline.setdefault(key, time.monotonic() + chk.ttl)
        self._counters[key] = [0, 0]
        self._tasks[key] = asyncio.create_task(self._check_loop(key))

    async def _check_loop(self, key: tuple[str, str]) -> None:
        while True:
            chk = self.state.checks.get(key)
            if chk is None:
                return
            if chk.ttl:
                left = self._ttl_deadline.get(key, 0) - time.monotonic()
                if left > 0:
                    await asyncio.sleep(min(left, 0.5))
                    continue
                self.set_status(*key, "critical", "TTL expired")
                self._ttl_deadline[key] = time.monotonic() + chk.ttl
                continue
            status, output = await self._probe(chk)
            self._record(key, chk, status, output)
            await asyncio.sleep(chk.interval)

    async def _probe(self, chk: Check) -> tuple[str, str]:
        d = chk.definition
        try:
            async with asyncio.timeout(chk.timeout):
                if d.get("HTTP"):
                    assert self._http is not None
                    async with self._http.get(d["HTTP"], allow_redirects=True) as r:
                        body = (await r.text())[:4096]
                    status = ("passing" if 200 <= r.status < 300
                              else "warning" if r.status == 429 else "critical")
                    return status, f"HTTP GET {d['HTTP']}: {r.status} {r.reason} Output: {body}"
                host, _, port = d["TCP"].rpartition(":")
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
                writer.close()
                return "passing", f"TCP connect {d['TCP']}: Success"
        except TimeoutError:
            return "critical", f"{d.get('HTTP') or d.get('TCP')}: timeout after {chk.timeout:g}s"
        except (OSError, aiohttp.ClientError) as e:
            return "critical", f"{d.get('HTTP') or d.get('TCP')}: {e}"

    def _record(self, key: tuple[str, str], chk: Check, status: str, output: str) -> None:
        ok, bad = self._counters.setdefault(key, [0, 0])
        ok, bad = (ok + 1, 0) if status == "passing" else (0, bad + 1)
        self._counters[key] = [ok, bad]
        if status == "passing" and ok < chk.success_before:
            return
        if status == "critical" and bad < chk.failures_before:
            return
        self.set_status(*key, status, output)

    async def _reap(self) -> None:
        """Deregister services whose check has been critical past DeregisterCriticalServiceAfter
        (no sooner than `reap_floor`, a minute in Consul)."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for key, since in list(self._critical_since.items()):
                chk = self.state.checks.get(key)
                if chk is None:
                    self._critical_since.pop(key, None)
                    continue
                if chk.status != "critical":
                    self._critical_since.pop(key, None)
                    continue
                after = chk.deregister_after
                if after is not None and now - since >= max(after, self.reap_floor):
                    self._critical_since.pop(key, None)
                    self._write(lambda i, c=chk: self._remove_service(c.node, c.service_id, i))


# --- JSON shapes --------------------------------------------------------------------------------


def _endpoint_name(request: web.Request) -> str:
    """`GET health/service` for `/v1/health/service/web`: requests counted per endpoint."""
    parts = request.path.split("/")[2:]
    fixed = {"agent/self": 2, "status/leader": 2, "catalog/services": 2, "catalog/register": 2,
             "catalog/deregister": 2, "agent/services": 2}
    head = "/".join(parts[:2])
    if head in fixed:
        return f"{request.method} {head}"
    if parts[:1] == ["kv"]:
        return f"{request.method} kv"
    return f"{request.method} {'/'.join(parts[:3])}" if parts[:1] == ["agent"] else \
        f"{request.method} {head}"


def _token(request: web.Request) -> str | None:
    token = request.headers.get("X-Consul-Token")
    auth = request.headers.get("Authorization", "")
    if not token and auth.lower().startswith("bearer "):
        token = auth[7:].strip()
    return token or request.query.get("token") or None


def _meta(raw: Any) -> dict[str, str]:
    meta = dict(raw or {})
    if len(meta) > 64:
        raise ConsulError(400, "Invalid Service Meta: Node metadata cannot contain more than 64 "
                               "key/value pairs")
    for k, v in meta.items():
        if not _META_KEY.fullmatch(k) or len(k) > 128:
            raise ConsulError(400, f"Invalid Service Meta: Key contains invalid characters: {k}")
        if k.startswith("consul-"):
            raise ConsulError(400, f"Invalid Service Meta: Key prefix 'consul-' is reserved: {k}")
        if not isinstance(v, str) or len(v) > 512:
            raise ConsulError(400, f"Invalid Service Meta: Value is too long (limit: 512 "
                                   f"characters): {k}")
    return meta


def _tagged(raw: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for k, v in dict(raw or {}).items():
        if isinstance(v, dict):
            out[k] = {"Address": _key(v, "Address") or "", "Port": int(_key(v, "Port") or 0)}
    return out


def _weights(raw: Any) -> dict[str, int]:
    if not raw:
        return {"Passing": 1, "Warning": 1}
    passing, warning = _key(raw, "Passing"), _key(raw, "Warning")
    if not isinstance(passing, int) or passing < 1:
        raise ConsulError(400, "Passing must be greater than 0")
    return {"Passing": passing, "Warning": warning if isinstance(warning, int) else 1}


def _agent_check(node: str, svc: Service, raw: Any, n: int, total: int) -> Check:
    if not isinstance(raw, dict):
        raise ConsulError(400, "Invalid check: expected an object")
    cid = _key(raw, "CheckID") or _key(raw, "ID") or (
        f"service:{svc.id}" if total == 1 else f"service:{svc.id}:{n}")
    name = _key(raw, "Name") or f"Service '{svc.name}' check"
    http, tcp, ttl = _key(raw, "HTTP"), _key(raw, "TCP"), _key(raw, "TTL")
    if _key(raw, "Args") or _key(raw, "ScriptArgs") or _key(raw, "GRPC"):
        raise ConsulError(400, "stand-in: only HTTP, TCP and TTL checks are supported")
    if sum(bool(x) for x in (http, tcp, ttl)) != 1:
        raise ConsulError(400, "Invalid check: one of HTTP, TCP or TTL must be set")
    try:
        interval = go_duration(_key(raw, "Interval")) if not ttl else 0.0
        timeout = go_duration(_key(raw, "Timeout")) if _key(raw, "Timeout") else 10.0
        ttl_s = go_duration(ttl) if ttl else 0.0
        dereg = _key(raw, "DeregisterCriticalServiceAfter")
        dereg_s = go_duration(dereg) if dereg else None
    except ValueError as e:
        raise ConsulError(400, f"Invalid check: {e}") from None
    if not ttl and interval <= 0:
        raise ConsulError(400, "Invalid check: Interval is required for HTTP and TCP checks")
    status = _key(raw, "Status") or "critical"
    definition = {"Interval": go_format(interval), "Timeout": go_format(timeout if not ttl else 0),
                  "DeregisterCriticalServiceAfter": go_format(dereg_s or 0),
                  "HTTP": http or "", "Header": None, "Method": "", "Body": "",
                  "TLSServerName": "", "TLSSkipVerify": False, "TCP": tcp or "",
                  "TTL": go_format(ttl_s)}
    return Check(
        node, cid, name, status, notes=_key(raw, "Notes") or "", service_id=svc.id,
        service_name=svc.name, service_tags=list(svc.tags),
        type="http" if http else "tcp" if tcp else "ttl", definition=definition,
        interval=interval, timeout=timeout, ttl=ttl_s, deregister_after=dereg_s,
        success_before=int(_key(raw, "SuccessBeforePassing") or 0),
        failures_before=int(_key(raw, "FailuresBeforeCritical") or 0),
    )


def _same_check(a: Check, b: Check) -> bool:
    keys = ("name", "status", "notes", "output", "service_id", "type", "definition")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _node_json(n: Node, dc: str) -> dict[str, Any]:
    return {"ID": n.id, "Node": n.name, "Address": n.address, "Datacenter": dc,
            "TaggedAddresses": dict(n.tagged), "Meta": dict(n.meta),
            "CreateIndex": n.create_index, "ModifyIndex": n.modify_index}


def _service_json(s: Service, dc: str) -> dict[str, Any]:
    return {"ID": s.id, "Service": s.name, "Tags": list(s.tags), "Address": s.address,
            "TaggedAddresses": copy.deepcopy(s.tagged), "Meta": dict(s.meta), "Port": s.port,
            "Weights": dict(s.weights), "EnableTagOverride": s.enable_tag_override,
            "Datacenter": dc, "CreateIndex": s.create_index, "ModifyIndex": s.modify_index}


def _check_json(c: Check) -> dict[str, Any]:
    return {"Node": c.node, "CheckID": c.check_id, "Name": c.name, "Status": c.status,
            "Notes": c.notes, "Output": c.output, "ServiceID": c.service_id,
            "ServiceName": c.service_name, "ServiceTags": list(c.service_tags), "Type": c.type,
            "Definition": dict(c.definition), "CreateIndex": c.create_index,
            "ModifyIndex": c.modify_index}


def _kv_json(e: KVEntry) -> dict[str, Any]:
    return {"CreateIndex": e.create_index, "ModifyIndex": e.modify_index,
            "LockIndex": e.lock_index, "Key": e.key, "Flags": e.flags,
            "Value": base64.b64encode(e.value).decode() if e.value else None, "Session": ""}
