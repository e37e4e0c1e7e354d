"""The operators' control API (DESIGN §7): aiohttp, JSON, bearer tokens.

Errors from every layer are translated here, at the boundary, into
`{"error": ..., "field": ...}` with the matching HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from discovery.catalog import Catalog, ServiceSummary
from discovery.durations import parse_duration
from discovery.errors import Conflict, DiscoveryError, InvalidInput, NotFound, StoreError
from discovery.health import HealthChecker
from discovery.names import LABEL_EXPECTED, ServiceKey, is_label
from discovery.schema import parse_workload
from federation.agentlink import AgentHub
from federation.policy import TrafficPolicy
from federation.routing import ServiceRoute, TableHolder
from federation.service import Federation
from federation.trust import BootstrapTokens, Kind, TrustError
from isthmus import __version__
from isthmus.auth import TokenRegistry
from isthmus.console import Console
from isthmus.events import EventLog
from isthmus.metrics import API_LATENCY, API_REQUESTS
from isthmus.traffic import TrafficHistory

log = logging.getLogger(__name__)

MAX_WAIT = 300.0
INDEX_HEADER = "X-Isthmus-Index"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.extra = extra


@dataclass
class ApiContext:
    """What the handlers need; the appliance fills it in."""

    cluster: str
    node: str
    trust_domain: str
    roles: tuple[str, ...]
    catalog: Catalog
    checker: HealthChecker | None
    tokens: TokenRegistry
    started: float
    holder: TableHolder | None = None
    federation: Federation | None = None
    bootstrap_tokens: BootstrapTokens | None = None
    agents: AgentHub | None = None
    services_cache: tuple[tuple[int, int], list[dict[str, Any]]] | None = None
    # more for GET /v1/status (limits in force, quarantined store rows), merged in by key
    reports: Callable[[], dict[str, Any]] | None = None
    services_body: tuple[list[dict[str, Any]], str] | None = None
    events: EventLog | None = None  # recent events (GET /v1/events)
    history: TrafficHistory | None = None  # the last minutes of traffic (edges, charts)
    console: Console | None = None  # the web console's files (GET /ui/)


CTX: web.AppKey[ApiContext] = web.AppKey("isthmus_ctx", ApiContext)
MAX_BODY: web.AppKey[int] = web.AppKey("isthmus_max_body", int)
# The bearer tokens the boundary checks: every app that uses `boundary` sets it.
TOKENS: web.AppKey[TokenRegistry] = web.AppKey("isthmus_tokens", TokenRegistry)


def json_response(data: Any, status: int = 200, index: int | None = None) -> web.Response:
    headers = {INDEX_HEADER: str(index)} if index is not None else None
    return web.Response(
        text=json.dumps(data, separators=(",", ":")),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(status: int, message: str, field: str | None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    body.update(extra)
    return json_response(body, status)


# --- middleware -------------------------------------------------------------------------------


# The scope a route needs, by method; GET /v1/health and the console's static files need none
# (they hold no secrets: the console asks for a token and sends it with each API call).
def required_scope(request: web.Request) -> str | None:
    path = request.path
    if path == "/v1/health":
        return None
    if (path == "/ui" or path.startswith("/ui/")) and request.method in ("GET", "HEAD"):
        return None
    if request.method in ("GET", "HEAD"):
        return "read"
    if path.startswith("/v1/workloads"):
        return "workloads"
    if path.endswith("/traffic"):
        return "traffic"
    if path.startswith("/v1/bootstrap-tokens"):
        return "tokens"
    return "admin"


@web.middleware
async def boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Auth, error translation and request metrics for every route."""
    started = time.perf_counter()
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    status = 500
    try:
        scope = required_scope(request)
        if scope is not None:
            # RFC 9110: the scheme is case-insensitive ("bearer" is as good as "Bearer")
            scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'")
            grant = request.app[TOKENS].lookup(token.strip())
            if grant is None:
                raise ApiError(401, "invalid bearer token")
            if not grant.allows(scope):
                raise ApiError(403, f"token lacks the '{scope}' scope this route needs")
        response = await handler(request)
        status = response.status
        return response
    except ApiError as e:
        status = e.status
        return error_response(e.status, str(e), e.field, **e.extra)
    except InvalidInput as e:
        status = 422
        extra = {}
        if len(e.problems) > 1:
            extra["problems"] = [{"field": f, "error": m} for f, m in e.problems]
        return error_response(422, str(e), e.field, **extra)
    except NotFound as e:
        status = 404
        return error_response(404, str(e), None)
    except Conflict as e:
        status = 409
        return error_response(409, str(e), None)
    except StoreError as e:
        status = 503
        log.error("store error", extra={"path": request.path, "error": str(e)})
        return error_response(503, str(e), None)
    except DiscoveryError as e:
        status = 400
        return error_response(400, str(e), None)
    except web.HTTPException as e:
        status = e.status
        if e.status == 413:
            msg = f"request body too large: the limit is {request.app[MAX_BODY]} bytes"
        elif e.status == 404:
            msg = f"no route {request.method} {request.path}"
        elif e.status == 405:
            msg = f"method {request.method} not allowed on {request.path}"
        else:
            msg = e.reason
        response = error_response(e.status, msg, None)
        if isinstance(e, web.HTTPMethodNotAllowed):  # RFC 9110: a 405 says what is allowed
            response.headers["Allow"] = ", ".join(sorted(e.allowed_methods))
        return response
    except Exception:
        # A bug, not the caller's fault: logged with its traceback, answered in the API's shape.
        log.exception("unexpected error", extra={"path": request.path, "method": request.method})
        return error_response(500, "internal error; the appliance's log has the details", None)
    finally:
        API_REQUESTS.labels(request.method, route, str(status)).inc()
        API_LATENCY.labels(request.method, route).observe(time.perf_counter() - started)


