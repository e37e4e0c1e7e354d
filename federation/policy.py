"""Traffic policies: federation-wide, replicated, last-writer-wins by (HLC stamp, origin).

A policy is `weights` per cluster plus `failover`. Deleting one writes a tombstone (weights
None) with its own stamp, so a reset replicates and converges exactly like a set.

Stored in `data_dir/federation.db`; a row that does not parse is moved to its `quarantine`
table at start-up and reported (a replicated policy comes back from the peers anyway), and a
truncated file is refused rather than read as "no policies".
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from discovery.errors import InvalidInput, StoreError
from discovery.names import LABEL_EXPECTED, ServiceKey, is_label
from discovery.statefiles import QUARANTINE_DDL, QuarantinedRow, prepare_db, quarantine, quarantined
from federation.hlc import ClockDriftError, HybridClock, Stamp

log = logging.getLogger(__name__)

MAX_WEIGHT = 1_000_000
MAX_CLUSTERS = 256

QUARANTINED = Gauge(
    "isthmus_federation_quarantined_rows",
    "federation.db rows moved to the quarantine table because they did not validate",
)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    service: ServiceKey
    weights: Mapping[str, int] | None  # None: a tombstone, default routing
    failover: bool
    stamp: Stamp

    @property
    def deleted(self) -> bool:
        return self.weights is None

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service.name,
            "namespace": self.service.namespace,
            "weights": None if self.weights is None else dict(self.weights),
            "failover": self.failover,
            "version": str(self.stamp),
        }

    @classmethod
    def from_json(cls, raw: object) -> TrafficPolicy:
        """Parse a replicated policy; raises ValueError naming the bad field."""
        if not isinstance(raw, dict):
            raise ValueError(f"policy: expected an object, got {type(raw).__name__}")
        try:
            service = ServiceKey.parse(f"{raw['service']}.{raw['namespace']}")
        except (KeyError, ValueError) as e:
            raise ValueError(f"policy.service: {e}") from None
        weights = raw.get("weights")
        if weights is not None:
            weights = validate_weights(weights, known=None)
        failover = raw.get("failover", True)
        if not isinstance(failover, bool):
            raise ValueError(f"policy.failover: expected true or false, got {failover!r}")
        return cls(service, weights, failover, Stamp.parse(raw.get("version")))


def validate_weights(raw: object, known: Iterable[str] | None) -> dict[str, int]:
    """Weights are integers >= 0 per known cluster, at least one > 0 (else InvalidInput)."""
    if not isinstance(raw, dict) or not raw:
        raise InvalidInput(
            "weights: expected an object of cluster: weight with at least one cluster",
            field="weights",
        )
    if len(raw) > MAX_CLUSTERS:
        raise InvalidInput(f"weights: at most {MAX_CLUSTERS} clusters", field="weights")
    known_set = set(known) if known is not None else None
    out: dict[str, int] = {}
    for cluster, weight in raw.items():
        field = f"weights.{cluster}"
        if not is_label(cluster):
            raise InvalidInput(f"{field}: cluster name expected {LABEL_EXPECTED}", field=field)
        if known_set is not None and cluster not in known_set:
            raise InvalidInput(
                f"{field}: unknown cluster {cluster!r} (known: {', '.join(sorted(known_set))})",
                field=field,
            )
        if isinstance(weight, bool) or not isinstance(weight, int) or not (
            0 <= weight <= MAX_WEIGHT
        ):
            raise InvalidInput(
                f"{field}: expected an integer from 0 to {MAX_WEIGHT}, got {weight!r}", field=field
            )
        out[cluster] = weight
    if not any(out.values()):
        raise InvalidInput("weights: at least one weight must be greater than 0", field="weights")
    return out


Listener = Callable[[TrafficPolicy], None]


def _policy_from_row(service: object, weights: object, failover: object, stamp: object
                     ) -> TrafficPolicy:
    """A stored row back into a policy; raises ValueError naming the column that is wrong."""
    if not isinstance(service, str):
        raise ValueError(f"service: expected NAME.NAMESPACE, got {service!r:.60}")
    try:
        key = ServiceKey.parse(service)
    except ValueError as e:
        raise ValueError(f"service: {e}") from None
    parsed = None
    if weights is not None:
        try:
            parsed = validate_weights(json.loads(weights) if isinstance(weights, str) else None,
                                      known=None)
        except (ValueError, InvalidInput) as e:
            raise ValueError(f"weights: {e}") from None
    if failover not in (0, 1) or isinstance(failover, float):
        raise ValueError(f"failover: expected 0 or 1, got {failover!r:.40}")
    try:
        version = Stamp.parse(stamp)
    except ValueError as e:
        raise ValueError(f"stamp: {e}") from None
    return TrafficPolicy(key, parsed, bool(failover), version)


class PolicyStore:
    """Policies in memory, persisted in `data_dir/federation.db`."""

    def __init__(self, data_dir: str | Path, clock: HybridClock) -> None:
        self.path = Path(data_dir) / "federation.db"
        self.clock = clock
        self._policies: dict[ServiceKey, TrafficPolicy] = {}
        self._listeners: list[Listener] = []
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self.quarantined: list[QuarantinedRow] = []  # every row in the quarantine table

    async def open(self) -> None:
        def load() -> tuple[sqlite3.Connection, list[TrafficPolicy]]:
            prepare_db(self.path, "federation store")
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout=5000")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS policies (service TEXT PRIMARY KEY, "
                    "weights TEXT, failover INTEGER NOT NULL, stamp TEXT NOT NULL)"
                )
                conn.execute(QUARANTINE_DDL)
                return conn, self._load(conn)
            except BaseException:
                conn.close()
                raise

        try:
            self._conn, policies = await asyncio.to_thread(load)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open {self.path}: {e}") from None
        for p in policies:
            self._policies[p.service] = p
            self.clock.advance(p.stamp)  # our own history: never issue an older stamp
        QUARANTINED.set(len(self.quarantined))

    def _load(self, conn: sqlite3.Connection) -> list[TrafficPolicy]:
        good, bad = [], []
        for row in conn.execute("SELECT service, weights, failover, stamp FROM policies"):
            try:
                good.append(_policy_from_row(*row))
            except Exception as e:  # whatever is wrong with a row, it is that row's problem
                bad.append((row, str(e)))
        if bad:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for row, reason in bad:
                    body = json.dumps(dict(zip(("service", "weights", "failover", "stamp"),
                                               row, strict=True)), default=str)
                    quarantine(conn, self.path, "policies", str(row[0]), body, reason)
                    conn.execute("DELETE FROM policies WHERE service IS ?", (row[0],))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self.quarantined = quarantined(conn)
        return good

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(conn.close)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def get(self, service: ServiceKey) -> TrafficPolicy | None:
        """The live policy (None when there is none or it was reset)."""
        p = self._policies.get(service)
        return None if p is None or p.deleted else p

    def all(self, include_deleted: bool = True) -> list[TrafficPolicy]:
        return [p for p in self._policies.values() if include_deleted or not p.deleted]

    async def set(
        self, service: ServiceKey, weights: dict[str, int], failover: bool
    ) -> TrafficPolicy:
        return await self._store(TrafficPolicy(service, weights, failover, self.clock.now()))

    async def reset(self, service: ServiceKey) -> TrafficPolicy:
        return await self._store(TrafficPolicy(service, None, True, self.clock.now()))

    async def merge(self, policy: TrafficPolicy) -> bool:
        """Apply a replicated policy if it wins; returns whether anything changed."""
        try:
            self.clock.observe(policy.stamp)
        except ClockDriftError as e:
            log.warning("replicated policy refused", extra={"service": str(policy.service),
                                                             "error": str(e)})
            return False
        current = self._policies.get(policy.service)
        if current is not None and current.stamp >= policy.stamp:
            return False
        await self._store(policy)
        return True

    async def _store(self, policy: TrafficPolicy) -> TrafficPolicy:
        async with self._lock:
            current = self._policies.get(policy.service)
            if current is not None and current.stamp >= policy.stamp:
                return current
            conn = self._conn
            if conn is None:
                raise StoreError("policy store is closed")
            row = (
                str(policy.service),
                None if policy.weights is None else json.dumps(dict(policy.weights)),
                int(policy.failover),
                str(policy.stamp),
            )

            def write() -> None:
                conn.execute("INSERT OR REPLACE INTO policies VALUES (?, ?, ?, ?)", row)

            try:
                await asyncio.to_thread(write)
            except sqlite3.Error as e:
                raise StoreError(f"cannot store policy: {e}") from None
            self._policies[policy.service] = policy
        log.info("traffic policy stored", extra=policy.to_json())
        for listener in list(self._listeners):
            listener(policy)
        return policy
