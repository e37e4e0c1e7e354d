"""A VM agent: bootstrap identity with a one-time token, register over the control channel,
resolve and call through its own egress."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from discovery.names import ServiceKey
from isthmus import config as configmod
from isthmus.appliance import Appliance, StartupError

from .conftest import Cluster, eventually, free_port, make_pki


@pytest.fixture
async def control(tmp_path: Path):
    make_pki(tmp_path, ["east"])
    c = Cluster("east", tmp_path, "127.65.0.1", "us", vip_cidr="127.246.0.0/24")
    c.control_port = free_port(c.host)
    cfg = c.config

    def with_control() -> dict:
        raw = cfg()
        raw["control"] = {"listen": f"{c.host}:{c.control_port}"}
        return raw

    c.config = with_control  # type: ignore[method-assign]
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def agent_config(tmp: Path, control: Cluster, backend_port: int, token: str) -> dict:
    d = tmp / "vm"
    d.mkdir()
    shutil.copy(control.dir / "pki" / "bundle.pem", d / "bundle.pem")  # provisioned by Ansible
    (d / "token").write_text(token + "\n")
    host = "127.65.0.9"
    return {
        "cluster": "east",
        "trust_domain": "mesh.test",
        "node": "vm-1",
        "roles": ["agent"],
        "data_dir": str(d / "data"),
        "trust": {
            "bundle": str(d / "bundle.pem"),
            "cert": str(d / "agent.pem"),
            "key": str(d / "agent.key"),
            "ca_cert": str(d / "none.pem"),
            "ca_key": str(d / "none.key"),
        },
        "agent": {
            "control": f"{control.host}:{control.control_port}",
            "bootstrap_token_file": str(d / "token"),
        },
        "dns": {"listen": f"{host}:{free_port(host)}"},
        "api": {"listen": f"{host}:{free_port(host)}", "token_file": str(d / "api-token")},
        "metrics": {"enabled": False},
        "egress": {"vip_cidr": "127.246.0.0/24"},
        "discovery": {
            "workloads": [
                {
                    "id": "vm-1-web",
                    "service": "web",
                    "address": host,
                    "ports": {"http": backend_port},
                }
            ]
        },
    }


async def test_agent_bootstraps_registers_and_routes(tmp_path: Path, control: Cluster) -> None:
    host = "127.65.0.9"
    port = free_port(host)
    app = web.Application()

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello from vm-1")

    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    status, tok = await control.call("POST", "/v1/bootstrap-tokens", {"ttl": "5m"})
    assert status == 201
    raw = agent_config(tmp_path, control, port, tok["token"])
    agent = Appliance(configmod.validate(raw))
    try:
        await agent.start()
        assert agent.trust is not None
        assert str(agent.trust.credentials.spiffe_id) == (
            "spiffe://mesh.test/cluster/east/agent/vm-1"
        )
        assert (Path(raw["trust"]["key"]).stat().st_mode & 0o777) == 0o600

        # registered at the control node, as the agent's
        async def registered() -> dict | None:
            s, w = await control.call("GET", "/v1/workloads/vm-1-web")
            return w if s == 200 else None

        w = await eventually(registered, what="vm-1-web registered")
        assert w["cluster"] == "east"

        # the agent's table has it; its resolver answers; its egress routes to it
        async def routed() -> bool:
            r = agent.holder.current.get(ServiceKey("web"))
            return r is not None and r.destinations[0].healthy == 1

        await eventually(routed, what="agent table has web")
        vip = str(agent.holder.current.get(ServiceKey("web")).vip)
        if shutil.which("dig"):
            dns_host, dns_port = raw["dns"]["listen"].rsplit(":", 1)
            done = await asyncio.to_thread(  # the resolver runs on this loop: don't block it
                subprocess.run,
                ["dig", "+short", f"@{dns_host}", "-p", dns_port, "web.default.global"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            out = done.stdout.strip()
            assert out == vip
        async with aiohttp.ClientSession() as s, s.get(f"http://{vip}:{port}/") as r:
            assert r.status == 200 and await r.text() == "hello from vm-1"
    finally:
        await agent.stop()
        await runner.cleanup()

    # the token was single use: a second agent with it is refused, clearly
    raw2 = dict(
        raw,
        node="vm-2",
        trust={**raw["trust"], "cert": str(tmp_path / "x.pem"), "key": str(tmp_path / "x.key")},
        data_dir=str(tmp_path / "vm2"),
    )
    raw2["dns"] = {"listen": f"{host}:{free_port(host)}"}
    raw2["api"] = {"listen": f"{host}:{free_port(host)}", "token_file": str(tmp_path / "t2")}
    again = Appliance(configmod.validate(raw2))
    with pytest.raises(StartupError, match="bootstrap"):
        await again.start()
    await again.stop()


async def test_an_agent_cannot_take_over_another_sources_workload(control: Cluster) -> None:
    await control.register("owned", "web")  # registered through the API
    from federation.agentlink import _handle
    from federation.trust import SpiffeId

    vm9 = SpiffeId.for_node("mesh.test", "east", "agent", "vm-9")
    assert control.app is not None and control.app.catalog is not None
    reply = await _handle(
        control.app.catalog,
        "east",
        vm9,
        '{"type": "register", "id": "owned", "workload": '
        '{"service": "web", "address": "10.0.0.1", "ports": {"http": 1}}}',
    )
    assert not reply["ok"] and "belongs to api" in reply["error"]
    reply = await _handle(control.app.catalog, "east", vm9, "[]")
    assert not reply["ok"]
    reply = await _handle(
        control.app.catalog,
        "east",
        vm9,
        '{"type": "register", "id": "x", "workload": {"service": "BAD"}}',
    )
    assert not reply["ok"] and reply["id"] == "x"
    _, still = await control.call("GET", "/v1/workloads/owned")
    assert still["address"] == control.host
    await asyncio.sleep(0)
