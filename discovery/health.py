"""Health checking for every workload in the catalog.

One scheduler task and a heap of due times rather than a task per workload: 100,000
workloads cost 100,000 small heap entries, not 100,000 coroutines. First checks are spread
with jitter over the interval so a restart does not fire them all at once.

Two bounds keep checking from becoming a probe flood (20 workloads at `interval: 1ms` once sent
8,679 probes a second to one target): no check runs more often than `min_interval` (stored
checks faster than that, from before the floor, run at the floor), and probes across every
workload start at most `max_per_second` a second (a token bucket; checks that find it empty
run late, like checks that find every concurrency slot taken).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from discovery.catalog import Catalog
from discovery.errors import DiscoveryError, InvalidInput, NotFound
from discovery.limits import DEFAULT_MIN_CHECK_INTERVAL
from discovery.model import Check, CheckKind, Health, WorkloadState
from discovery.probes import ProbeResult, probe_http, probe_tcp

log = logging.getLogger(__name__)

CHECKS = Counter(
    "isthmus_health_checks_total", "Health checks run, by kind and result", ["kind", "result"]
)
TRANSITIONS = Counter(
    "isthmus_health_transitions_total", "Workload health changes, by new state", ["health"]
)

_CHILDREN = {
    (kind, ok): CHECKS.labels(kind, "pass" if ok else "fail")
    for kind in ("http", "tcp", "ttl")
    for ok in (True, False)
}


def _count(kind: str, ok: bool) -> None:
    _CHILDREN[kind, ok].inc()  # labelled children looked up once, not per check


# A newly registered workload is checked within this long, not a whole interval later.
NEW_WORKLOAD_DELAY = 0.5
# Probes started per second across all workloads: 10,000 workloads at the default 10 s
# interval, about a quarter of a core (docs/configuration.md).
DEFAULT_MAX_PROBES_PER_SECOND = 1000


class _Bucket:
    """Token bucket: `rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is due."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass(slots=True)
class _Tracked:
    check: Check
    generation: int
    health: Health
    successes: int = 0
    failures: int = 0
    critical_since: float | None = None
    ttl_deadline: float = 0.0
    running: bool = False
    source: str = ""


class HealthChecker:
    def __init__(
        self,
        catalog: Catalog,
        *,
        max_concurrent: int = 1024,
        min_interval: float = DEFAULT_MIN_CHECK_INTERVAL,
        max_per_second: float = DEFAULT_MAX_PROBES_PER_SECOND,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if min_interval <= 0 or max_per_second <= 0:
            raise ValueError("min_interval and max_per_second must be positive")
        self.catalog = catalog
        self._max_concurrent = max_concurrent
        self.min_interval = min_interval
        self.max_per_second = max_per_second
        # a twentieth of a second's worth: a restart's first checks cannot all go at once
        self.probe_burst = max(1, int(max_per_second / 20))
        self._bucket: _Bucket | None = None
        self._inflight = 0
        self._rng = rng or random.Random()
        self._clock = clock
        self._tracked: dict[str, _Tracked] = {}
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = 0
        self._generation = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        # sources (e.g. an agent whose channel is down) whose workloads are held critical
        self._held: dict[str, str] = {}

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def start(self) -> None:
        now = self._now()
        self._bucket = _Bucket(self.max_per_second, self.probe_burst, now)
        if self.catalog.runs_checks:
            # The store runs every check itself (Consul's agents do): probing here as well
            # would double the load on each workload and race the store's verdict. Heartbeats
            # and sources held critical still go through here, to the store.
            return
        for st in self.catalog.workloads():
            self._track(st, now, spread=True)
        self._unsubscribe = self.catalog.subscribe(self._on_change)
        self._task = asyncio.create_task(self._run(), name="health-scheduler")

    async def stop(self) -> None:
        if self._unsubscribe:
            self._unsubscribe()
        if self._task:
            self._task.cancel()
        for t in list(self._probes):
            t.cancel()
        await asyncio.gather(
            *(t for t in [self._task, *self._probes] if t), return_exceptions=True
        )

    @property
    def tracked(self) -> int:
        return len(self._tracked)

    # catalog changes -------------------------------------------------------------------------
    def _on_change(self, _index: int, workload_id: str, state: WorkloadState | None) -> None:
        tracked = self._tracked.get(workload_id)
        if state is None or state.workload.check is None:
            self._tracked.pop(workload_id, None)
            return
        if tracked is not None and tracked.check == state.workload.check:
            tracked.health = state.health
            return
        self._track(state, self._now(), spread=False)

    def _track(self, st: WorkloadState, now: float, spread: bool) -> None:
        check = st.workload.check
        if check is None:
            return
        self._generation += 1
        t = _Tracked(check, self._generation, st.health, source=st.workload.source)
        if st.health is Health.CRITICAL:
            t.critical_since = now
        self._tracked[st.workload.id] = t
        if check.kind is CheckKind.TTL:
            t.ttl_deadline = now + self._floor(check.ttl)
            self._schedule(t.ttl_deadline, st.workload.id, t)
        else:
            interval = self._floor(check.interval)
            window = interval if spread else min(interval, NEW_WORKLOAD_DELAY)
            self._schedule(now + self._rng.uniform(0, window), st.workload.id, t)

    def _floor(self, seconds: float) -> float:
        return max(seconds, self.min_interval)

    def _schedule(self, due: float, workload_id: str, t: _Tracked) -> None:
        self._seq += 1
        wake = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, self._seq, workload_id, t.generation))
        if wake:
            self._wake.set()

    # TTL heartbeats ----------------------------------------------------------------------------
    async def heartbeat(self, workload_id: str) -> WorkloadState:
        if self.catalog.runs_checks:
            return await self.catalog.heartbeat(workload_id)
        st = self.catalog.get(workload_id)
        t = self._tracked.get(workload_id)
        check = st.workload.check
        if check is None or check.kind is not CheckKind.TTL or t is None:
            raise InvalidInput(
                f"workload {workload_id!r} has no TTL check; heartbeats apply to TTL checks only",
                field="check",
            )
        t.ttl_deadline = self._now() + self._floor(check.ttl)
        self._schedule(t.ttl_deadline, workload_id, t)
        _count("ttl", True)
        await self._record(workload_id, t, ProbeResult(True, "TTL heartbeat received"))
        return self.catalog.get(workload_id)

    # the scheduler ------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._bucket is not None
        while True:
            self._wake.clear()
            now = self._now()
            rate_wait = None  # the probe rate is spent: seconds until the next token
            while self._heap and self._heap[0][0] <= now:
                if self._inflight >= self._max_concurrent:
                    # Back-pressure: probes start only as slots free up, so a loop that falls
                    # behind runs checks late instead of piling up thousands of waiting tasks.
                    break
                _, _, wid, gen = self._heap[0]
                t = self._tracked.get(wid)
                if t is None or t.generation != gen:
                    heapq.heappop(self._heap)
                    continue  # deregistered or re-registered with another check
                if t.check.kind is CheckKind.TTL:
                    heapq.heappop(self._heap)
                    if t.ttl_deadline <= now:
                        self._spawn(self._ttl_expired(wid, t))
                    continue
                if t.running:  # previous probe still in flight: try again next interval
                    heapq.heappop(self._heap)
                    self._schedule(now + self._floor(t.check.interval), wid, t)
                    continue
                wait = self._bucket.take(now)
                if wait > 0:
                    rate_wait = wait
                    break
                heapq.heappop(self._heap)
                t.running = True
                self._inflight += 1
                self._spawn(self._probe(wid, t))
            if rate_wait is not None:
                timeout: float | None = rate_wait
            elif self._heap and self._inflight >= self._max_concurrent:
                timeout = None  # a finishing probe wakes us
            else:
                timeout = self._heap[0][0] - now if self._heap else None
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _spawn(self, coro: object) -> None:
        task = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, wid: str, t: _Tracked) -> None:
        check = t.check
        started = self._now()
        try:
            try:
                if check.kind is CheckKind.HTTP:
                    result = await probe_http(check.target, check.timeout)
                else:
                    result = await probe_tcp(check.target, check.timeout)
            finally:
                self._inflight -= 1
                if self._inflight == self._max_concurrent - 1:
                    self._wake.set()  # the scheduler was waiting for a free slot
            _count(check.kind.value, result.ok)
            await self._record(wid, t, result)
        finally:
            t.running = False
        if self._tracked.get(wid) is t:
            self._schedule(started + self._floor(check.interval), wid, t)

    async def _ttl_expired(self, wid: str, t: _Tracked) -> None:
        _count("ttl", False)
        await self._record(wid, t, ProbeResult(False, f"TTL of {t.check.ttl:g}s expired"))
        if self._tracked.get(wid) is t and t.check.deregister_after is not None:
            # Keep an expiry entry queued so deregister_after is honoured without heartbeats.
            again = self._floor(min(t.check.ttl, t.check.deregister_after))
            self._schedule(self._now() + again, wid, t)
            t.ttl_deadline = self._now()

    async def _record(self, wid: str, t: _Tracked, result: ProbeResult) -> None:
        now = self._now()
        if result.ok:
            t.successes, t.failures = t.successes + 1, 0
        else:
            t.successes, t.failures = 0, t.failures + 1
        new = t.health
        if result.ok and t.successes >= t.check.success_threshold:
            new = Health.PASSING
        elif not result.ok and t.failures >= t.check.failure_threshold:
            new = Health.CRITICAL
        held = self._held.get(t.source)
        if held is not None:  # the probe may pass, but nobody vouches for the workload
            new, result = Health.CRITICAL, ProbeResult(False, held)
        if new is Health.CRITICAL and t.critical_since is None:
            t.critical_since = now
        elif new is not Health.CRITICAL:
            t.critical_since = None
        if self._tracked.get(wid) is not t:
            return
        try:
            if new is not t.health:
                t.health = new
                TRANSITIONS.labels(new.value).inc()
                log.info(
                    "workload health changed",
                    extra={"workload": wid, "health": new.value, "output": result.output},
                )
                await self.catalog.set_health(wid, new, result.output)
            dereg = t.check.deregister_after
            since = t.critical_since
            if dereg is not None and since is not None and now - since >= dereg:
                log.warning(
                    "deregistering workload critical for too long",
                    extra={"workload": wid, "critical_for": round(now - since, 3)},
                )
                self._tracked.pop(wid, None)
                await self.catalog.delete(wid)
        except NotFound:
            pass
        except DiscoveryError as e:
            log.error("cannot record health", extra={"workload": wid, "error": str(e)})

    # sources held critical --------------------------------------------------------------------
    def source_down(self, source: str, reason: str) -> None:
        """Hold every workload registered by `source` critical, whatever its probes say, until
        `source_up`. An agent whose channel is gone cannot vouch for its workloads; Consul's
        node health check does the same for a node's services."""
        self._held[source] = reason
        for st in self.catalog.workloads():
            if st.workload.source == source:
                t = self._tracked.get(st.workload.id)
                if t is not None:
                    t.health, t.successes = Health.CRITICAL, 0
                self._spawn(self._set_health(st.workload.id, Health.CRITICAL, reason))

    def source_up(self, source: str) -> None:
        """Release a source (held here, or before a restart): workloads without a check pass
        again; checked ones are probed at once and pass when their probe does."""
        self._held.pop(source, None)
        now = self._now()
        for st in self.catalog.workloads():
            if st.workload.source != source:
                continue
            t = self._tracked.get(st.workload.id)
            if t is None:
                if st.health is not Health.PASSING:
                    self._spawn(self._set_health(st.workload.id, Health.PASSING, ""))
            elif t.check.kind is not CheckKind.TTL:
                t.successes = t.failures = 0
                self._schedule(now, st.workload.id, t)

    def held(self, source: str) -> str | None:
        """Why `source`'s workloads are held critical, or None."""
        return self._held.get(source)

    async def _set_health(self, wid: str, health: Health, output: str) -> None:
        try:
            old = self.catalog.get(wid)
            if old.health is not health:
                TRANSITIONS.labels(health.value).inc()
                log.info(
                    "workload health changed",
                    extra={"workload": wid, "health": health.value, "output": output},
                )
            await self.catalog.set_health(wid, health, output)
        except NotFound:
            pass
        except DiscoveryError as e:
            log.error("cannot record health", extra={"workload": wid, "error": str(e)})