# --- helpers -------------------------------------------------------------------------------


MAX_JSON_DEPTH = 32  # a registration is 3 levels deep; nothing the API takes needs more


def json_depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def parse_json(raw: bytes | str) -> Any:
    """JSON from a client, at most MAX_JSON_DEPTH deep; ValueError says what is wrong."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except UnicodeDecodeError as e:
        raise ValueError(str(e)) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # raises 413 past client_max_size
    try:
        body = parse_json(raw)
    except ValueError as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"expected a JSON object body, got {type(body).__name__}")
    return body


def blocking_params(request: web.Request) -> tuple[int | None, float]:
    """Consul-style blocking query: `?index=N&wait=30s` returns once the index passes N."""
    index_s = request.query.get("index")
    if index_s is None:
        return None, 0.0
    # ASCII digits only: '²'.isdigit() is true, and int('²') raises
    if not (index_s.isascii() and index_s.isdigit()) or len(index_s) > 19:
        raise ApiError(400, f"index {index_s!r}: expected a non-negative integer", "index")
    try:
        wait = parse_duration(request.query.get("wait", "60s"))
    except ValueError as e:
        raise ApiError(400, f"wait {request.query['wait']!r}: {e}", "wait") from None
    return int(index_s), min(wait, MAX_WAIT)


async def wait_for_index(request: web.Request) -> int:
    index, wait = blocking_params(request)
    catalog = request.app[CTX].catalog
    if index is None:
        return catalog.index
    return await catalog.wait(index, wait)


def service_json(ctx: ApiContext, s: ServiceSummary) -> dict[str, Any]:
    """A service as the catalog has it, with what the routing table adds (remote clusters)."""
    out: dict[str, Any] = {
        "name": s.service.name,
        "namespace": s.service.namespace,
        "vip": str(s.vip) if s.vip else None,
        "ports": s.ports,
        "clusters": {ctx.cluster: {"healthy": s.healthy, "total": s.total}},
    }
    route = ctx.holder.current.get(s.service) if ctx.holder else None
    if route is not None:
        merge_route(out, route, ctx.cluster)
    return out


def merge_route(out: dict[str, Any], route: ServiceRoute, cluster: str) -> None:
    out["vip"] = str(route.vip)
    out["exported"] = route.exported  # whether peers may call this cluster's endpoints
    for d in route.destinations:
        if d.cluster != cluster:
            out["clusters"][d.cluster] = {"healthy": d.healthy, "total": d.total}
    for name, port in route.ports.items():
        out["ports"].setdefault(name, port)
    out["cluster_vips"] = {c: str(v) for c, v in sorted(route.cluster_vips.items())}


def all_services(ctx: ApiContext) -> list[dict[str, Any]]:
    """Local services from the catalog, plus services only peers export (from the table).

    Cached per (catalog index, table version): with 10,000 services the listing costs a pass
    over every workload, and it only changes when one of the two does."""
    key = (ctx.catalog.index, ctx.holder.current.version if ctx.holder else -1)
    if ctx.services_cache is not None and ctx.services_cache[0] == key:
        return ctx.services_cache[1]
    out = _all_services(ctx)
    ctx.services_cache = (key, out)
    return out


def _all_services(ctx: ApiContext) -> list[dict[str, Any]]:
    local = ctx.catalog.services()
    out = [service_json(ctx, s) for s in local]
    if ctx.holder is not None:
        seen = {s.service for s in local}
        for key, route in ctx.holder.current.services.items():
            if key not in seen:
                remote = {
                    "name": key.name,
                    "namespace": key.namespace,
                    "vip": None,
                    "ports": {},
                    "clusters": {},
                }
                merge_route(remote, route, ctx.cluster)
                out.append(remote)
        out.sort(key=lambda s: (s["namespace"], s["name"]))
    return out


def service_param(request: web.Request) -> ServiceKey | None:
    text = request.query.get("service")
    if text is None:
        return None
    try:
        return ServiceKey.parse(text)
    except ValueError as e:
        raise ApiError(400, str(e), "service") from None


# --- handlers --------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def put_workload(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    wid = request.match_info["id"]
    body = await read_json(request)
    workload = parse_workload(body, wid, ctx.cluster, source="api")
    existed = True
    try:
        ctx.catalog.get(wid)
    except NotFound:
        existed = False
    # Only a new id or one the API registered: an agent's or the config's is theirs to change
    # (DELETE still removes any). Checked inside the write, so a racing agent cannot slip in.
    try:
        state = await ctx.catalog.put(workload, owners=("api",))
    except Conflict as e:
        raise ApiError(
            409, f"{e}; change it there, or DELETE it first to register it through the API"
        ) from None
    log.info(
        "workload registered",
        extra={"workload": wid, "service": str(workload.service), "address": workload.address},
    )
    return json_response(state.to_json(), 200 if existed else 201, ctx.catalog.index)


async def list_workloads(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    service = service_param(request)
    index = await wait_for_index(request)
    return json_response([st.to_json() for st in ctx.catalog.workloads(service)], index=index)


async def get_workload(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    index = await wait_for_index(request)
    return json_response(ctx.catalog.get(request.match_info["id"]).to_json(), index=index)


async def delete_workload(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    wid = request.match_info["id"]
    await ctx.catalog.delete(wid)
    log.info("workload deregistered", extra={"workload": wid})
    return web.Response(status=204, headers={INDEX_HEADER: str(ctx.catalog.index)})


async def heartbeat(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if ctx.checker is None:
        raise ApiError(409, "health checking is not running on this appliance")
    state = await ctx.checker.heartbeat(request.match_info["id"])
    return json_response(state.to_json(), index=ctx.catalog.index)


async def list_services(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    index = await wait_for_index(request)
    services = all_services(ctx)
    # the encoded listing is cached with the listing itself (10,000 services: ~30 ms of JSON)
    if ctx.services_body is None or ctx.services_body[0] is not services:
        ctx.services_body = (services, json.dumps(services, separators=(",", ":")))
    return web.Response(text=ctx.services_body[1], content_type="application/json",
                        headers={INDEX_HEADER: str(index)})


async def get_service(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    key = _service_key(request)
    index = await wait_for_index(request)
    found = next(
        (s for s in all_services(ctx) if (s["name"], s["namespace"]) == (key.name, key.namespace)),
        None,
    )
    out = None if found is None else dict(found)  # the listing is cached: never mutate it
    if out is None:
        raise ApiError(404, f"service {key} is not registered here nor exported by any peer")
    out["endpoints"] = {
        ctx.cluster: [
            {
                "id": st.workload.id,
                "address": st.workload.address,
                "ports": dict(st.workload.ports),
                "health": st.health.value,
                "weight": st.workload.weight,
                "locality": st.workload.locality.to_json(),
                "labels": dict(st.workload.labels),
                "check": st.workload.check.to_json() if st.workload.check else None,
                "health_output": st.output,
            }
            for st in ctx.catalog.workloads(key)
        ]
    }
    policy = ctx.federation.policies.get(key) if ctx.federation else None
    # None: default locality routing
    out["traffic"] = policy_json(ctx.federation, policy) if policy and ctx.federation else None
    return json_response(out, index=index)


def status_index(ctx: ApiContext) -> int:
    """The index of `GET /v1/status`: it moves with the catalog, the routing table (a peer's
    exports, a policy) and the event log (peer states). Each of the three only grows, so their
    sum does, and it changes whenever one of them does."""
    table = ctx.holder.current.version if ctx.holder else 0
    events = ctx.events.index if ctx.events else 0
    return ctx.catalog.index + table + events


async def wait_for_status(ctx: ApiContext, index: int, wait: float) -> None:
    """Block until the status index passes `index` or `wait` runs out (a client with an index
    from elsewhere, or an earlier run, gets its answer at once)."""
    if wait <= 0 or status_index(ctx) != index:
        return
    table_changed = asyncio.Event()
    unsubscribe = (
        ctx.holder.subscribe(lambda _table: table_changed.set()) if ctx.holder else None
    )
    waits = [asyncio.ensure_future(ctx.catalog.wait(ctx.catalog.index, wait)),
             asyncio.ensure_future(table_changed.wait())]
    if ctx.events is not None:
        waits.append(asyncio.ensure_future(ctx.events.wait(ctx.events.index, wait)))
    try:
        await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        if unsubscribe is not None:
            unsubscribe()


async def status(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    index, wait = blocking_params(request)
    if index is not None:  # a blocking query: the console's feed
        await wait_for_status(ctx, index, wait)
    health_counts = {h.value: n for h, n in ctx.catalog.health_counts().items()}
    out: dict[str, Any] = {
        "cluster": ctx.cluster,
        "node": ctx.node,
        "trust_domain": ctx.trust_domain,
        "roles": list(ctx.roles),
        "version": __version__,
        "uptime_seconds": round(time.time() - ctx.started, 3),
        "catalog": {
            "backend": type(ctx.catalog).__name__,
            "index": ctx.catalog.index,
            "services": len(ctx.catalog.services()),
            "workloads": sum(health_counts.values()),
            "health": health_counts,
        },
        "services": all_services(ctx),
        "routing_table_version": ctx.holder.current.version if ctx.holder else None,
    }
    out["catalog"].update(ctx.catalog.report())  # `stale`, and the backend's own state
    if ctx.federation is not None:
        out["peers"] = [p.to_json() for p in ctx.federation.peers()]
        out["policies"] = [p.to_json() for p in ctx.federation.policies.all(False)]
        out["identity"] = (
            str(ctx.federation.credentials.spiffe_id) if ctx.federation.credentials else None
        )
    out["agents"] = ctx.agents.agents() if ctx.agents is not None else []
    if ctx.reports is not None:
        for key, value in ctx.reports().items():
            out[key] = {**out[key], **value} if isinstance(out.get(key), dict) else value
    return json_response(out, index=status_index(ctx))


def policy_json(fed: Federation, policy: TrafficPolicy) -> dict[str, Any]:
    """A policy with how far it has replicated: for each peer, the version its own feed
    carries back (a peer republishes a policy once stored) and whether that is this one."""
    out = policy.to_json()
    acks = fed.acknowledged.get(policy.service, {})
    out["replication"] = {
        peer: {
            "version": str(acks[peer]) if peer in acks else None,
            "acknowledged": peer in acks and acks[peer] >= policy.stamp,
        }
        for peer in sorted(fed.peer_addresses)
    }
    return out


def _federation(request: web.Request) -> Federation:
    fed = request.app[CTX].federation
    if fed is None:
        raise ApiError(409, "this appliance runs no federation (control role)")
    return fed


def _service_key(request: web.Request) -> ServiceKey:
    try:
        return ServiceKey.parse(f"{request.match_info['name']}.{request.match_info['namespace']}")
    except ValueError as e:
        raise ApiError(400, str(e)) from None


async def get_traffic(request: web.Request) -> web.Response:
    key = _service_key(request)
    fed = _federation(request)
    policy = fed.policies.get(key)
    if policy is None:
        raise ApiError(404, f"service {key} has no traffic policy (default locality routing)")
    return json_response(policy_json(fed, policy))


async def put_traffic(request: web.Request) -> web.Response:
    key = _service_key(request)
    body = await read_json(request)
    ctx = request.app[CTX]
    fed = _federation(request)
    policy = await fed.set_policy(key, body)
    out = policy_json(fed, policy)
    # The routing table holds every service of the federation, local or imported.
    if ctx.holder is not None and ctx.holder.current.get(key) is None:
        warning = (
            f"service {key} is not registered in any cluster of the federation; the policy "
            "applies once it is"
        )
        log.warning("traffic policy for an unknown service", extra={"service": str(key)})
        out["warnings"] = [warning]
    return json_response(out)


async def delete_traffic(request: web.Request) -> web.Response:
    key = _service_key(request)
    fed = _federation(request)
    if fed.policies.get(key) is None:
        raise ApiError(404, f"service {key} has no traffic policy")
    await fed.policies.reset(key)
    return web.Response(status=204)


async def list_peers(request: web.Request) -> web.Response:
    return json_response([p.to_json() for p in _federation(request).peers()])


async def create_bootstrap_token(request: web.Request) -> web.Response:
    tokens = request.app[CTX].bootstrap_tokens
    if tokens is None:
        raise ApiError(409, "this appliance issues no identities (control role)")
    body = await read_json(request) if request.can_read_body else {}
    unknown = set(body) - {"ttl", "kind", "node"}
    if unknown:
        f = sorted(unknown)[0]
        raise ApiError(422, f"{f}: unknown field", f)
    try:
        ttl = parse_duration(body.get("ttl", "1h"))
    except ValueError as e:
        raise ApiError(422, f"ttl {body.get('ttl')!r}: {e}", "ttl") from None
    kind, node = body.get("kind", "agent"), body.get("node")
    if kind not in ("agent", "gateway"):
        raise ApiError(422, f"kind {kind!r}: expected 'agent' or 'gateway'", "kind")
    if node is not None and not is_label(node):
        raise ApiError(422, f"node {node!r}: expected {LABEL_EXPECTED}", "node")
    if kind == "gateway" and node is None:
        raise ApiError(422, "node: a gateway token must name its gateway's node", "node")
    try:
        token, expires = tokens.create(ttl, kind=Kind(kind), node=node)
    except ValueError as e:  # kind and node are checked above: the ttl is out of range
        raise ApiError(422, f"ttl {body.get('ttl', '1h')!r}: {e}", "ttl") from None
    except TrustError as e:  # the token file cannot be read or written
        log.error("bootstrap token store failed", extra={"error": str(e)})
        raise ApiError(503, f"cannot create a bootstrap token: {e}") from None
    return json_response(
        {"token": token, "expires": expires.isoformat(), "kind": kind, "node": node}, 201
    )


def bearer_grant(request: web.Request) -> frozenset[str]:
    """The scopes of the caller's token (the boundary has checked that it is valid)."""
    _, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    grant = request.app[TOKENS].lookup(token.strip())
    return grant.scopes if grant is not None else frozenset()


