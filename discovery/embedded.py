"""The embedded catalog: SQLite (WAL) under `data_dir`, reads served from memory.

Writes go through one writer thread that commits them in groups: concurrent registrations
share one transaction and one fsync, and each caller is answered only after its commit, so
a crash (even SIGKILL) never loses an acknowledged write.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discovery.catalog import (
    Catalog,
    ChangeListener,
    IPAddress,
    MemoryView,
    ServiceSummary,
    owner_conflict,
)
from discovery.errors import NotFound, StoreError, VipExhausted
from discovery.model import Check, CheckKind, Health, Locality, Workload, WorkloadState
from discovery.names import ServiceKey

log = logging.getLogger(__name__)

DB_NAME = "catalog.db"
BATCH_MAX = 1024

# Schema migrations, applied in order; PRAGMA user_version counts how many ran.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE workloads (
            id TEXT PRIMARY KEY,
            body TEXT NOT NULL,
            health TEXT NOT NULL,
            output TEXT NOT NULL DEFAULT '',
            mod_index INTEGER NOT NULL)""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta VALUES ('index', '0')",
    ),
    ("CREATE TABLE vips (key TEXT PRIMARY KEY, address TEXT NOT NULL UNIQUE)",),
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found."""
    (found,) = conn.execute("PRAGMA user_version").fetchone()
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"catalog schema version {found} is newer than this isthmus supports "
            f"({SCHEMA_VERSION}); upgrade isthmus or restore a backup"
        )
    for version in range(found, SCHEMA_VERSION):
        with conn:
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {version + 1}")
    return int(found)


# --- records -------------------------------------------------------------------------------


def workload_record(w: Workload) -> str:
    body: dict[str, Any] = {
        "service": w.service.name,
        "namespace": w.service.namespace,
        "address": w.address,
        "ports": dict(w.ports),
        "cluster": w.cluster,
        "weight": w.weight,
        "source": w.source,
    }
    if w.labels:
        body["labels"] = dict(w.labels)
    if w.locality.region or w.locality.zone:
        body["locality"] = [w.locality.region, w.locality.zone]
    if w.check is not None:
        c = w.check
        body["check"] = [
            c.kind.value, c.target, c.interval, c.timeout, c.ttl,
            c.success_threshold, c.failure_threshold, c.deregister_after,
        ]
    return json.dumps(body, separators=(",", ":"))


class _Interner:
    """Shares equal small values between workloads: 100,000 workloads, a handful of localities."""

    def __init__(self) -> None:
        self._values: dict[object, object] = {}

    def __call__(self, value: Any) -> Any:
        return self._values.setdefault(value, value)


def parse_record(wid: str, text: str, intern: Callable[[Any], Any]) -> Workload:
    b = json.loads(text)
    check = None
    if "check" in b:
        k, target, interval, timeout, ttl, st, ft, dereg = b["check"]
        check = intern(Check(CheckKind(k), target, interval, timeout, ttl, st, ft, dereg))
    region, zone = b.get("locality", ("", ""))
    return Workload(
        id=wid,
        service=intern(ServiceKey(sys.intern(b["service"]), sys.intern(b["namespace"]))),
        address=b["address"],
        ports={sys.intern(k): v for k, v in b["ports"].items()},
        cluster=sys.intern(b["cluster"]),
        labels=b.get("labels", {}),
        locality=intern(Locality(region, zone)),
        weight=b["weight"],
        check=check,
        source=sys.intern(b["source"]),
    )


# --- writer thread -------------------------------------------------------------------------


@dataclass(slots=True)
class _Op:
    kind: str  # put | delete | health | vip
    key: str
    payload: Any
    future: asyncio.Future[Any]
    index: int = 0
    applied: bool = False
    owners: Collection[str] | None = None  # put/delete: only over a row with one of these sources
    refused: Exception | None = None  # the owner check failed inside the transaction


