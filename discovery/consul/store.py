"""Consul as the catalog: reads through blocking queries, writes through the local agent.

Reading. One blocking query on `/v1/catalog/services` says which services exist; each service
then has its own blocking query on `/v1/health/service/:service`, which Consul answers only
when that service's instances or checks change: a change re-reads that one service, never the
whole catalog. The queries follow Consul's rules for blocking queries (`watch.BlockingQuery`)
and share `max_connections` (a blocking query holds a connection for up to `wait`). Entries are
mapped to workloads (`mapping`) and kept in a `MemoryView`, which serves every read.

Writing. A registration goes to the local agent (`/v1/agent/service/register`), with its check
translated: Consul's agent runs it and its anti-entropy keeps the catalog in step. Who owns an
id is recorded in Consul's KV with check-and-set, so the "only the owner may change it" rule
holds across appliances. A write is shown at once, and until the catalog shows it too (each
write carries a fresh `isthmus-rev` meta value to recognise its echo), for at most
PENDING_TIMEOUT.

VIPs live in Consul's KV, allocated with check-and-set on both the key and the address, so every
appliance replica of the cluster, before and after a restart, agrees on them.

Degraded mode. When Consul does not answer, or answers 5xx, the view keeps the last-known
catalog, marked stale (`report()`), and nothing is removed; a liveness probe notices a hung
Consul; every failed query retries with a jittered back-off and all of them are re-issued as soon
as Consul answers again. The state is logged once per change. The last-known catalog is also
kept in `data_dir` (`snapshot`), for a start while Consul is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from consul.callback import CB

from discovery.catalog import (
    Catalog,
    ChangeListener,
    IPAddress,
    MemoryView,
    ServiceSummary,
    owner_conflict,
)
from discovery.consul import snapshot
from discovery.consul.client import (
    ConsulOptions,
    ConsulUnavailable,
    call,
    index_of,
    make_client,
)
from discovery.consul.mapping import (
    Instance,
    Unmappable,
    check_id,
    map_entry,
    registration,
)
from discovery.consul.watch import BlockingQuery, Connectivity, State, Transition, effective_wait
from discovery.errors import Conflict, InvalidInput, StoreError, VipExhausted
from discovery.limits import Admission, WriteLimits
from discovery.model import CheckKind, Health, Workload, WorkloadState
from discovery.model import format_duration as fmt
from discovery.names import ServiceKey

log = logging.getLogger(__name__)

# A write of ours that Consul's catalog does not show yet is shown for this long.
PENDING_TIMEOUT = 30.0
# An owner record without its service is only taken over after this long (it may be a write
# whose registration another appliance has not finished yet).
ORPHAN_GRACE = 60.0
SNAPSHOT_EVERY = 5.0
CAS_ATTEMPTS = 8
# Connections kept for everything but the per-service watches: the services watch, the liveness
# probe and writes.
RESERVED_CONNECTIONS = 8
MAX_SKIPPED_REPORTED = 20
# Liveness probes failed in a row that make an outage: afterwards every query is re-issued.
OUTAGE_PROBES = 2


@dataclass(slots=True)
class _Pending:
    state: WorkloadState | None  # None: a deregistration
    rev: str
    consul_name: str
    deadline: float


class ConsulCatalog(Catalog):
    runs_checks = True

    def __init__(
        self,
        options: ConsulOptions,
        *,
        data_dir: str | os.PathLike[str] | None,
        vip_cidr: str = "127.240.0.0/16",
        limits: WriteLimits | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self.cluster = options.rules.cluster
        self.network = ipaddress.ip_network(vip_cidr)
        self.limits = limits or WriteLimits()
        self.admission: Admission | None = None
        self.node: str | None = None  # the local Consul agent's node
        self.agent_datacenter: str | None = None
        self._rng = rng or random.Random()
        self._view = MemoryView()
        self._conn = Connectivity(since=time.time())
        self._client: Any = None
        self._instances: dict[str, Instance] = {}  # as last read from Consul
        self._owner: dict[str, str] = {}  # workload id -> the Consul service it is in
        self._members: dict[str, set[str]] = {}  # Consul service -> workload ids
        self._queries: dict[str, BlockingQuery] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._services_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._refreshes: set[asyncio.Task[None]] = set()
        self._unread: set[str] = set()
        self._services_read = False
        self._pending: dict[str, _Pending] = {}
        self._skipped: dict[tuple[str, str], str] = {}
        self._held: dict[str, str] = {}
        self._used_vips: set[IPAddress] = set()
        self._vip_pending: dict[str, asyncio.Future[IPAddress]] = {}
        self._watch_slots = max(1, options.max_connections - RESERVED_CONNECTIONS)
        self._slots = asyncio.Semaphore(self._watch_slots)
        self._queued = False
        self._write_slots = asyncio.Semaphore(RESERVED_CONNECTIONS - 2)
        self._ready = asyncio.Event()
        self._fatal: StoreError | None = None
        self._snapshot_path = Path(data_dir) / snapshot.FILE_NAME if data_dir else None
        self._dirty = False
        self._saved_at = 0.0
        self._from_snapshot: float | None = None
        self._closed = False

    # lifecycle ---------------------------------------------------------------------------------
    async def open(self) -> None:
        """Start reading; return once the catalog is read in full, or at the first failure (then
        serving the last-known catalog from `data_dir`), or after `startup_timeout`."""
        self._client = make_client(self.options)
        self._services_task = asyncio.create_task(self._watch_services(), name="consul-services")
        self._tasks.append(asyncio.create_task(self._liveness(), name="consul-liveness"))
        try:
            async with asyncio.timeout(self.options.startup_timeout):
                await self._ready.wait()
        except TimeoutError:
            log.warning("consul catalog not read in full at start-up: serving it as it comes",
                        extra={"address": self.options.address, "services": len(self._watches),
                               "unread": len(self._unread)})
        if self._fatal is not None:
            await self.close()
            raise self._fatal
        if self._conn.state is not State.CONNECTED and not self._instances:
            self._load_snapshot()
        log.info("catalog opened", extra={
            "backend": "consul", "address": self.options.address, "node": self.node,
            "datacenter": self.agent_datacenter, "workloads": len(self._view.by_id),
            "state": self._conn.state.value})

    def set_token(self, token: str | None) -> bool:
        """A rotated ACL token (SIGHUP): every request sent from now on carries it; a blocking
        query already waiting keeps the old one until it returns (at most `wait`), and one
        refused then is retried with the new token. Whether the token changed."""
        if token == self.options.token:
            return False
        self.options = replace(self.options, token=token)
        if self._client is not None:
            self._client.token = token
        log.info("consul token replaced", extra={"address": self.options.address})
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [*self._tasks, *self._watches.values(), *self._refreshes]
        if self._services_task is not None:
            tasks.append(self._services_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._dirty and self._conn.synced_once:
            await self._save_snapshot()
        if self._client is not None:
            await self._client.close()
        log.info("catalog closed", extra={"backend": "consul", "index": self._view.index})

    def _load_snapshot(self) -> None:
        if self._snapshot_path is None:
            return
        snap = snapshot.load(self._snapshot_path)
        if snap is None:
            return
        for inst in snap.instances:
            self._take(inst.consul_name, inst)
        for key, vip in snap.vips.items():
            self._view.vips.setdefault(key, vip)
            self._used_vips.add(vip)
        self._from_snapshot = snap.saved
        log.warning("consul unreachable at start-up: serving the catalog saved before", extra={
            "path": str(self._snapshot_path), "saved": snap.saved,
            "workloads": len(snap.instances), "reason": self._conn.reason()})

    async def _save_snapshot(self) -> None:
        if self._snapshot_path is None:
            return
        self._dirty = False
        self._saved_at = time.monotonic()
        instances, vips = list(self._instances.values()), dict(self._view.vips)
        try:
            await asyncio.to_thread(snapshot.save, self._snapshot_path, instances, vips)
        except OSError as e:
            log.error("cannot save the consul catalog snapshot",
                      extra={"path": str(self._snapshot_path), "error": str(e)})

    # requests ----------------------------------------------------------------------------------
    async def _request(self, endpoint: str, request: Any, timeout: float | None = None) -> Any:
        return await call(endpoint, request, timeout or self.options.request_timeout)

    async def _write(self, endpoint: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """`fn(*args, **kw)` (a py-consul call) once a write connection is free."""
        if self._client is None or self._closed:
            raise StoreError("catalog is closed")
        async with self._write_slots:
            return await self._request(endpoint, fn(*args, **kw))

    def _spread(self, wait: float) -> float:
        """A wait shortened by up to 1/16 at random: queries started together (at start-up,
        after an outage) drift apart instead of all returning at once, every `wait`."""
        return round(wait * self._rng.uniform(15 / 16, 1.0), 3)

    def _blocking_timeout(self, wait: float) -> float:
        return wait + wait / 16 + self.options.request_timeout  # Consul adds up to wait/16

    async def _pace(self, q: BlockingQuery) -> None:
        delay = q.delay(asyncio.get_running_loop().time())
        if delay > 0:
            await asyncio.sleep(delay)

    # connectivity -------------------------------------------------------------------------------
    def _ok(self, what: str) -> None:
        self._log_transition(self._conn.ok(what, time.time()))

    def _failed(self, what: str, error: Exception) -> None:
        if not what.startswith("service "):
            self._ready.set()  # start-up does not wait for an unreachable Consul
        self._log_transition(self._conn.failed(what, str(error), time.time()))

    def _log_transition(self, t: Transition | None) -> None:
        if t is None:
            return
        extra = {"address": self.options.address, "workloads": len(self._view.by_id)}
        if t.new is State.DEGRADED:
            log.warning("consul unreachable: serving the last-known catalog, marked stale",
                        extra={**extra, "reason": t.reason})
        elif t.old is State.DEGRADED:
            log.info("consul answers again: catalog fresh", extra=extra)
        else:
            log.info("consul catalog read", extra={**extra, "services": len(self._watches),
                                                   "node": self.node})

    def _maybe_synced(self) -> None:
        if self._services_read and not self._unread:
            self._log_transition(self._conn.synced(time.time()))
            self._ready.set()

    @property
    def stale(self) -> bool:
        return self._conn.stale

    def report(self) -> dict[str, object]:
        c = self._conn
        skipped = [{"service": s, "instance": i, "reason": r}
                   for (s, i), r in sorted(self._skipped.items())]
        return {
            "stale": c.stale,
            "consul": {
                "address": self.options.address,
                "datacenter": self.agent_datacenter or self.options.datacenter,
                "node": self.node,
                "state": c.state.value,
                "since": c.since,
                "last_contact": c.last_contact,
                "reason": c.reason() or None,
                "services_watched": len(self._watches),
                "watch_connections": self._watch_slots,  # fewer than services: they take turns
                "pending_writes": len(self._pending),
                "from_snapshot": self._from_snapshot,
                "skipped": skipped[:MAX_SKIPPED_REPORTED],
                "skipped_count": len(skipped),
            },
        }

    # the services watch --------------------------------------------------------------------------
    async def _bootstrap(self) -> None:
        # Not `client.agent.self()`: py-consul 1.8 sends no token with it, and agent/self needs
        # agent:read under a default-deny ACL policy.
        me = await self._request("agent/self", self._client.http.get(
            CB.json(), "/v1/agent/self", headers=self._client.prepare_headers()))
        config = me.get("Config") if isinstance(me, dict) else None
        node = config.get("NodeName") if isinstance(config, dict) else None
        if not isinstance(node, str) or not node:
            raise ConsulUnavailable("agent/self: no Config.NodeName in the answer")
        dc = config.get("Datacenter") if isinstance(config, dict) else None
        want = self.options.datacenter
        if want and isinstance(dc, str) and dc != want:
            self._fatal = StoreError(
                f"discovery.consul.datacenter is {want!r} but the local Consul agent "
                f"({self.options.address}) is in {dc!r}: workloads registered through it would "
                "land in another datacenter than the one read"
            )
            raise self._fatal
        await self._load_vips()
        self.node, self.agent_datacenter = node, dc if isinstance(dc, str) else None

    async def _watch_services(self) -> None:
        o = self.options
        q = BlockingQuery(o.wait, o.query_min_interval, retry_max=o.retry_max)
        retrying = False  # a retry is paced by its back-off, not by the rate limit
        while True:
            if not retrying:
                await self._pace(q)
            retrying = True
            try:
                if self.node is None:
                    await self._bootstrap()
                index, wait = q.params()
                wait = self._spread(wait)
                if "services" in self._conn.failing:
                    index = 0  # after a failure, a plain read: its answer proves recovery
                raw, services = await self._request(
                    "catalog/services",
                    self._client.catalog.services(index=index or None, wait=fmt(wait)),
                    self._blocking_timeout(wait) if index else None,
                )
                found = index_of(raw)
            except StoreError as e:
                if self._fatal is not None:
                    self._ready.set()
                    return
                self._failed("services", e)
                await asyncio.sleep(q.failed(self._rng))
                continue
            except Exception as e:  # a bug must not end the watch: retried like a failure
                log.exception("consul services watch failed", extra={"error": repr(e)})
                self._failed("services", ConsulUnavailable(f"catalog/services: {e!r}"))
                await asyncio.sleep(q.failed(self._rng))
                continue
            retrying = False
            q.answered(found)
            self._apply_services(services if isinstance(services, dict) else {})

    def _apply_services(self, services: dict[str, Any]) -> None:
        ignored = self.options.ignore_services
        names = {n for n in services if isinstance(n, str) and n not in ignored}
        if not names and self._instances:
            # Never drop every endpoint on one answer: an ACL token that lost service:read, or a
            # restored empty snapshot, looks exactly like this.
            self._failed("services", ConsulUnavailable(
                "Consul lists no services at all; keeping the last-known catalog (a token "
                "without service:read sees an empty catalog; restart the appliance to accept "
                "an empty one)"))
            return
        self._ok("services")
        for name in sorted(names - self._watches.keys()):
            self._queries.setdefault(name, self._new_query())
            if name not in self._members:
                self._unread.add(name)
            self._watches[name] = asyncio.create_task(self._watch_service(name),
                                                      name=f"consul-service-{name}")
        for name in sorted(self._watches.keys() - names):
            self._watches.pop(name).cancel()
            self._queries.pop(name, None)
            self._unread.discard(name)
            self._ok(f"service {name}")
            self._drop_service(name)
        self._services_read = True
        self._warn_queued()
        self._maybe_synced()

    def _warn_queued(self) -> None:
        """Say once (and again only after it was fixed) that watches take turns."""
        queued = len(self._watches) > self._watch_slots
        if queued and not self._queued:
            log.warning(
                "more Consul services than connections: their blocking queries take turns, "
                "and a change may take up to discovery.consul.wait to be seen",
                extra={"services": len(self._watches), "connections": self._watch_slots,
                       "hint": "raise discovery.consul.max_connections and the agent's "
                               "limits.http_max_conns_per_client (docs/consul.md)"})
        self._queued = queued

    def _new_query(self) -> BlockingQuery:
        o = self.options
        return BlockingQuery(o.wait, o.query_min_interval, retry_max=o.retry_max)

    # one service's watch -------------------------------------------------------------------------
    async def _watch_service(self, name: str) -> None:
        q = self._queries[name]
        slots = self._watch_slots
        retrying = False  # a retry is paced by its back-off, not by the rate limit
        while True:
            if not retrying:
                await self._pace(q)
            failure: StoreError | None = None
            async with self._slots:
                index, wait = q.params()
                wait = self._spread(effective_wait(wait, slots, len(self._watches)))
                if f"service {name}" in self._conn.failing:
                    index = 0  # after a failure, a plain read: its answer proves recovery
                try:
                    raw, entries = await self._request(
                        "health/service", self._health_service(name, index, wait),
                        self._blocking_timeout(wait) if index else None,
                    )
                    found = index_of(raw)
                except StoreError as e:
                    failure = e
                except Exception as e:  # a bug must not end the watch: retried like a failure
                    log.exception("consul service watch failed",
                                  extra={"service": name, "error": repr(e)})
                    failure = ConsulUnavailable(f"health/service/{name}: {e!r}")
            retrying = failure is not None
            if failure is not None:
                self._failed(f"service {name}", failure)
                await asyncio.sleep(q.failed(self._rng))
                continue
            self._ok(f"service {name}")
            q.answered(found)
            self._apply_service(name, entries if isinstance(entries, list) else [])
            if name in self._unread:
                self._unread.discard(name)
                self._maybe_synced()

    def _health_service(self, name: str, index: int, wait: float) -> Any:
        """`GET /v1/health/service/:name` through py-consul's HTTP client and JSON callback.
        Not `client.health.service`: in py-consul 1.8 it takes no consistency mode, and
        `stale_reads` must reach this endpoint too."""
        o = self.options
        params: list[tuple[str, Any]] = []
        if index:
            params += [("index", index), ("wait", fmt(wait))]
        if o.datacenter:
            params.append(("dc", o.datacenter))
        if o.stale_reads:
            params.append(("stale", "1"))
        return self._client.http.get(CB.json(index=True), f"/v1/health/service/{name}",
                                     params=params, headers=self._client.prepare_headers())

    def _apply_service(self, name: str, entries: list[Any]) -> None:
        seen: dict[str, Instance] = {}
        for entry in entries:
            try:
                inst = map_entry(entry, self.options.rules)
            except Unmappable as e:
                self._skip(name, entry, str(e))
                continue
            other = seen.get(inst.id)
            if other is not None:
                log.warning("two consul instances map to one workload id; keeping one",
                            extra={"workload": inst.id, "nodes": [other.node, inst.node]})
                if other.node == self.node:
                    continue
            seen[inst.id] = inst
        self._forget_skips(name, entries)
        now = time.monotonic()
        kept = set()
        for wid in sorted(self._members.get(name, set()) - seen.keys()):
            if self._owner.get(wid) != name:
                continue
            p = self._pending.get(wid)
            if p is not None and p.state is not None and now < p.deadline:
                kept.add(wid)  # our registration, not in the catalog yet
                continue
            self._pending.pop(wid, None)
            self._remove(wid)
        for wid, inst in seen.items():
            p = self._pending.get(wid)
            if p is not None and now < p.deadline and (p.state is None or inst.rev != p.rev):
                kept.add(wid)  # our deregistration, or an older version of our write
                continue
            self._pending.pop(wid, None)
            self._take(name, inst)
        self._members[name] = set(seen) | kept

    def _take(self, name: str, inst: Instance) -> None:
        wid = inst.id
        previous = self._owner.get(wid)
        if previous is not None and previous != name:
            self._members.get(previous, set()).discard(wid)
        self._owner[wid] = name
        self._members.setdefault(name, set()).add(wid)
        self._instances[wid] = inst
        if self._view.by_id.get(wid) != inst.state:
            self._apply(wid, inst.state)

    def _remove(self, wid: str) -> None:
        name = self._owner.pop(wid, None)
        if name is not None:
            self._members.get(name, set()).discard(wid)
        self._instances.pop(wid, None)
        self._held.pop(wid, None)
        if wid in self._view.by_id:
            self._apply(wid, None)

    def _drop_service(self, name: str) -> None:
        now = time.monotonic()
        kept = set()
        for wid in sorted(self._members.pop(name, set())):
            if self._owner.get(wid) != name:
                continue
            p = self._pending.get(wid)
            if p is not None and p.state is not None and now < p.deadline:
                kept.add(wid)  # our registration, not in the catalog yet
                continue
            self._pending.pop(wid, None)
            self._remove(wid)
        if kept:
            self._members[name] = kept

    def _apply(self, wid: str, state: WorkloadState | None) -> None:
        self._view.apply(self._view.index + 1, wid, state)
        self._dirty = True

    def _skip(self, name: str, entry: Any, reason: str) -> None:
        sid = _service_id(entry)
        if self._skipped.get((name, sid)) != reason:
            log.warning("consul service instance skipped",
                        extra={"service": name, "instance": sid, "reason": reason})
        self._skipped[(name, sid)] = reason

    def _forget_skips(self, name: str, entries: list[Any]) -> None:
        present = {_service_id(e) for e in entries}
        for key in [k for k in self._skipped if k[0] == name and k[1] not in present]:
            del self._skipped[key]

    # liveness, recovery, housekeeping ------------------------------------------------------------
    async def _liveness(self) -> None:
        """A non-blocking request every `liveness_interval`: blocking queries alone cannot tell a
        hung Consul from a quiet one. When Consul answers again, every query is re-issued."""
        missed = 0  # liveness probes failed in a row
        while True:
            await asyncio.sleep(self.options.liveness_interval)
            try:
                leader = await self._request("status/leader", self._client.status.leader())
                if not leader:
                    raise ConsulUnavailable("status/leader: the Consul cluster has no leader")
            except StoreError as e:
                missed += 1
                self._failed("liveness", e)
            else:
                self._ok("liveness")
                # After an outage every query is re-issued (one held by a hung Consul may never
                # return); after one slow probe, only the failed ones (no storm of re-reads).
                if self._conn.failing or missed:
                    self._resync(everything=missed >= OUTAGE_PROBES)
                missed = 0
            self._expire_pending()
            if (self._dirty and self._conn.state is State.CONNECTED
                    and time.monotonic() - self._saved_at >= SNAPSHOT_EVERY):
                await self._save_snapshot()

    def _resync(self, everything: bool) -> None:
        """Re-issue failed queries now rather than after their back-off; after an outage, all of
        them (a query held by a hung Consul may never return)."""
        failing = self._conn.failing
        if self._services_task is not None and (everything or "services" in failing):
            self._services_task.cancel()
            self._services_task = asyncio.create_task(self._watch_services(),
                                                      name="consul-services")
        for name, task in list(self._watches.items()):
            if everything or f"service {name}" in failing:
                task.cancel()
                self._watches[name] = asyncio.create_task(self._watch_service(name),
                                                          name=f"consul-service-{name}")

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for wid, p in list(self._pending.items()):
            if now < p.deadline:
                continue
            del self._pending[wid]
            log.warning("consul has not shown a write of ours in time; following Consul",
                        extra={"workload": wid, "service": p.consul_name,
                               "write": "deregister" if p.state is None else "register"})
            if self._conn.state is State.CONNECTED:
                task = asyncio.create_task(self._refresh(p.consul_name))
                self._refreshes.add(task)
                task.add_done_callback(self._refreshes.discard)

    async def _refresh(self, name: str) -> None:
        with contextlib.suppress(StoreError):
            _, entries = await self._request("health/service", self._health_service(name, 0, 0))
            self._apply_service(name, entries if isinstance(entries, list) else [])

    # writes --------------------------------------------------------------------------------------
    def _writable(self, wid: str) -> None:
        if self.node is None:
            raise ConsulUnavailable(
                f"Consul ({self.options.address}) has not answered yet: "
                f"{self._conn.reason() or 'no contact'}")
        inst = self._instances.get(wid)
        if inst is None:
            return
        if not inst.registered:
            raise Conflict(f"workload {wid!r} is a Consul service registered outside Isthmus "
                           f"(node {inst.node}); change it in Consul")
        if inst.node != self.node:
            raise Conflict(f"workload {wid!r} is registered through the Consul agent of node "
                           f"{inst.node}; change it through the appliance that uses that agent")

    async def put(
        self, workload: Workload, *, owners: Collection[str] | None = None
    ) -> WorkloadState:
        self.limits.check(workload)
        wid = workload.id
        old = self._view.by_id.get(wid)
        release = self.admission(workload, None if old is None else old.workload) \
            if self.admission is not None else _nothing
        try:
            self._writable(wid)
            await self._vip_future(str(workload.service))
            created = await self._claim(workload, owners)
            rev = secrets.token_hex(6)
            reg = registration(workload, self.options.rules, rev)
            try:
                await self._write("agent/service/register", self._client.agent.service.register,
                                  **reg)
            except StoreError:
                if created is not None:
                    await self._unclaim(wid, created)
                raise
            if old is not None and old.workload.check == workload.check:
                state = WorkloadState(workload, old.health, old.output)
            else:
                state = WorkloadState(
                    workload, Health.PASSING if workload.check is None else Health.UNKNOWN)
            self._pending[wid] = _Pending(state, rev, workload.service.name,
                                          time.monotonic() + PENDING_TIMEOUT)
            previous = self._owner.get(wid)
            if previous is not None and previous != workload.service.name:
                self._members.get(previous, set()).discard(wid)
            self._owner[wid] = workload.service.name
            self._members.setdefault(workload.service.name, set()).add(wid)
            self._apply(wid, state)
            return state
        finally:
            release()

    def _owner_key(self, wid: str) -> str:
        return f"{self.options.prefix()}/owners/{wid}"

    async def _claim(self, workload: Workload, owners: Collection[str] | None) -> int | None:
        """Record `workload.source` as the id's owner, with check-and-set: of two writers racing,
        one wins and the other re-reads and is refused. Returns the new record's index when there
        was none before (to undo it should the registration fail)."""
        wid, key = workload.id, self._owner_key(workload.id)
        for _ in range(CAS_ATTEMPTS):
            _, entry = await self._write("kv", self._client.kv.get, key)
            stored = _owner_record(entry)
            inst = self._instances.get(wid)
            source = stored.get("source") if stored else (
                inst.state.workload.source if inst is not None else None)
            if stored and inst is None and self._orphan(stored):
                source = None  # its service is gone (reaped by Consul, say): free to take
            elif stored and stored.get("node") != self.node and inst is None:
                raise Conflict(f"workload {wid!r} is being registered through the Consul agent "
                               f"of node {stored.get('node')}")
            if owners is not None and source is not None and source not in owners:
                raise owner_conflict(wid, str(source))
            body = json.dumps({"source": workload.source, "node": self.node, "at": time.time()})
            cas = entry["ModifyIndex"] if entry else 0
            if await self._write("kv", self._client.kv.put, key, body, cas=cas):
                if entry:
                    return None
                _, mine = await self._write("kv", self._client.kv.get, key)
                return mine["ModifyIndex"] if mine else None
        raise Conflict(f"workload {wid!r} is being written concurrently; try again")

    @staticmethod
    def _orphan(stored: dict[str, Any]) -> bool:
        at = stored.get("at")
        return not isinstance(at, int | float) or time.time() - at > ORPHAN_GRACE

    async def _unclaim(self, wid: str, index: int) -> None:
        key = self._owner_key(wid)
        with contextlib.suppress(StoreError):
            await self._write("kv", self._client.kv.delete, key, cas=index)

    async def delete(self, workload_id: str, *, owners: Collection[str] | None = None) -> None:
        st = self._view.get(workload_id)
        wid = workload_id
        self._writable(wid)
        key = self._owner_key(wid)
        _, entry = await self._write("kv", self._client.kv.get, key)
        stored = _owner_record(entry)
        source = stored.get("source") if stored else st.workload.source
        if owners is not None and source not in owners:
            raise owner_conflict(wid, str(source))
        if entry is not None and not await self._write(
            "kv", self._client.kv.delete, key, cas=entry["ModifyIndex"]
        ):
            raise Conflict(f"workload {wid!r} was changed while being deregistered; try again")
        await self._write("agent/service/deregister", self._client.agent.service.deregister,
                          wid)
        name = self._owner.get(wid, st.workload.service.name)
        self._pending[wid] = _Pending(None, "", name, time.monotonic() + PENDING_TIMEOUT)
        self._remove(wid)
        self._members.setdefault(name, set()).add(wid)  # until the catalog stops showing it
        self._owner[wid] = name

    async def set_health(self, workload_id: str, health: Health, output: str = "") -> None:
        """Consul's checks decide health. What Isthmus itself holds critical (a VM agent whose
        channel is down) becomes the service's maintenance mode on the local agent, with the
        reason; releasing it ends maintenance. Ignored for workloads not registered here."""
        inst = self._instances.get(workload_id)
        pending = self._pending.get(workload_id)
        ours = (pending is not None and pending.state is not None) or (
            inst is not None and inst.registered and inst.node == self.node)
        if not ours:
            return
        in_maintenance = inst is not None and inst.maintenance
        if health is Health.CRITICAL:
            reason = output or "held critical by isthmus"
            if self._held.get(workload_id) == reason and in_maintenance:
                return
            self._held[workload_id] = reason
            await self._write("agent/service/maintenance",
                              self._client.agent.service.maintenance, workload_id, True,
                              reason=reason)
        elif in_maintenance or workload_id in self._held:
            self._held.pop(workload_id, None)
            await self._write("agent/service/maintenance",
                              self._client.agent.service.maintenance, workload_id, False)

    async def heartbeat(self, workload_id: str) -> WorkloadState:
        """A TTL heartbeat, passed to the local agent's check (`/v1/agent/check/pass`)."""
        st = self._view.get(workload_id)
        check = st.workload.check
        if check is None or check.kind is not CheckKind.TTL:
            raise InvalidInput(
                f"workload {workload_id!r} has no TTL check; heartbeats apply to TTL checks only",
                field="check",
            )
        self._writable(workload_id)
        note = "TTL heartbeat received"
        await self._write("agent/check/pass", self._client.agent.check.ttl_pass,
                          check_id(workload_id), note)
        inst = self._instances.get(workload_id)
        held = inst is not None and inst.maintenance
        return WorkloadState(st.workload, Health.CRITICAL if held else Health.PASSING, note)

    # VIPs ----------------------------------------------------------------------------------------
    def _vip_key(self, key: str) -> str:
        return f"{self.options.prefix()}/vips/{key}"

    def _vip_address_key(self, address: IPAddress | str) -> str:
        return f"{self.options.prefix()}/vip-addresses/{address}"

    async def _load_vips(self) -> None:
        prefix = self._vip_key("")
        _, entries = await self._request("kv", self._client.kv.get(prefix, recurse=True))
        bad = 0
        for e in entries or []:
            try:
                address = ipaddress.ip_address((e.get("Value") or b"").decode())
            except (ValueError, UnicodeDecodeError, AttributeError):
                bad += 1
                continue
            self._view.vips[e["Key"][len(prefix):]] = address
            self._used_vips.add(address)
        if bad:
            log.error("consul KV VIP entries ignored: not IP addresses",
                      extra={"prefix": prefix, "entries": bad})
        claims_prefix = self._vip_address_key("")
        _, keys = await self._request("kv", self._client.kv.get(claims_prefix, keys=True))
        for k in keys or []:
            with contextlib.suppress(ValueError):
                self._used_vips.add(ipaddress.ip_address(str(k)[len(claims_prefix):]))

    async def vip(self, key: str) -> IPAddress:
        return await self._vip_future(key)

    def _vip_future(self, key: str) -> asyncio.Future[IPAddress]:
        known = self._view.vips.get(key)
        loop = asyncio.get_running_loop()
        if known is not None:
            fut: asyncio.Future[IPAddress] = loop.create_future()
            fut.set_result(known)
            return fut
        pending = self._vip_pending.get(key)
        if pending is not None:
            return pending
        task = asyncio.ensure_future(self._allocate(key))
        self._vip_pending[key] = task
        task.add_done_callback(lambda _: self._vip_pending.pop(key, None))
        return task

    async def _allocate(self, key: str) -> IPAddress:
        """The VIP of `key`: the one in KV, or a new one claimed with check-and-set on the
        address (no two keys share one) and then on the key (the first appliance wins)."""
        if self.node is None:
            raise ConsulUnavailable(f"Consul has not answered yet: cannot allocate a VIP for "
                                    f"{key!r} ({self._conn.reason() or 'no contact'})")
        vip_key = self._vip_key(key)
        for _ in range(64):
            _, entry = await self._write("kv", self._client.kv.get, vip_key)
            if entry is not None:
                address = ipaddress.ip_address(entry["Value"].decode())
                self._known_vip(key, address)
                return address
            address = self._candidate(key)
            claim = self._vip_address_key(address)
            if not await self._write("kv", self._client.kv.put, claim, key, cas=0):
                self._used_vips.add(address)
                _, owner = await self._write("kv", self._client.kv.get, claim)
                if owner is None or owner["Value"] != key.encode():
                    continue  # taken by another key: probe the next address
            self._used_vips.add(address)
            if await self._write("kv", self._client.kv.put, vip_key, str(address), cas=0):
                self._known_vip(key, address)
                return address
            # another appliance allocated this key first: use theirs, free our address
            _, mine = await self._write("kv", self._client.kv.get, claim)
            if mine is not None and mine["Value"] == key.encode():
                await self._write("kv", self._client.kv.delete, claim, cas=mine["ModifyIndex"])
                self._used_vips.discard(address)
        raise VipExhausted(f"no VIP for {key!r} after 64 attempts in {self.network}")

    def _known_vip(self, key: str, address: IPAddress) -> None:
        self._view.vips[key] = address
        self._used_vips.add(address)
        self._dirty = True

    def _candidate(self, key: str) -> IPAddress:
        """Hash the key into the range, probe for a free address (as the embedded store does,
        so that a service tends to get the same VIP whatever the backend)."""
        net = self.network
        skip_edges = net.version == 4 and net.prefixlen < 31
        first = 1 if skip_edges else 0
        size = net.num_addresses - (2 if skip_edges else 0)
        if size <= len(self._used_vips):
            raise VipExhausted(f"VIP range {net} is exhausted ({len(self._used_vips)} in use)")
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        base = int(net.network_address) + first
        for i in range(size):
            address = ipaddress.ip_address(base + (h + i) % size)
            if address not in self._used_vips:
                return address
        raise VipExhausted(f"VIP range {net} is exhausted")

    # reads ---------------------------------------------------------------------------------------
    @property
    def index(self) -> int:
        return self._view.index

    def get(self, workload_id: str) -> WorkloadState:
        return self._view.get(workload_id)

    def workloads(self, service: ServiceKey | None = None) -> list[WorkloadState]:
        return self._view.workloads(service)

    def services(self) -> list[ServiceSummary]:
        return self._view.services()

    def health_counts(self) -> dict[Health, int]:
        return {h: self._view.health_counts[h] for h in Health}

    def known_vip(self, key: str) -> IPAddress | None:
        return self._view.vips.get(key)

    async def wait(self, index: int, timeout: float) -> int:
        return await self._view.wait(index, timeout)

    def changes_since(self, index: int) -> set[str] | None:
        return self._view.changes_since(index)

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        return self._view.subscribe(listener)


def _nothing() -> None:
    pass


def _service_id(entry: Any) -> str:
    svc = entry.get("Service") if isinstance(entry, dict) else None
    sid = svc.get("ID") if isinstance(svc, dict) else None
    return sid if isinstance(sid, str) else "?"


def _owner_record(entry: Any) -> dict[str, Any] | None:
    if not entry:
        return None
    try:
        value = json.loads(entry.get("Value") or b"")
    except (ValueError, TypeError):
        return {"source": "an unreadable owner record"}  # never taken over by a conditional write
    return value if isinstance(value, dict) else {"source": "an unreadable owner record"}
