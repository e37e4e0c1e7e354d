"""The operators' API on a VM agent: its health, its status and its own workloads.

An agent holds no catalog; what it can tell is its control channel, whether the control node
took its workloads and how their checks go there, and the routing table it was sent. Same
listener (`api.listen`), tokens and error shape as a control node's API.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from federation.agentlink import AgentLink
from federation.routing import RoutingTable, TableHolder
from isthmus import __version__
from isthmus.api import MAX_BODY, TOKENS, boundary, json_response
from isthmus.auth import TokenRegistry


@dataclass
class AgentContext:
    cluster: str
    node: str
    trust_domain: str
    identity: str
    link: AgentLink
    holder: TableHolder
    tokens: TokenRegistry
    started: float


AGENT: web.AppKey[AgentContext] = web.AppKey("isthmus_agent", AgentContext)


def table_services(table: RoutingTable) -> list[dict[str, Any]]:
    """Services as the routing table has them, healthy/total per cluster."""
    out = []
    for key, route in sorted(table.services.items(), key=lambda kv: (kv[0].namespace, kv[0].name)):
        out.append(
            {
                "name": key.name,
                "namespace": key.namespace,
                "vip": str(route.vip),
                "ports": dict(route.ports),
                "clusters": {
                    d.cluster: {"healthy": d.healthy, "total": d.total} for d in route.destinations
                },
            }
        )
    return out


def workloads_json(ctx: AgentContext) -> list[dict[str, Any]]:
    out = []
    for w in ctx.link.workloads:
        body = w.to_body()
        body.update(id=w.id, cluster=ctx.cluster)
        body.update(ctx.link.registrations[w.id].to_json())
        out.append(body)
    return out


async def health(request: web.Request) -> web.Response:
    problems = request.app[AGENT].link.problems()
    if problems:
        return json_response({"status": "degraded", "problems": problems}, 503)
    return json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    ctx = request.app[AGENT]
    link = ctx.link
    table = ctx.holder.current
    return json_response(
        {
            "cluster": ctx.cluster,
            "node": ctx.node,
            "trust_domain": ctx.trust_domain,
            "roles": ["agent"],
            "version": __version__,
            "uptime_seconds": round(time.time() - ctx.started, 3),
            "identity": ctx.identity,
            "agent": {
                "control": link.control_addr,
                "state": "connected" if link.connected else "disconnected",
                "since": link.since,
                "error": link.last_error or None,
                "problems": link.problems(),
            },
            "services": table_services(table),
            "routing_table_version": table.version,
        }
    )


async def list_workloads(request: web.Request) -> web.Response:
    return json_response(workloads_json(request.app[AGENT]))


def make_agent_app(ctx: AgentContext, max_body: int = 1024 * 1024) -> web.Application:
    app = web.Application(middlewares=[boundary], client_max_size=max_body)
    app[AGENT] = ctx
    app[TOKENS] = ctx.tokens
    app[MAX_BODY] = max_body
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/workloads", list_workloads)
    return app
