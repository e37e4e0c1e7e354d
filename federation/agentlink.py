"""The channel between a VM agent and its cluster's control node.

An agent holds no catalog of its own: over one WebSocket on the control listener,
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
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from discovery.backoff import Backoff
from discovery.catalog import Catalog
from discovery.errors import Conflict, DiscoveryError, NotFound
from discovery.health import HealthChecker
from discovery.model import WorkloadState
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


def owner_names(sid: SpiffeId) -> frozenset[str]:
    """The `source` values that mean "registered by `sid`": its full SPIFFE ID, and for an
    agent the `agent:<node>` older control nodes stored (never for a gateway of that name)."""
    names = {str(sid)}
    if sid.kind is Kind.AGENT:
        names.add(f"agent:{sid.node}")
    return frozenset(names)


def is_agent_source(source: str) -> bool:
    return source.startswith("agent:") or (source.startswith("spiffe://") and "/agent/" in source)


@dataclass
class AgentSession:
    """What the control node knows of one agent, connected or not."""

    spiffe_id: str
    source: str
    address: str | None
    connected: int = 0  # open channels (a reconnect may overlap the old one's close)
    since: float = field(default_factory=time.time)

    def to_json(self, catalog: Catalog, checker: HealthChecker | None) -> dict[str, Any]:
        workloads = [st for st in catalog.workloads() if st.workload.source == self.source]
        return {
            "id": self.spiffe_id,
            "node": self.spiffe_id.rsplit("/", 1)[-1],
            "address": self.address,
            "state": "connected" if self.connected else "disconnected",
            "since": self.since,
            "workloads": len(workloads),
            "registered": [
                {
                    "id": st.workload.id,
                    "service": str(st.workload.service),
                    "health": st.health.value,
                }
                for st in workloads
            ],
            "held": checker.held(self.source) if checker else None,
        }


class AgentHub:
    """The control node's side of the agent channel, mounted on the control listener.

    Agent liveness is part of its workloads' health: when an agent's channel drops without a
    goodbye, every workload it registered turns critical ("agent ... disconnected") whatever
    its probes say, and passes again when the agent is back. An agent that stops cleanly says
    `leave` first and its workloads are deregistered. After a restart of the control node,
    agents have `grace` seconds to reconnect before their workloads are held critical; workloads
    of an agent gone for `reap_after` are deregistered."""

    def __init__(
        self,
        catalog: Catalog,
        holder: TableHolder,
        credentials: TlsCredentials,
        cluster: str,
        checker: HealthChecker | None = None,
        *,
        grace: float = 30.0,
        reap_after: float | None = 72 * 3600.0,
        live: LiveIdentities | None = None,
    ) -> None:
        self.catalog = catalog
        self.holder = holder
        self.credentials = credentials
        self.cluster = cluster
        self.checker = checker
        self.grace = grace
        self.reap_after = reap_after
        # the issuer's: an identity counts as live while its channel is connected, so no
        # bootstrap token can mint it then
        self.live = live
        self.sessions: dict[str, AgentSession] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False  # channels closed by our own stop are no verdict on the agents

    def routes(self) -> list[web.RouteDef]:
        return [web.get(ROUTE, self._stream)]

    def start(self) -> None:
        """Agents registered before this start get `grace` to come back."""
        if self.checker is None:
            return
        sources = {
            st.workload.source for st in self.catalog.workloads()
            if is_agent_source(st.workload.source)
        }
        loop = asyncio.get_running_loop()
        for source in sources:
            self._timers[source] = loop.call_later(self.grace, self._gone, source, "since the "
                                                   "control node started")

    async def close(self) -> None:
        self._closing = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def agents(self) -> list[dict[str, Any]]:
        return [
            s.to_json(self.catalog, self.checker)
            for s in sorted(self.sessions.values(), key=lambda s: s.spiffe_id)
        ]

    # liveness ---------------------------------------------------------------------------------
    def _connected(self, sid: SpiffeId, source: str, address: str | None) -> AgentSession:
        session = self.sessions.get(source)
        if session is None:
            session = self.sessions[source] = AgentSession(str(sid), source, address)
        if not session.connected:
            session.since = time.time()
        session.connected += 1
        session.address = address
        timer = self._timers.pop(source, None)
        if timer is not None:
            timer.cancel()
        if self.checker is not None:
            self.checker.source_up(source)
        return session

    def _disconnected(self, session: AgentSession, left: bool) -> None:
        session.connected -= 1
        if session.connected:
            return
        session.since = time.time()
        if left:
            self.sessions.pop(session.source, None)
            return
        if not self._closing:
            self._gone(session.source, "")

    def _gone(self, source: str, when: str) -> None:
        """The agent behind `source` is not connected: hold its workloads critical."""
        self._timers.pop(source, None)
        session = self.sessions.get(source)
        if session is not None and session.connected:
            return
        who = session.spiffe_id if session else source
        reason = f"agent {who} disconnected" + (f" ({when})" if when else "")
        log.warning("agent workloads held critical", extra={"agent": who, "reason": reason})
        if self.checker is not None:
            self.checker.source_down(source, reason)
        if self.reap_after is not None:
            loop = asyncio.get_running_loop()
            self._timers[source] = loop.call_later(self.reap_after, self._reap, source)

    def _reap(self, source: str) -> None:
        self._timers.pop(source, None)
        session = self.sessions.get(source)
        if session is not None and session.connected:
            return
        self.sessions.pop(source, None)
        task = asyncio.create_task(_deregister_all(self.catalog, {source}, "reaped"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # the channel --------------------------------------------------------------------------------
    async def _stream(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        try:
            sid = _peer(
                transport.get_extra_info("ssl_object") if transport else None,
                self.credentials,
                self.cluster,
            )
        except (PeerVerificationError, AgentChannelError) as e:
            if isinstance(e, PeerVerificationError):
                record_failure(e, side="server", peer=request.remote)
            return web.json_response({"error": f"agent identity refused: {e}"}, status=403)
        if sid.kind is None:
            return web.json_response({"error": f"{sid} is not a node identity"}, status=403)
        ws = web.WebSocketResponse(heartbeat=10.0, max_msg_size=1024 * 1024)
        await ws.prepare(request)
        with self.live.connected(sid) if self.live is not None else contextlib.nullcontext():
            await self._serve(ws, sid, request.remote)
        return ws

    async def _serve(self, ws: web.WebSocketResponse, sid: SpiffeId, remote: str | None) -> None:
        source = str(sid)
        log.info("agent connected", extra={"agent": str(sid), "address": remote})
        session = self._connected(sid, source, remote)
        wake = asyncio.Event()
        states: dict[str, WorkloadState | None] = {}

        def on_change(_index: int, wid: str, state: WorkloadState | None) -> None:
            if state is None or state.workload.source == source:
                states[wid] = state
                wake.set()

        unsubscribe_table = self.holder.subscribe(lambda _t: wake.set())
        unsubscribe_catalog = self.catalog.subscribe(on_change)

        async def push() -> None:
            sent = -1
            while not ws.closed:
                wake.clear()
                table = self.holder.current
                if table.version != sent:
                    await ws.send_str(json.dumps({"type": "table", "table": table_to_json(table)}))
                    sent = table.version
                while states:
                    wid, state = states.popitem()
                    await ws.send_str(json.dumps(_state_message(wid, state)))
                if self.holder.current.version == sent and not states:
                    await wake.wait()

        pusher = asyncio.create_task(push())
        left = False
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                reply = await _handle(self.catalog, self.cluster, sid, msg.data)
                left = left or reply.get("type") == "left"
                await ws.send_str(json.dumps(reply))
        finally:
            unsubscribe_table()
            unsubscribe_catalog()
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await pusher
            self._disconnected(session, left)
            log.info("agent disconnected", extra={"agent": str(sid), "left": left})


def _state_message(wid: str, state: WorkloadState | None) -> dict[str, Any]:
    if state is None:
        return {"type": "state", "id": wid, "health": None}
    return {"type": "state", "id": wid, "health": state.health.value, "output": state.output}


async def _deregister_all(
    catalog: Catalog, owners: Collection[str], why: str, keep: Collection[str] = ()
) -> list[str]:
    """Deregister what `owners` registered, but `keep`; the owner is checked in the write."""
    removed = []
    for st in catalog.workloads():
        wid = st.workload.id
        if st.workload.source in owners and wid not in keep:
            with contextlib.suppress(NotFound, Conflict):
                await catalog.delete(wid, owners=owners)
                removed.append(wid)
    if removed:
        log.info("agent workloads deregistered", extra={"owners": sorted(owners), "why": why,
                                                        "workloads": removed})
    return removed


async def _handle(catalog: Catalog, cluster: str, sid: SpiffeId, data: str) -> dict[str, Any]:
    """One message from the agent `sid`. Ownership is decided by the catalog inside the write
    itself (`owners=`), so two agents racing for one new id cannot both win."""
    source, owners = str(sid), owner_names(sid)
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        msg = None
    if not isinstance(msg, dict):
        return {"type": "ack", "id": None, "ok": False, "error": "expected a JSON object"}
    kind, wid = msg.get("type"), msg.get("id")
    try:
        if kind in ("register", "deregister") and not isinstance(wid, str):
            raise DiscoveryError("'id' must be a string")
        if kind == "register":
            workload = parse_workload(msg.get("workload"), wid, cluster, source)
            st = await catalog.put(workload, owners=owners)
            return {"type": "ack", "id": wid, "ok": True, "health": st.health.value}
        if kind == "deregister":
            await catalog.delete(wid, owners=owners)
            return {"type": "ack", "id": wid, "ok": True}
        if kind == "prune":  # the agent's whole set: drop what it no longer has
            keep = msg.get("keep")
            if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
                raise DiscoveryError("'keep' must be a list of workload ids")
            removed = await _deregister_all(catalog, owners, "pruned", set(keep))
            return {"type": "pruned", "id": wid, "ok": True, "removed": removed}
        if kind == "leave":  # a clean stop: the agent's workloads leave with it
            removed = await _deregister_all(catalog, owners, "agent left")
            return {"type": "left", "id": wid, "ok": True, "removed": removed}
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


@dataclass
class Registration:
    """One of the agent's workloads as its control node last reported it."""

    state: str = "pending"  # pending | registered | refused
    health: str | None = None
    output: str = ""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"registration": self.state, "health": self.health or "unknown"}
        if self.output:
            out["health_output"] = self.output
        if self.error:
            out["error"] = self.error
        return out


