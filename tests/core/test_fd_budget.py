"""The file-descriptor attack of a `workloads`-scoped token, replayed on a real process with a
1,024 open-file limit: ten services of 64 ports want 1,280 egress listeners. Today the process
cannot even start again once they are in the catalog ('Too many open files')."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from discovery.embedded import EmbeddedCatalog
from discovery.model import Workload
from discovery.names import ServiceKey
from isthmus import config as configmod
from isthmus.identity import ensure_local_pki

from .conftest import ApplianceProcess, free_port, loopback_host, make_config

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed"),
]

LIMIT = 1024


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def seed(data_dir: Path, cidr: str) -> None:
    """What the attack left in the catalog (written before ports were capped at 16)."""

    async def fill() -> None:
        c = EmbeddedCatalog(data_dir, "east", cidr)
        await c.open()
        for i in range(10):
            ports = {f"tcp-{j}": 20000 + j for j in range(64)}
            await c.put(Workload(f"w{i}", ServiceKey(f"s{i}"), "10.0.0.5", ports, "east"))
        await c.close()

    asyncio.run(fill())


def dig(listen: str, name: str) -> str:
    host, port = configmod.split_host_port(listen)
    return subprocess.run(
        ["dig", f"@{host}", "-p", str(port), "+tries=1", "+time=2", "+short", name],
        capture_output=True, text=True, timeout=10,
    ).stdout.strip()


def test_a_catalog_wanting_more_listeners_than_fds_still_starts(tmp_path: Path) -> None:
    host = loopback_host()
    cidr = f"127.250.{os.getpid() % 250}.0/24"
    raw = make_config(
        tmp_path,
        roles=["control", "ingress", "egress", "dns"],
        control={"listen": f"{host}:{free_port(host)}"},
        ingress={"listen": f"{host}:{free_port(host)}"},
        dns={"listen": f"{host}:{free_port(host)}"},
        egress={"vip_cidr": cidr},
    )
    ensure_local_pki(configmod.validate(raw))
    seed(Path(raw["data_dir"]), cidr)
    p = ApplianceProcess(tmp_path, raw)
    try:
        p.start(timeout=40, preexec_fn=_low_fd_limit)
        out = p.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)["status"]
        budget = status["limits"]["egress_listeners"]
        assert budget["budget"] == LIMIT // 4
        assert budget["wanted"] == 10 * 2 * 64
        assert budget["open"] == LIMIT // 4
        assert budget["skipped"] == 10 * 2 * 64 - LIMIT // 4
        assert status["limits"]["open_files"] == LIMIT
        assert dig(raw["dns"]["listen"], "s0.default.global")  # the resolver runs

        # new registrations that would want more listeners are refused, with the reason
        token = Path(p.token_file).read_text().strip()
        body = {"service": "extra", "address": "10.0.0.6",
                "ports": {f"tcp-{j}": 30000 + j for j in range(16)}}
        code, answer = put(p.api_url, token, "extra", body)
        assert code == 409 and "listener budget" in answer["error"], answer
        body["ports"] = {f"tcp-{j}": 30000 + j for j in range(64)}
        code, answer = put(p.api_url, token, "extra", body)
        assert code == 422 and answer["field"] == "ports", answer
    finally:
        p.stop()
    log = p.log_path.read_text()
    assert log.count('"event": "egress listener budget exhausted"') == 1
    assert "Too many open files" not in log


def put(api: str, token: str, wid: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    r = subprocess.run(
        ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-X", "PUT",
         "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json",
         "--data", json.dumps(body), f"{api}/v1/workloads/{wid}"],
        capture_output=True, text=True, timeout=15,
    )
    text, _, code = r.stdout.rpartition("\n")
    return int(code), json.loads(text)
