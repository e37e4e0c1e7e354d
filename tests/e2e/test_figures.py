"""The drills' arithmetic without the testbed: percentiles, windows, when traffic moved, the
soak's schedule and its slopes, and the load generator's HTTP client against a real server."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from .load import FIELDS, Conn, Failed, exchange
from .soak import FAULTS, pooled_slope, schedule, within_bound
from .stats import (
    FIELDS_HEADER,
    Record,
    moved_after,
    percentile,
    read_records,
    select,
    slope,
    summarize,
)


def rec(t: float, ok: bool = True, cluster: str = "east", lat: float = 1.0, attempts: int = 1,
        kind: str = "ka", target: str = "reviews") -> Record:
    return Record(t, kind, target, ok, attempts, lat, "" if ok else "timeout",
                  cluster if ok else "", 200 if ok else 0)


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) == 0.0


def test_summary_counts_failures_retries_and_clusters() -> None:
    records = [rec(1, cluster="west"), rec(2, attempts=2), rec(3, ok=False, attempts=2),
               rec(4, lat=100.0), rec(5, kind="dns")]
    s = summarize(select(records, 0, 10))
    assert (s.requests, s.failed, s.retried) == (4, 1, 2)
    assert s.clusters == {"west": 1, "east": 2}
    assert s.errors == {"timeout": 1}
    assert s.max_ms == 100.0 and s.share("east") == pytest.approx(2 / 3)
    assert select(records, 2, 4) == records[1:3]
    assert select(records, kinds=["dns"]) == records[4:]


def test_traffic_moved_when_the_last_answer_came_from_the_dead_cluster() -> None:
    records = [rec(9.0, cluster="west"), rec(10.2, cluster="west"), rec(10.5),
               rec(10.6, cluster="west"), rec(11.0), rec(12.0)]
    assert moved_after(records, 10.0, "west") == pytest.approx(0.6)
    assert moved_after([rec(10.5), rec(11.0)], 10.0, "west") == 0.0
    assert moved_after([], 10.0, "west") is None


def test_partial_last_line_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "load.csv"
    path.write_text(FIELDS_HEADER + "\n1.000,ka,reviews,1,1,2.50,,east,200\n"
                    "2.000,new,reviews,0,2,5.00,timeout,,0\n3.000,ka,rev")
    records = read_records(path)
    assert FIELDS == FIELDS_HEADER  # what load.py writes is what stats.py reads
    assert [r.t for r in records] == [1.0, 2.0]
    assert records[1].attempts == 2 and not records[1].ok


def test_slope_of_a_line_and_of_noise() -> None:
    xs = [float(i) for i in range(100)]
    b, se = slope(xs, [3.0 + 2.0 * x for x in xs])
    assert b == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-9)
    rng = random.Random(1)
    b, se = slope(xs, [50.0 + rng.gauss(0, 1) for _ in xs])
    assert abs(b) < 3 * se + 0.01


def test_the_schedule_is_seeded_and_covers_every_fault_each_round() -> None:
    plan = schedule(30, seed=7)
    assert plan == schedule(30, seed=7)
    assert plan != schedule(30, seed=8)
    assert len(plan) == 30
    n = len(FAULTS)
    for i in range(0, 30 - n + 1, n):
        assert sorted(plan[i:i + n]) == sorted(FAULTS)


def test_pooled_slope_ignores_restarts_but_finds_a_leak() -> None:
    # Two lifetimes, each flat at its own level: a restart is not a trend.
    flat = [(float(t), 1, 100.0) for t in range(0, 600, 10)] + \
           [(float(t), 2, 40.0) for t in range(600, 1200, 10)]
    b, se, n = pooled_slope(flat, warmup=60)
    assert b == pytest.approx(0.0) and n == 2 * (60 - 6)
    assert within_bound(b, se, 1.0)
    # The same restarts, each lifetime growing 1 unit a second: found, and past a bound of 1/h.
    leak = [(t, life, y + (t - (0 if life == 1 else 600))) for t, life, y in flat]
    b, se, _ = pooled_slope(leak, warmup=60)
    assert b == pytest.approx(1.0)
    assert not within_bound(b, se, 3600.0 / 2)


async def test_load_client_reads_keep_alive_and_chunked_answers() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\n{"cluster":"west"}')
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = Conn(reader, writer)
        assert await exchange(conn, "x", "/") == (200, b'{"cluster":"west"}', True)
        assert await exchange(conn, "x", "/") == (200, b"hello", True)
        with pytest.raises(Failed, match="closed before response"):
            await exchange(conn, "x", "/")
        conn.close()
    finally:
        server.close()
        await server.wait_closed()


def test_the_inventory_registers_exactly_the_backends_the_drills_start() -> None:
    """deploy.BACKENDS (the backends the drills start, kill and count) and the workloads the
    drills' inventory registers (tests/e2e/inventory) describe the same federation."""
    from .deploy import BACKENDS, inventory_workloads
    from .faults import EXPECTED_HEALTHY

    workloads = inventory_workloads()
    assert set(workloads) == set(BACKENDS)
    clusters = {"east-service": "east", "west-service": "west", "east-vm": "east"}
    healthy: dict[tuple[str, str], int] = {}
    for key, (machine, service, port, address) in BACKENDS.items():
        w = workloads[key]
        assert (w["service"], w["address"], list(w["ports"].values())) == (
            service, address, [port]), key
        assert w["check"]["http"] == f"http://{address}:{port}/healthz", key
        healthy[(service, clusters[machine])] = healthy.get((service, clusters[machine]), 0) + 1
    assert healthy == EXPECTED_HEALTHY
