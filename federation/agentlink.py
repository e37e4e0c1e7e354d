"""The channel between a VM agent and its cluster's control node.

An agent holds no catalog of its own (DESIGN §2): over one WebSocket on the control listener,
authenticated by its agent identity (mTLS), it registers its workloads with the control node
and receives every routing-table snapshot for its local egress and resolver. The control node
verifies the agent is an identity of its own cluster; the agent verifies the control node is
a gateway of its cluster *before* sending anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from discovery.catalog import Catalog
from discovery.errors import Conflict, DiscoveryError
from discovery.schema import StaticWorkload, parse_workload
from federation.routing import RoutingTable, TableHolder, table_from_json, table_to_json
from federation.trust import PeerVerificationError, SpiffeId, TlsCredentials, verify_peer
from federation.trust.live import LiveIdentities
from federation.trust.observe import record_failure
from federation.trust.spiffe import Kind

log = logging.getLogger(__name__)

ROUTE = "/v1/agent/stream"
MAX_MESSAGE = 64 * 1024 * 1024  # a whole routing table


class AgentChannelError(Exception):
    pass


def _peer(ssl_object: Any, credentials: TlsCredentials, cluster: str) -> SpiffeId:
    if ssl_object is None:
        raise AgentChannelError("not a TLS connection")
    return verify_peer(
        ssl_object, credentials.bundle, credentials.trust_domain, expected_cluster=cluster
    )


def agent_routes(
    catalog: Catalog,
    holder: TableHolder,
    credentials: TlsCredentials,
    cluster: str,
    *,
    live: LiveIdentities | None = None,
) -> list[web.RouteDef]:
    """The control node's side, mounted on the control listener's app. With `live` (the
    issuer's), an identity counts as live while its channel is connected: no bootstrap token
    can mint it then."""

    async def stream(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        try:
            sid = _peer(
                transport.get_extra_info("ssl_object") if transport else None, credentials, cluster
            )
        except (PeerVerificationError, AgentChannelError) as e:
            if isinstance(e, PeerVerificationError):
                record_failure(e, side="server", peer=request.remote)
            return web.json_response({"error": f"agent identity refused: {e}"}, status=403)
        if sid.kind is None:
            return web.json_response({"error": f"{sid} is not a node identity"}, status=403)
        ws = web.WebSocketResponse(heartbeat=10.0, max_msg_size=1024 * 1024)
        await ws.prepare(request)
        with live.connected(sid) if live is not None else contextlib.nullcontext():
            await _serve(ws, sid)
        return ws

    async def _serve(ws: web.WebSocketResponse, sid: SpiffeId) -> None:
        log.info("agent connected", extra={"agent": str(sid)})
        latest: asyncio.Event = asyncio.Event()
        unsubscribe = holder.subscribe(lambda _t: latest.set())

        async def push() -> None:
            sent = -1
            while not ws.closed:
                table = holder.current
                if table.version != sent:
                    await ws.send_str(json.dumps({"type": "table", "table": table_to_json(table)}))
                    sent = table.version
                latest.clear()
                if holder.current.version == sent:
                    await latest.wait()

        pusher = asyncio.create_task(push())
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                reply = await _handle(catalog, cluster, sid, msg.data)
                await ws.send_str(json.dumps(reply))
        finally:
            unsubscribe()
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await pusher
            log.info("agent disconnected", extra={"agent": str(sid)})

    return [web.get(ROUTE, stream)]


def owner_names(sid: SpiffeId) -> frozenset[str]:
    """The `source` values that mean "registered by `sid`": its full SPIFFE ID, and for an
    agent the `agent:<node>` older control nodes stored (never for a gateway of that name)."""
    names = {str(sid)}
    if sid.kind is Kind.AGENT:
        names.add(f"agent:{sid.node}")
    return frozenset(names)


async def _handle(catalog: Catalog, cluster: str, sid: SpiffeId, data: str) -> dict[str, Any]:
    """One message from the agent `sid`. Ownership is decided by the catalog inside the write
    itself (`owners=`), so two agents racing for one new id cannot both win."""
    source, owners = str(sid), owner_names(sid)
    try:
        msg = json.loads(data)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        return {"type": "ack", "id": None, "ok": False, "error": "expected a JSON object"}
    kind, wid = msg.get("type"), msg.get("id")
    try:
        if not isinstance(wid, str):
            raise DiscoveryError("'id' must be a string")
        if kind == "register":
            workload = parse_workload(msg.get("workload"), wid, cluster, source)
            st = await catalog.put(workload, owners=owners)
            return {"type": "ack", "id": wid, "ok": True, "health": st.health.value}
        if kind == "deregister":
            await catalog.delete(wid, owners=owners)
            return {"type": "ack", "id": wid, "ok": True}
        raise DiscoveryError(f"unknown message type {kind!r}")
    except Conflict as e:
        return {"type": "ack", "id": wid, "ok": False, "error": f"{e}, not to {source}"}
    except DiscoveryError as e:
        return {
            "type": "ack",
            "id": wid if isinstance(wid, str) else None,
            "ok": False,
            "error": str(e),
        }


class AgentLink:
    """The agent's side: keeps `holder` fed and `workloads` registered, reconnecting forever."""

    def __init__(
        self,
        control_addr: str,
        credentials: TlsCredentials,
        holder: TableHolder,
        workloads: Sequence[StaticWorkload],
        *,
        backoff_max: float = 10.0,
        on_table: Callable[[RoutingTable], None] | None = None,
    ) -> None:
        self.control_addr = control_addr
        self.credentials = credentials
        self.holder = holder
        self.workloads = list(workloads)
        self.cluster = credentials.spiffe_id.cluster
        self.backoff_max = backoff_max
        self.on_table = on_table
        self.connected = False
        self.registered: dict[str, str] = {}  # id -> health, or error text
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._version = holder.current.version

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="agent-link")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                await self._session()
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except (
                aiohttp.ClientError,
                OSError,
                AgentChannelError,
                PeerVerificationError,
                ValueError,
                KeyError,
                TypeError,
            ) as e:
                log.warning(
                    "control channel down",
                    extra={"control": self.control_addr, "error": str(e) or type(e).__name__},
                )
            self.connected = False
            await asyncio.sleep(random.uniform(0.2, delay))
            delay = min(self.backoff_max, delay * 2)

    async def _session(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self.credentials.client_context())
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.ws_connect(
                f"https://{self.control_addr}{ROUTE}", max_msg_size=MAX_MESSAGE, heartbeat=10.0
            ) as ws,
        ):
            sid = _peer(ws.get_extra_info("ssl_object"), self.credentials, self.cluster)
            if sid.kind is not Kind.GATEWAY:
                raise AgentChannelError(f"control node presented {sid}, not a gateway")
            self.connected = True
            log.info("control channel up", extra={"control": self.control_addr})
            for w in self.workloads:
                body = w.model_dump(exclude={"id"}, exclude_none=True)
                await ws.send_str(json.dumps({"type": "register", "id": w.id, "workload": body}))
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if data.get("type") == "table":
                    self._version += 1
                    table = table_from_json(data["table"], version=self._version)
                    self.holder.publish(table)
                    if self.on_table:
                        self.on_table(table)
                    self.synced.set()
                elif data.get("type") == "ack":
                    wid = str(data.get("id"))
                    self.registered[wid] = (
                        data.get("health") if data.get("ok") else (f"error: {data.get('error')}")
                    )
                    if not data.get("ok"):
                        log.error(
                            "registration refused",
                            extra={"workload": wid, "error": data.get("error")},
                        )
