"""The embedded catalog: SQLite (WAL) under `data_dir`, reads served from memory.

Writes go through one writer thread that commits them in groups: concurrent registrations
share one transaction and one fsync, and each caller is answered only after its commit, so
a crash (even SIGKILL) never loses an acknowledged write.

A damaged file never hangs start-up: rows that do not validate are moved to the `quarantine`
table and reported, a write the store cannot make fails alone, and should the writer thread
itself fail, every pending and later write fails with its reason instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import math
import os
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from discovery.catalog import (
    Catalog,
    ChangeListener,
    IPAddress,
    MemoryView,
    ServiceSummary,
    owner_conflict,
)
from discovery.durations import MAX_DURATION
from discovery.errors import NotFound, StoreError, VipExhausted
from discovery.limits import Admission, WriteLimits
from discovery.model import Check, CheckKind, Health, Locality, Workload, WorkloadState
from discovery.names import ServiceKey, is_label
from discovery.statefiles import QUARANTINE_DDL, QuarantinedRow, prepare_db, quarantine, quarantined

log = logging.getLogger(__name__)

QUARANTINED = Gauge(
    "isthmus_catalog_quarantined_rows",
    "Catalog rows moved to the quarantine table because they did not validate",
    ["cluster"],
)

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
    (QUARANTINE_DDL,),
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
    # allow_nan=False: an infinity written here once made every later read of the row fail
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


class _Interner:
    """Shares equal small values between workloads: 100,000 workloads, a handful of localities."""

    def __init__(self) -> None:
        self._values: dict[object, object] = {}

    def __call__(self, value: Any) -> Any:
        return self._values.setdefault(value, value)


def parse_record(wid: str, text: str, intern: Callable[[Any], Any]) -> Workload:
    """A stored row back into a Workload; raises ValueError naming the field that is wrong.

    Checked as strictly as the row is cheap to check (100,000 rows are read at start-up): the
    types, and numbers finite and in range. Bounds a registration body must meet but an older
    release did not ask for (16 ports, the check floor) are not applied to what is stored."""
    try:
        b = json.loads(text)
    except ValueError as e:
        raise ValueError(f"body: not JSON ({e})") from None
    if not isinstance(b, dict):
        raise ValueError("body: expected an object")
    service, namespace = b.get("service"), b.get("namespace")
    if not is_label(service) or not is_label(namespace):
        raise ValueError("service/namespace: expected DNS labels")
    ports = b.get("ports")
    if not isinstance(ports, dict) or not ports or not all(
        isinstance(k, str) and _int(v, 1, 65535) for k, v in ports.items()
    ):
        raise ValueError(f"ports: expected an object of name: port 1-65535, got {ports!r:.80}")
    for key in ("address", "cluster", "source"):
        if not isinstance(b.get(key), str):
            raise ValueError(f"{key}: expected a string")
    if not _int(b.get("weight"), 0, 1_000_000):
        raise ValueError(f"weight: expected an integer 0-1000000, got {b.get('weight')!r:.40}")
    labels = b.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValueError("labels: expected an object of strings")
    locality = b.get("locality", ("", ""))
    if not isinstance(locality, list | tuple) or len(locality) != 2 or not all(
        isinstance(p, str) for p in locality
    ):
        raise ValueError("locality: expected [region, zone]")
    check = None
    if "check" in b:
        check = intern(_parse_check(b["check"]))
    region, zone = locality
    return Workload(
        id=wid,
        service=intern(ServiceKey(sys.intern(service), sys.intern(namespace))),
        address=b["address"],
        ports={sys.intern(k): v for k, v in ports.items()},
        cluster=sys.intern(b["cluster"]),
        labels=labels,
        locality=intern(Locality(region, zone)),
        weight=b["weight"],
        check=check,
        source=sys.intern(b["source"]),
    )


def _int(v: object, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _seconds(v: object, field: str, optional: bool = False) -> None:
    if optional and v is None:
        return
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float)
        or not 0 <= v <= MAX_DURATION  # before isfinite: a huge int does not fit a float
        or not math.isfinite(v)
    ):
        raise ValueError(f"check.{field}: expected a finite number of seconds, got {v!r:.40}")


def _parse_check(raw: object) -> Check:
    if not isinstance(raw, list) or len(raw) != 8:
        raise ValueError("check: expected [kind, target, interval, timeout, ttl, ...] (8 items)")
    k, target, interval, timeout, ttl, st, ft, dereg = raw
    try:
        kind = CheckKind(k)
    except ValueError:
        raise ValueError(f"check.kind: expected http, tcp or ttl, got {k!r:.40}") from None
    if not isinstance(target, str):
        raise ValueError("check.target: expected a string")
    _seconds(interval, "interval")
    _seconds(timeout, "timeout")
    _seconds(ttl, "ttl")
    _seconds(dereg, "deregister_after", optional=True)
    if not _int(st, 1, 1000) or not _int(ft, 1, 1000):
        raise ValueError("check thresholds: expected integers 1-1000")
    return Check(kind, target, interval, timeout, ttl, st, ft, dereg)


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
        limits: WriteLimits | None = None,
    ) -> None:
        self.cluster = cluster
        self.path = Path(data_dir) / DB_NAME
        self.network = ipaddress.ip_network(vip_cidr)
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        self._synchronous = synchronous
        self.limits = limits or WriteLimits()
        # A check from a higher layer on every put (the egress listener budget), set by the
        # appliance once it has what the check needs.
        self.admission: Admission | None = None
        self._view = MemoryView()
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._used_vips: set[IPAddress] = set()
        self._vip_pending: dict[str, asyncio.Future[IPAddress]] = {}
        self._closed = False
        self._failed: StoreError | None = None  # the writer thread is gone: why
        self.schema_version_found = 0
        self.quarantined: list[QuarantinedRow] = []  # every row in the quarantine table

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
        try:
            states, index, vips = await ready
        except asyncio.CancelledError:
            self._queue.put(None)  # start-up interrupted (SIGTERM): let the thread finish
            raise
        self._view.load(states, index)
        self._view.vips.update(vips)
        self._used_vips.update(vips.values())
        QUARANTINED.labels(self.cluster).set(len(self.quarantined))
        log.info(
            "catalog opened",
            extra={"path": str(self.path), "workloads": len(states), "index": index,
                   "schema_version": SCHEMA_VERSION, "quarantined": len(self.quarantined)},
        )

    async def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        log.info("catalog closed", extra={"path": str(self.path), "index": self._view.index})

    def _connect(self) -> sqlite3.Connection:
        prepare_db(self.path, "catalog")
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            # first: every later statement waits for a lock held elsewhere instead of failing
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _load(
        self, conn: sqlite3.Connection
    ) -> tuple[list[WorkloadState], int, dict[str, IPAddress]]:
        """Every row that validates; the others move to the quarantine table (one transaction),
        and a corrupt index is rebuilt from the rows' own indexes."""
        intern = _Interner()
        states: list[WorkloadState] = []
        bad: list[tuple[str, str, str, str]] = []  # table, key, body, reason
        highest = 0
        for wid, body, health, output, mod_index in conn.execute(
            "SELECT id, body, health, output, mod_index FROM workloads"
        ):
            if isinstance(mod_index, int):
                highest = max(highest, mod_index)
            try:
                if not isinstance(body, str) or not isinstance(output, str):
                    raise ValueError("body and output: expected text")
                try:
                    h = Health(health)
                except ValueError:
                    raise ValueError(f"health: expected passing, critical or unknown, got "
                                     f"{health!r:.40}") from None
                states.append(WorkloadState(parse_record(wid, body, intern), h, output))
            except Exception as e:  # whatever is wrong with a row, it is that row's problem
                row = {"body": body, "health": health, "output": output, "mod_index": mod_index}
                bad.append(("workloads", str(wid), json.dumps(row, default=str), str(e)))
        found = conn.execute("SELECT value FROM meta WHERE key='index'").fetchone()
        value = found[0] if found else None
        if isinstance(value, str) and value.isascii() and value.isdigit():
            index = int(value)
        else:
            index = highest
            bad.append(("meta", "index", json.dumps(value, default=str),
                        f"index: expected a non-negative integer, got {value!r:.40}; "
                        f"rebuilt as {highest} from the workloads' own indexes"))
        vips: dict[str, IPAddress] = {}
        for key, address in conn.execute("SELECT key, address FROM vips"):
            try:
                if not isinstance(address, str):
                    raise ValueError(f"expected an IP address, got {address!r:.40}")
                vips[str(key)] = ipaddress.ip_address(address)
            except ValueError as e:
                bad.append(("vips", str(key), json.dumps(address, default=str), f"address: {e}"))
        if bad:
            with conn:  # isolation_level=None: explicit transaction
                conn.execute("BEGIN IMMEDIATE")
                for table, key, body, reason in bad:
                    quarantine(conn, self.path, table, key, body, reason)
                    if table == "workloads":
                        conn.execute("DELETE FROM workloads WHERE id=?", (key,))
                    elif table == "vips":
                        conn.execute("DELETE FROM vips WHERE key=?", (key,))
                    else:
                        conn.execute(
                            "INSERT OR REPLACE INTO meta VALUES ('index', ?)", (str(index),)
                        )
                conn.execute("COMMIT")
        self.quarantined = quarantined(conn)
        return states, index, vips

    def _run(self, ready: asyncio.Future[Any]) -> None:
        assert self._loop is not None
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            self.schema_version_found = migrate(conn)
            states, index, vips = self._load(conn)
        except StoreError as e:
            self._loop.call_soon_threadsafe(_settle, ready, None, e)
        except Exception as e:  # whatever it is, start-up must hear of it
            err = StoreError(f"cannot open catalog {self.path}: {e}")
            self._loop.call_soon_threadsafe(_settle, ready, None, err)
        else:
            self._loop.call_soon_threadsafe(_settle, ready, (states, index, vips), None)
            self._serve_writes(conn, index)
            return
        if conn is not None:
            conn.close()

    def _serve_writes(self, conn: sqlite3.Connection, next_index: int) -> None:
        assert self._loop is not None
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
                next_index = self._commit_isolated(conn, batch, next_index)
                if stop:
                    break
        except BaseException as e:
            # Not a failed write (those fail alone): the thread itself cannot go on. Every
            # pending and later write fails with this instead of waiting for an answer.
            self._failed = StoreError(f"catalog writer failed, writes are refused: {e!r}")
            log.critical("catalog writer failed", extra={"path": str(self.path),
                                                         "error": repr(e)})
        finally:
            error = self._failed or StoreError("catalog is closed")
            # Anything still queued after close gets an error rather than hanging forever.
            while True:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is not None:
                    self._loop.call_soon_threadsafe(_settle, op.future, None, error)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("catalog checkpoint failed", extra={"error": str(e)})
            finally:
                conn.close()

    def _commit_isolated(self, conn: sqlite3.Connection, batch: list[_Op], next_index: int) -> int:
        """Commit `batch`; an op the store cannot write (an error other than SQLite's own)
        fails alone, with its key named: the batch is retried one op at a time."""
        try:
            return self._commit(conn, batch, next_index)
        except Exception as e:  # sqlite3.Error is handled inside _commit
            if not conn.in_transaction:
                raise  # after the commit (the loop is gone): not one op's fault, see _serve_writes
            conn.execute("ROLLBACK")
            if len(batch) > 1:
                for op in batch:
                    next_index = self._commit_isolated(conn, [op], next_index)
                return next_index
            op = batch[0]
            log.error("catalog write failed", extra={"op": op.kind, "key": op.key,
                                                     "error": repr(e)})
            err = StoreError(f"catalog write of {op.kind} {op.key!r} failed: {e!r}")
            self._loop.call_soon_threadsafe(_settle, op.future, None, err)  # type: ignore[union-attr]
            return next_index

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
        if self._failed is not None:
            raise self._failed
        if self._closed or self._loop is None:
            raise StoreError("catalog is closed")
        fut = self._loop.create_future()
        self._queue.put(_Op(kind, key, payload, fut, owners=owners))
        if self._failed is not None:  # the writer failed between the check and the put
            _settle(fut, None, self._failed)
        return fut

    # writes --------------------------------------------------------------------------------
    async def put(
        self, workload: Workload, *, owners: Collection[str] | None = None
    ) -> WorkloadState:
        old = self._view.by_id.get(workload.id)
        release = self._admit(workload, old)
        try:
            if old is not None and old.workload.check == workload.check:
                state = WorkloadState(workload, old.health, old.output)
            else:
                state = WorkloadState(
                    workload, Health.PASSING if workload.check is None else Health.UNKNOWN
                )
            vip = self._vip_future(str(workload.service))
            put = self._submit(
                "put", workload.id, state, None if owners is None else frozenset(owners)
            )
            await asyncio.gather(vip, put)  # a refused put raises Conflict; both are retrieved
            return state
        finally:
            release()

    def _admit(self, workload: Workload, old: WorkloadState | None) -> Callable[[], None]:
        """The write limits, then the admission check: raise before anything is queued."""
        self.limits.check(workload)
        if self.admission is None:
            return _nothing
        return self.admission(workload, None if old is None else old.workload)

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


def _nothing() -> None:
    pass


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