async def get_token(request: web.Request) -> web.Response:
    """What the caller's token may do: the console hides the controls it could not use."""
    scopes = bearer_grant(request)
    admin = "admin" in scopes
    return json_response({
        "scopes": sorted(scopes),
        "can": {s: admin or s in scopes for s in ("read", "workloads", "traffic", "tokens")},
    })  # fmt: skip


def _events(request: web.Request) -> EventLog:
    events = request.app[CTX].events
    if events is None:
        raise ApiError(409, "this appliance keeps no event log (control role)")
    return events


async def list_events(request: web.Request) -> web.Response:
    """Recent events after `?index=` (blocking with `&wait=` until there is one)."""
    events = _events(request)
    events.flush()
    index, wait = blocking_params(request)
    if index is not None:
        await events.wait(index, wait)
    found, truncated = events.since(index or 0)
    body = {
        "index": events.index,
        "capacity": events.capacity,
        "truncated": truncated,
        "events": [e.to_json() for e in found],
    }
    return json_response(body, index=events.index)


def _history(request: web.Request) -> TrafficHistory:
    history = request.app[CTX].history
    if history is None:
        raise ApiError(409, "this appliance keeps no traffic history (control role)")
    return history


async def get_edges(request: web.Request) -> web.Response:
    """Request rate, error rate and p99 per edge between clusters, from this appliance's own
    counters, over `?window=` (default 60s, at most the history's span)."""
    history = _history(request)
    try:
        window = parse_duration(request.query.get("window", "60s"), history.span)
    except ValueError as e:
        raise ApiError(400, f"window {request.query['window']!r}: {e}", "window") from None
    index, wait = blocking_params(request)
    if index is not None:
        await history.wait(index, wait)
    return json_response(history.edges(window), index=history.index)


