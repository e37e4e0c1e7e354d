"""An appliance with control, ingress and DNS roles: dig resolves what the API registers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from isthmus import config as configmod
from isthmus.appliance import Appliance, StartupError
from isthmus.identity import ensure_local_pki

from .conftest import ApiSession, free_port, loopback_host, make_config

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed")


def dig(server: str, port: int, *args: str) -> str:
    return subprocess.run(
        ["dig", f"@{server}", "-p", str(port), "+tries=1", "+time=2", *args],
        capture_output=True, text=True, timeout=10,
    ).stdout


async def test_dns_and_ingress_roles(tmp_path: Path) -> None:
    host = loopback_host()
    raw = make_config(
        tmp_path,
        roles=["control", "ingress", "dns"],
        dns={"listen": f"{host}:{free_port(host)}"},
        ingress={"listen": f"{host}:{free_port(host)}"},
        control={"listen": f"{host}:0"},
    )
    cfg = configmod.validate(raw)
    ensure_local_pki(cfg)
    app = Appliance(cfg, None)
    await app.start()
    token = Path(cfg.api.token_file).read_text().strip()
    api = ApiSession(app.api_url, token)
    try:
        assert app.trust is not None and app.control_address is not None
        body = {"service": "reviews", "address": "10.0.0.5", "ports": {"http": 9080}}
        assert (await api.call("PUT", "/v1/workloads/r1", body))[0] == 201
        dns_host, dns_port = cfg.dns.listen.rsplit(":", 1)

        async def answer() -> str:
            async with asyncio.timeout(10):
                while True:
                    out = await asyncio.to_thread(
                        dig, dns_host, int(dns_port), "+short", "reviews.default.global")
                    if out.strip():
                        return out.strip()
                    await asyncio.sleep(0.1)

        vip = await answer()
        _, svc, _ = await api.call("GET", "/v1/services/default/reviews")
        assert vip == svc["vip"]
        status, out, _ = await api.call("GET", "/v1/status")
        assert out["identity"] == "spiffe://mesh.example.org/cluster/east/gateway/east-gw-1"
        status, tok, _ = await api.call("POST", "/v1/bootstrap-tokens", {"ttl": "10m"})
        assert status == 201 and tok["token"]
        status, err, _ = await api.call("POST", "/v1/bootstrap-tokens", {"ttl": "90d"})
        assert status == 422 and err["field"] == "ttl"
    finally:
        await api.close()
        await app.stop()


async def test_gateway_roles_need_a_pki(tmp_path: Path) -> None:
    host = loopback_host()
    cfg = configmod.validate(make_config(tmp_path, roles=["control", "ingress"],
                                         ingress={"listen": f"{host}:0"}))
    app = Appliance(cfg, None)
    with pytest.raises(StartupError, match=r"trust\.bundle"):
        await app.start()
    await app.stop()


async def test_roles_not_in_this_build_are_refused(tmp_path: Path) -> None:
    cfg = configmod.validate(make_config(tmp_path, roles=["dns"]))
    app = Appliance(cfg, None)
    with pytest.raises(StartupError, match="need 'control'"):
        await app.start()
    await app.stop()