class AgentLink:
    """The agent's side: keeps `holder` fed and `workloads` registered, reconnecting forever.

    `registrations` says, per workload, whether the control node took it and how its health
    checks go there; `problems()` is what the agent's health endpoint reports."""

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
        self.since = time.time()
        self.last_error = ""
        self.registrations = {w.id: Registration() for w in self.workloads}
        self.synced = asyncio.Event()
        self.answered = asyncio.Event()  # every workload registered or refused this session
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._left: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._version = holder.current.version

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="agent-link")

    async def leave(self, timeout: float = 3.0) -> bool:
        """A clean stop: ask the control node to deregister this agent's workloads (rather
        than hold them critical as a lost agent's). False if it could not be told."""
        ws = self._ws
        if ws is None or ws.closed or not self.connected:
            return False
        self._left = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await ws.send_str(json.dumps({"type": "leave"}))
                await self._left
        except (TimeoutError, ConnectionError, aiohttp.ClientError) as e:
            log.warning("could not leave cleanly", extra={"control": self.control_addr,
                                                          "error": str(e) or type(e).__name__})
            return False
        return True

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def set_workloads(self, workloads: Sequence[StaticWorkload]) -> None:
        """A new set of workloads (the agent's config was reloaded): over an open channel,
        register the new and changed ones and drop the ones no longer listed; otherwise the
        next session registers them all."""
        old = {w.id: w for w in self.workloads}
        self.workloads = list(workloads)
        changed = [w for w in self.workloads if old.get(w.id) != w]
        registrations = {}
        for w in self.workloads:
            keep = self.registrations.get(w.id)
            registrations[w.id] = keep if keep is not None and w not in changed \
                else Registration()
        self.registrations = registrations
        ws = self._ws
        if ws is None or ws.closed or not self.connected:
            return
        if changed:
            self.answered.clear()
        async with self._send_lock:
            for w in changed:
                await ws.send_str(json.dumps({"type": "register", "id": w.id,
                                              "workload": w.to_body()}))
            if len(old.keys() - registrations.keys()):
                await ws.send_str(json.dumps({"type": "prune",
                                              "keep": [w.id for w in self.workloads]}))
        log.info("agent workloads updated", extra={
            "registered": [w.id for w in changed],
            "removed": sorted(old.keys() - registrations.keys())})

    def problems(self) -> list[str]:
        """What keeps this agent from being healthy: the channel, refused workloads."""
        out = []
        if not self.connected:
            out.append(f"control channel to {self.control_addr} is down"
                       + (f": {self.last_error}" if self.last_error else ""))
        for wid, reg in sorted(self.registrations.items()):
            if reg.state == "refused":
                out.append(f"workload {wid} refused by the control node: {reg.error}")
        return out

    def refused(self) -> dict[str, str]:
        return {w: r.error for w, r in self.registrations.items() if r.state == "refused"}

    async def _run(self) -> None:
        backoff = Backoff(0.2, self.backoff_max)
        while True:
            try:
                await self._session()
                backoff.reset()
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
                self.last_error = str(e) or type(e).__name__
                log.warning(
                    "control channel down",
                    extra={"control": self.control_addr, "error": self.last_error},
                )
            if self.connected:
                self.since = time.time()
            self.connected = False
            self._ws = None
            await asyncio.sleep(backoff.next())

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
            self.connected, self.since, self.last_error = True, time.time(), ""
            self._ws = ws
            self.answered.clear()
            for reg in self.registrations.values():
                reg.state = "pending"
            log.info("control channel up", extra={"control": self.control_addr})
            async with self._send_lock:  # a reload may send too (set_workloads)
                for w in list(self.workloads):
                    body = w.to_body()
                    await ws.send_str(json.dumps({"type": "register", "id": w.id,
                                                  "workload": body}))
                await ws.send_str(json.dumps({"type": "prune",
                                              "keep": [w.id for w in self.workloads]}))
            if not self.workloads:
                self.answered.set()
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                self._on_message(json.loads(msg.data))
        self.last_error = "the control node closed the channel"

    def _on_message(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "table":
            self._version += 1
            table = table_from_json(data["table"], version=self._version)
            self.holder.publish(table)
            if self.on_table:
                self.on_table(table)
            self.synced.set()
        elif kind == "ack":
            reg = self.registrations.get(str(data.get("id")))
            if reg is None:
                return
            if data.get("ok"):
                reg.state, reg.error = "registered", ""
                reg.health = data.get("health") or reg.health
            else:
                reg.state, reg.error = "refused", str(data.get("error"))
                log.error(
                    "registration refused",
                    extra={"workload": data.get("id"), "error": data.get("error")},
                )
            if all(r.state != "pending" for r in self.registrations.values()):
                self.answered.set()
        elif kind == "state":
            reg = self.registrations.get(str(data.get("id")))
            if reg is not None and data.get("health") is not None:
                reg.health, reg.output = str(data["health"]), str(data.get("output") or "")
        elif kind == "left" and self._left is not None and not self._left.done():
            self._left.set_result(None)
