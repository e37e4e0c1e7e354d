"""`isthmus run` as a real process on a damaged catalog: it starts (the bad rows quarantined and
reported) or refuses with one clear line, and SIGTERM stops it in every phase."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from discovery.embedded import EmbeddedCatalog
from discovery.schema import parse_workload
from isthmus import config as configmod

from .conftest import ApplianceProcess, make_config

pytestmark = pytest.mark.timeout(90)


def seed_catalog(data_dir: Path) -> None:
    async def fill() -> None:
        c = EmbeddedCatalog(data_dir, "east")
        await c.open()
        for wid, service in (("good", "reviews"), ("bad", "ratings")):
            body = {"service": service, "address": "10.0.0.5", "ports": {"http": 9080}}
            await c.put(parse_workload(body, wid, "east"))
        await c.close()

    asyncio.run(fill())


def sqlite(db: Path, statement: str) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(statement)
    finally:
        conn.close()


def reachable(listen: str, within: float) -> bool:
    host, port = configmod.split_host_port(listen)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def test_a_corrupt_row_neither_hangs_start_up_nor_blocks_sigterm(tmp_path: Path) -> None:
    """Today the writer thread dies on this row, start-up waits for it forever and SIGTERM is
    not listened to until start-up completes: the process has to be killed."""
    raw = make_config(tmp_path)
    data_dir = Path(raw["data_dir"])
    seed_catalog(data_dir)
    sqlite(data_dir / "catalog.db",
           "UPDATE workloads SET body=json_set(body,'$.ports',json('[1]')) WHERE id='bad'")
    p = ApplianceProcess(tmp_path, raw)
    p.launch()
    try:
        served = reachable(raw["api"]["listen"], 15)
        if served:
            out = p.cli("status", "--json")
            assert out.returncode == 0, out.stderr
            status = json.loads(out.stdout)
            assert [w["id"] for w in status["workloads"]] == ["good"]
            [row] = status["status"]["catalog"]["quarantined"]
            assert row["table"] == "workloads" and row["key"] == "bad" and "ports" in row["reason"]
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0
        assert served, "the appliance never served its API"
    finally:
        p.stop()
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(5)
    log = p.log_path.read_text()
    assert '"event": "store row quarantined"' in log and '"key": "bad"' in log


def _holds(pid: int, path: Path) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd_dir / fd) == str(path) for fd in os.listdir(fd_dir))
    except OSError:
        return False


def test_sigterm_interrupts_a_start_up_waiting_on_the_catalog(tmp_path: Path) -> None:
    """Another process holds the catalog locked: start-up waits for it, and SIGTERM during that
    wait stops the process cleanly instead of being ignored until start-up gives up."""
    raw = make_config(tmp_path)
    data_dir = Path(raw["data_dir"])
    data_dir.mkdir(mode=0o700)
    db = data_dir / "catalog.db"
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("CREATE TABLE hold (x)")
        holder.execute("BEGIN EXCLUSIVE")
        p = ApplianceProcess(tmp_path, raw)
        p.launch()
        try:
            assert p.proc is not None
            deadline = time.monotonic() + 20
            while not _holds(p.proc.pid, db.resolve()):
                assert p.proc.poll() is None, p.log_path.read_text()[-2000:]
                assert time.monotonic() < deadline, "the catalog was never opened"
                time.sleep(0.02)
            p.signal(signal.SIGTERM)
            code = p.wait(20)
        finally:
            p.stop()
    finally:
        holder.close()
    log = p.log_path.read_text()
    assert code == 0, log[-2000:]
    assert '"event": "start-up interrupted"' in log
    assert "database is locked" not in log
