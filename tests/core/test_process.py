"""The appliance as a real process: crash safety, signals, reload, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from .conftest import ApplianceProcess, free_port, loopback_host

BODY = {"service": "reviews", "address": "10.0.0.5", "ports": {"http": 9080}}


async def test_sigkill_mid_burst_loses_no_acknowledged_registration(
    appliance_process: ApplianceProcess,
) -> None:
    appliance_process.start()
    token = Path(appliance_process.token_file).read_text().strip()
    acked: set[str] = set()
    headers = {"Authorization": f"Bearer {token}"}
    killed = asyncio.Event()

    async def writer(session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not killed.is_set():
            wid = f"w{n}-{i}"
            i += 1
            try:
                async with session.put(
                    f"{appliance_process.api_url}/v1/workloads/{wid}", json=BODY, headers=headers
                ) as r:
                    if r.status in (200, 201):
                        acked.add(wid)
            except (TimeoutError, aiohttp.ClientError):
                return

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        tasks = [asyncio.create_task(writer(session, n)) for n in range(16)]
        async with asyncio.timeout(30):
            while len(acked) < 400:
                await asyncio.sleep(0.01)
        appliance_process.signal(signal.SIGKILL)  # mid-burst: writers are still going
        killed.set()
        await asyncio.gather(*tasks)
    assert appliance_process.wait() == -signal.SIGKILL

    appliance_process.start()
    result = appliance_process.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    stored = {w["id"] for w in json.loads(result.stdout)["workloads"]}
    lost = acked - stored
    assert not lost, f"{len(lost)} acknowledged registrations lost, e.g. {sorted(lost)[:5]}"
    assert len(acked) >= 400


def test_sigterm_drains_and_exits_zero(appliance_process: ApplianceProcess) -> None:
    appliance_process.start()
    assert (
        appliance_process.cli(
            "register", "a", "--service", "x", "--address", "10.0.0.1", "--port", "http=80"
        ).returncode
        == 0
    )
    appliance_process.signal(signal.SIGTERM)
    assert appliance_process.wait() == 0
    log = appliance_process.log_path.read_text()
    assert '"event": "draining"' in log and '"event": "catalog closed"' in log


def test_sighup_reloads_static_workloads_and_survives_a_broken_file(
    appliance_process: ApplianceProcess,
) -> None:
    raw = appliance_process.raw
    raw["discovery"] = {"workloads": [{"id": "s1", **BODY}]}
    appliance_process.config_path.write_text(yaml.safe_dump(raw))
    appliance_process.start()

    def ids() -> set[str]:
        out = appliance_process.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return {w["id"] for w in json.loads(out.stdout)["workloads"]}

    assert ids() == {"s1"}
    raw["discovery"] = {"workloads": [{"id": "s2", **BODY}]}
    appliance_process.config_path.write_text(yaml.safe_dump(raw))
    appliance_process.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while ids() != {"s2"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ids() == {"s2"}

    appliance_process.config_path.write_text("cluster: [broken\n")
    appliance_process.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload failed" not in appliance_process.log_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert appliance_process.proc is not None and appliance_process.proc.poll() is None
    assert ids() == {"s2"}


def test_a_broken_config_stops_start_up_with_every_problem(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("cluster: East\ntrust_domain: t\napi: {listen: nowhere}\nworkers: 0\n")
    r = subprocess.run(
        [sys.executable, "-m", "isthmus.cli", "run", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "cluster: expected a DNS label" in r.stderr
    assert "api.listen: expected IP:PORT" in r.stderr
    assert "workers: Input should be greater than or equal to 1" in r.stderr


def test_a_busy_port_is_a_clear_start_up_error(tmp_path: Path) -> None:
    import socket

    host = loopback_host()
    with socket.socket() as s:
        s.bind((host, 0))
        s.listen()
        port = s.getsockname()[1]
        p = tmp_path / "c.yaml"
        p.write_text(
            yaml.safe_dump(
                {
                    "cluster": "a",
                    "trust_domain": "t",
                    "roles": ["control"],
                    "data_dir": str(tmp_path / "d"),
                    "api": {"listen": f"{host}:{port}", "token_file": str(tmp_path / "tok")},
                    "metrics": {"enabled": False},
                    "trust": {"bundle": str(tmp_path / "no-bundle.pem")},
                }
            )
        )
        r = subprocess.run(
            [sys.executable, "-m", "isthmus.cli", "run", "--config", str(p)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert r.returncode == 1
    assert f"cannot listen on {host}:{port}" in r.stderr


def test_the_readme_story(tmp_path: Path, appliance_process: ApplianceProcess) -> None:
    """Register a VM workload with the CLI, watch it pass and fail, restart, still there."""
    appliance_process.start()
    host = loopback_host()
    port = free_port(host)
    token_mode = os.stat(appliance_process.token_file).st_mode & 0o777
    assert token_mode == 0o600

    def status() -> str:
        r = appliance_process.cli("status")
        assert r.returncode == 0, r.stderr
        return r.stdout

    def wait_for(word: str) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = next((ln for ln in status().splitlines() if ln.startswith("vm-1 ")), "")
            if line.split()[4:5] == [word]:  # WORKLOAD SERVICE ADDRESS CHECK HEALTH WHY
                return
            time.sleep(0.2)
        raise AssertionError(f"vm-1 never became {word}:\n{status()}")

    r = appliance_process.cli(
        "register",
        "vm-1",
        "--service",
        "reviews",
        "--address",
        host,
        "--port",
        f"http={port}",
        "--check-http",
        f"http://{host}:{port}/",
        "--interval",
        "300ms",
        "--timeout",
        "250ms",
        "--label",
        "version=v1",
    )
    assert r.returncode == 0, r.stderr
    assert "registered vm-1" in r.stdout
    wait_for("critical")  # nothing listens yet
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", host],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for("passing")
        assert "reviews.default" in status() and "1/1" in status()
    finally:
        server.terminate()
        server.wait(10)
    wait_for("critical")
    appliance_process.stop()
    appliance_process.start()
    assert "vm-1" in status()

    bad = appliance_process.cli(
        "register", "vm-2", "--service", "Bad", "--address", "x", "--port", "http=80"
    )
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "service: expected a DNS label" in bad.stderr
    r = appliance_process.cli("deregister", "vm-1")
    assert r.returncode == 0 and "deregistered vm-1" in r.stdout
    r = appliance_process.cli("deregister", "vm-1")
    assert r.returncode == 1 and "404" in r.stderr


def test_cli_without_a_reachable_api(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("x\n")
    host = loopback_host()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "isthmus.cli",
            "status",
            "--api",
            f"http://{host}:{free_port(host)}",
            "--token-file",
            str(tmp_path / "tok"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "cannot reach the API" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "ISTHMUS_TOKEN"}
    env["HOME"] = str(tmp_path)
    env.pop("XDG_STATE_HOME", None)
    r = subprocess.run(
        [sys.executable, "-m", "isthmus.cli", "status"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert r.returncode == 1 and "no API token" in r.stderr