class EmbeddedCatalog(Catalog):
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        cluster: str,
        vip_cidr: str = "127.240.0.0/16",
        synchronous: str = "full",
    ) -> None:
        self.cluster = cluster
        self.path = Path(data_dir) / DB_NAME
        self.network = ipaddress.ip_network(vip_cidr)
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        self._synchronous = synchronous
        self._view = MemoryView()
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._used_vips: set[IPAddress] = set()
        self._vip_pending: dict[str, asyncio.Future[IPAddress]] = {}
        self._closed = False
        self.schema_version_found = 0

    # lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[tuple[list[WorkloadState], int, dict[str, IPAddress]]] = (
            self._loop.create_future()
        )
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"catalog-writer-{self.cluster}", daemon=True
        )
        self._thread.start()
        states, index, vips = await ready
        self._view.load(states, index)
        self._view.vips.update(vips)
        self._used_vips.update(vips.values())
        log.info(
            "catalog opened",
            extra={"path": str(self.path), "workloads": len(states), "index": index,
                   "schema_version": SCHEMA_VERSION},
        )

    async def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        log.info("catalog closed", extra={"path": str(self.path), "index": self._view.index})

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _run(self, ready: asyncio.Future[Any]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
            self.schema_version_found = migrate(conn)
            os.chmod(self.path, 0o600)
            intern = _Interner()
            states = [
                WorkloadState(parse_record(wid, body, intern), Health(health), output)
                for wid, body, health, output in conn.execute(
                    "SELECT id, body, health, output FROM workloads"
                )
            ]
            (index,) = conn.execute("SELECT value FROM meta WHERE key='index'").fetchone()
            vips = {k: ipaddress.ip_address(a) for k, a in conn.execute("SELECT * FROM vips")}
        except (sqlite3.Error, ValueError, KeyError, TypeError) as e:
            err = StoreError(f"cannot open catalog {self.path}: {e}")
            self._loop.call_soon_threadsafe(_settle, ready, None, err)
            return
        except StoreError as e:
            self._loop.call_soon_threadsafe(_settle, ready, None, e)
            return
        self._loop.call_soon_threadsafe(_settle, ready, (states, int(index), vips), None)
        next_index = int(index)
        try:
            while True:
                op = self._queue.get()
                if op is None:
                    break
                batch = [op]
                stop = False
                while len(batch) < BATCH_MAX:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                next_index = self._commit(conn, batch, next_index)
                if stop:
                    break
        finally:
            # Anything still queued after close gets an error rather than hanging forever.
            while True:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is not None:
                    self._loop.call_soon_threadsafe(
                        _settle, op.future, None, StoreError("catalog is closed")
                    )
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Op], next_index: int) -> int:
        start = next_index
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if op.kind == "vip":
                    conn.execute("INSERT INTO vips VALUES (?, ?)", (op.key, str(op.payload)))
                    continue
                next_index += 1
                op.index = next_index
                if op.owners is not None:
                    # in this transaction: sees every commit and the batch's earlier writes
                    op.refused = _owner_refusal(conn, op.key, op.owners)
                if op.refused is not None:
                    op.applied = False
                elif op.kind == "put":
                    st: WorkloadState = op.payload
                    conn.execute(
                        "INSERT OR REPLACE INTO workloads VALUES (?, ?, ?, ?, ?)",
                        (op.key, workload_record(st.workload), st.health.value, st.output,
                         next_index),
                    )
                    op.applied = True
                elif op.kind == "delete":
                    cur = conn.execute("DELETE FROM workloads WHERE id=?", (op.key,))
                    op.applied = cur.rowcount > 0
                else:  # health
                    st = op.payload
                    cur = conn.execute(
                        "UPDATE workloads SET health=?, output=?, mod_index=? WHERE id=?",
                        (st.health.value, st.output, next_index, op.key),
                    )
                    op.applied = cur.rowcount > 0
                if not op.applied:
                    next_index -= 1
                    op.index = 0
            conn.execute("UPDATE meta SET value=? WHERE key='index'", (str(next_index),))
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("catalog write failed", extra={"error": str(e), "ops": len(batch)})
            err = StoreError(f"catalog write failed: {e}")
            for op in batch:
                self._loop.call_soon_threadsafe(_settle, op.future, None, err)  # type: ignore[union-attr]
            return start
        self._loop.call_soon_threadsafe(self._apply, batch)  # type: ignore[union-attr]
        return next_index

    def _apply(self, batch: list[_Op]) -> None:
        """On the loop, in commit order: make the batch visible, then answer its callers."""
        for op in batch:
            if op.kind == "vip":
                _settle(op.future, op.payload, None)
                continue
            if op.applied:
                state = None if op.kind == "delete" else op.payload
                self._view.apply(op.index, op.key, state)
            _settle(op.future, op.applied, op.refused)

    def _submit(
        self, kind: str, key: str, payload: Any, owners: Collection[str] | None = None
    ) -> asyncio.Future[Any]:
        if self._closed or self._loop is None:
            raise StoreError("catalog is closed")
        fut = self._loop.create_future()
        self._queue.put(_Op(kind, key, payload, fut, owners=owners))
        return fut

    # writes --------------------------------------------------------------------------------
    async def put(
        self, workload: Workload, *, owners: Collection[str] | None = None
    ) -> WorkloadState:
        old = self._view.by_id.get(workload.id)
        if old is not None and old.workload.check == workload.check:
            state = WorkloadState(workload, old.health, old.output)
        else:
            state = WorkloadState(
                workload, Health.PASSING if workload.check is None else Health.UNKNOWN
            )
        vip = self._vip_future(str(workload.service))
        put = self._submit("put", workload.id, state, None if owners is None else frozenset(owners))
        await asyncio.gather(vip, put)  # a refused put raises Conflict; both are retrieved
        return state

    async def delete(self, workload_id: str, *, owners: Collection[str] | None = None) -> None:
        self._view.get(workload_id)
        owned = None if owners is None else frozenset(owners)
        if not await self._submit("delete", workload_id, None, owned):
            raise NotFound(f"workload {workload_id!r} is not registered")

    async def set_health(self, workload_id: str, health: Health, output: str = "") -> None:
        old = self._view.by_id.get(workload_id)
        if old is None or (old.health is health and old.output == output):
            return
        await self._submit("health", workload_id, WorkloadState(old.workload, health, output))

    async def vip(self, key: str) -> IPAddress:
        return await self._vip_future(key)

    def _vip_future(self, key: str) -> asyncio.Future[IPAddress]:
        assert self._loop is not None
        known = self._view.vips.get(key)
        if known is not None:
            fut = self._loop.create_future()
            fut.set_result(known)
            return fut
        pending = self._vip_pending.get(key)
        if pending is not None:
            return pending
        address = self._allocate(key)
        self._used_vips.add(address)
        fut = self._submit("vip", key, address)
        self._vip_pending[key] = fut

        def done(f: asyncio.Future[IPAddress]) -> None:
            self._vip_pending.pop(key, None)
            if f.cancelled() or f.exception() is not None:
                self._used_vips.discard(address)
            else:
                self._view.vips[key] = address

        fut.add_done_callback(done)
        return fut

    def _allocate(self, key: str) -> IPAddress:
        """Hash the key into the range, probe for a free address: the same service tends to get
        the same VIP in every cluster that uses the same range."""
        net = self.network
        skip_edges = net.version == 4 and net.prefixlen < 31
        first = 1 if skip_edges else 0
        size = net.num_addresses - (2 if skip_edges else 0)
        if size <= len(self._used_vips):
            raise VipExhausted(f"VIP range {net} is exhausted ({len(self._used_vips)} in use)")
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        base = int(net.network_address) + first
        for i in range(size):
            addr = ipaddress.ip_address(base + (h + i) % size)
            if addr not in self._used_vips:
                return addr
        raise VipExhausted(f"VIP range {net} is exhausted")

    # reads ---------------------------------------------------------------------------------
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


def _owner_refusal(
    conn: sqlite3.Connection, workload_id: str, owners: Collection[str]
) -> Exception | None:
    """Conflict if the stored row for `workload_id` has a source outside `owners`."""
    row = conn.execute("SELECT body FROM workloads WHERE id=?", (workload_id,)).fetchone()
    if row is None:
        return None
    try:
        source = json.loads(row[0])["source"]
    except (ValueError, KeyError, TypeError):
        source = "an unreadable record"  # never overwritten by a conditional write
    return None if source in owners else owner_conflict(workload_id, str(source))


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