async def get_service_requests(request: web.Request) -> web.Response:
    """The service's requests per tick over the history's span, by cluster."""
    history = _history(request)
    key = _service_key(request)
    index, wait = blocking_params(request)
    if index is not None:
        await history.wait(index, wait)
    out = {"service": key.name, "namespace": key.namespace, **history.service(str(key))}
    return json_response(out, index=history.index)


def make_app(ctx: ApiContext, max_body: int = 1024 * 1024) -> web.Application:
    app = web.Application(middlewares=[boundary], client_max_size=max_body)
    app[CTX] = ctx
    app[TOKENS] = ctx.tokens
    app[MAX_BODY] = max_body
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/workloads", list_workloads)
    app.router.add_put("/v1/workloads/{id}", put_workload)
    app.router.add_get("/v1/workloads/{id}", get_workload)
    app.router.add_delete("/v1/workloads/{id}", delete_workload)
    app.router.add_put("/v1/workloads/{id}/heartbeat", heartbeat)
    app.router.add_get("/v1/services", list_services)
    app.router.add_get("/v1/services/{namespace}/{name}", get_service)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/services/{namespace}/{name}/traffic", get_traffic)
    app.router.add_put("/v1/services/{namespace}/{name}/traffic", put_traffic)
    app.router.add_delete("/v1/services/{namespace}/{name}/traffic", delete_traffic)
    app.router.add_get("/v1/peers", list_peers)
    app.router.add_post("/v1/bootstrap-tokens", create_bootstrap_token)
    app.router.add_get("/v1/token", get_token)
    app.router.add_get("/v1/events", list_events)
    app.router.add_get("/v1/edges", get_edges)
    app.router.add_get("/v1/services/{namespace}/{name}/requests", get_service_requests)
    if ctx.console is not None:
        ctx.console.mount(app)
    app.on_response_prepare.append(_nosniff)
    return app


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    # every answer says what it is; a browser must not guess another type from the bytes
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
