"""A VM agent run as a user runs it: `isthmus run --config vm.yaml` with the documented VM
config (docs/operations.md, "Adding a VM"), its workloads health-checked by the control node,
seen and called from another cluster, and what happens when its backend or the agent stops."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from discovery.names import ServiceKey

from .conftest import Backend, Cluster, eventually, free_port, make_pki

EAST, WEST, VM = "127.66.0.1", "127.66.0.2", "127.66.0.17"


class Agent:
    """`isthmus run --config vm.yaml` in a process of its own."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "isthmus.cli", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    async def running(self) -> str:
        """The agent's output up to its 'running' line (or its exit)."""
        assert self.proc is not None and self.proc.stdout is not None
        lines = []
        async with asyncio.timeout(30):
            while True:
                line = await asyncio.to_thread(self.proc.stdout.readline)
                lines.append(line)
                if not line or " running; " in line:
                    break
        # keep reading, so a chatty agent never blocks on a full pipe
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
        return "".join(lines)

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return await asyncio.to_thread(self.proc.wait, 20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def vm_config(tmp: Path, control: str, workloads: list[dict[str, Any]]) -> Path:
    """The VM config of docs/operations.md, with this test's addresses."""
    d = tmp / "vm"
    d.mkdir(exist_ok=True)
    shutil.copy(tmp / "east" / "pki" / "bundle.pem", d / "bundle.pem")
    raw = {
        "cluster": "east",
        "trust_domain": "mesh.test",
        "node": "vm-17",
        "roles": ["agent"],
        "data_dir": str(d / "data"),
        "trust": {"bundle": str(d / "bundle.pem"), "cert": str(d / "node.pem"),
                  "key": str(d / "node.key")},
        "agent": {"control": control, "bootstrap_token_file": str(d / "bootstrap-token")},
        "api": {"listen": f"{VM}:{free_port(VM)}", "token_file": str(d / "api-token")},
        "egress": {"vip_cidr": "127.247.0.0/24"},
        "dns": {"listen": f"{VM}:{free_port(VM)}"},
        "metrics": {"enabled": False},
        "drain_timeout": "1s",
        "discovery": {"workloads": workloads},
    }
    path = d / "vm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
async def federation(tmp_path: Path) -> AsyncIterator[dict[str, Cluster]]:
    make_pki(tmp_path, ["east", "west"])
    east = Cluster("east", tmp_path, EAST, "us", vip_cidr="127.248.0.0/24")
    west = Cluster("west", tmp_path, WEST, "eu", vip_cidr="127.249.0.0/24",
                   roles=("control", "ingress", "egress"))
    east.peers, west.peers = {"west": west.ingress}, {"east": east.ingress}
    control_port = free_port(EAST)
    base = east.config

    def with_control() -> dict[str, Any]:
        raw = base()
        raw["control"] = {"listen": f"{EAST}:{control_port}", "agent_grace": "2s"}
        return raw

    east.config = with_control  # type: ignore[method-assign]
    east.control_addr = f"{EAST}:{control_port}"  # type: ignore[attr-defined]
    try:
        await asyncio.gather(east.start(), west.start())
        yield {"east": east, "west": west}
    finally:
        await asyncio.gather(east.close(), west.close(), return_exceptions=True)


async def _token(east: Cluster, tmp: Path) -> None:
    status, tok = await east.call("POST", "/v1/bootstrap-tokens", {"ttl": "5m"})
    assert status == 201
    path = tmp / "vm" / "bootstrap-token"
    path.parent.mkdir(exist_ok=True)
    path.write_text(tok["token"] + "\n")
    os.chmod(path, 0o600)


async def _workload(c: Cluster, wid: str) -> dict[str, Any] | None:
    status, w = await c.call("GET", f"/v1/workloads/{wid}")
    return w if status == 200 else None


async def test_documented_vm_config_registers_checked_workloads(
    tmp_path: Path, federation: dict[str, Cluster]
) -> None:
    east, west = federation["east"], federation["west"]
    backend = Backend("vm-17", VM)
    await backend.up()
    workloads = [
        {"id": "vm-17-web", "service": "web", "address": VM, "ports": {"http": backend.port},
         "check": {"http": f"http://{VM}:{backend.port}/healthz", "interval": "1s",
                   "timeout": "500ms"}},
        # the docs' form: no interval, no timeout (defaults)
        {"id": "vm-17-api", "service": "api", "address": VM, "ports": {"http": backend.port},
         "check": {"http": f"http://{VM}:{backend.port}/healthz"}},
    ]
    await _token(east, tmp_path)
    agent = Agent(vm_config(tmp_path, east.control_addr, workloads))  # type: ignore[attr-defined]
    agent.start()
    try:
        out = await agent.running()
        assert " running; " in out, out
        # registered at the control node with their checks, and passing
        for wid in ("vm-17-web", "vm-17-api"):
            w = await eventually(lambda wid=wid: _passing(east, wid), what=f"{wid} passing")
            assert w["check"]["http"].endswith("/healthz")
        assert (await _workload(east, "vm-17-web"))["check"]["interval"] == "1s"
        assert (await _workload(east, "vm-17-api"))["check"]["interval"] == "10s"

        # seen in west, and callable from west through its egress and east's ingress
        await eventually(lambda: _healthy_in(west, "web", "east", 1), what="west sees web")
        assert west.app is not None
        vip = west.app.holder.current.get(ServiceKey("web")).vip
        async with aiohttp.ClientSession() as http:
            async def called() -> str | None:
                try:
                    async with http.get(f"http://{vip}:{backend.port}/") as r:
                        return await r.text() if r.status == 200 else None
                except aiohttp.ClientError:
                    return None

            assert await eventually(called, what="web called from west") == "vm-17"

        # the backend stops: critical, with the check's output, in both clusters
        await backend.down()
        w = await eventually(lambda: _health(east, "vm-17-web", "critical"), what="critical")
        assert "vm-17-web" in w["id"] and w.get("health_output")
        await eventually(lambda: _healthy_in(west, "web", "east", 0), what="west sees 0")
        await backend.up()
        await eventually(lambda: _passing(east, "vm-17-web"), what="passing again")

        # the agent dies without a word: its workloads are held critical, probes or not
        agent.kill()
        w = await eventually(lambda: _health(east, "vm-17-web", "critical"), what="held")
        assert "agent" in w["health_output"] and "disconnected" in w["health_output"]
        _, status = await east.call("GET", "/v1/status")
        [vm] = [a for a in status["agents"] if a["node"] == "vm-17"]
        assert vm["state"] == "disconnected" and vm["workloads"] == 2
        # the console's topology lists them under the agent
        assert sorted((w["id"], w["health"]) for w in vm["registered"]) == [
            ("vm-17-api", "critical"), ("vm-17-web", "critical")
        ]

        # it comes back (its identity is on disk now): passing again, no action needed
        agent.start()
        assert " running; " in await agent.running()
        await eventually(lambda: _passing(east, "vm-17-web"), what="passing after restart")
        await eventually(lambda: _passing(east, "vm-17-api"), what="api passing after restart")

        # a clean stop: the agent leaves, and its workloads with it
        assert await agent.stop() == 0
        for wid in ("vm-17-web", "vm-17-api"):
            await eventually(lambda wid=wid: _gone(east, wid), what=f"{wid} left")
        await eventually(lambda: _not_in(west, "web"), what="west forgets web")
    finally:
        agent.kill()
        await backend.down()


async def test_agent_exits_non_zero_when_its_workloads_are_refused(
    tmp_path: Path, federation: dict[str, Cluster]
) -> None:
    east = federation["east"]
    await east.register("taken", "web")  # an operator's registration, not the agent's
    await _token(east, tmp_path)
    workloads = [{"id": "taken", "service": "web", "address": VM, "ports": {"http": 8080}}]
    agent = Agent(vm_config(tmp_path, east.control_addr, workloads))  # type: ignore[attr-defined]
    agent.start()
    try:
        out = await agent.running()
        code = await agent.stop()
        out += "".join(agent.output)
        assert code != 0, out
        assert "refused" in out and "taken" in out, out
        assert "Traceback" not in out, out
        w = await _workload(east, "taken")
        assert w is not None and w["address"] == EAST  # the operator's registration stands
    finally:
        agent.kill()


async def _passing(c: Cluster, wid: str) -> dict[str, Any] | None:
    return await _health(c, wid, "passing")


async def _health(c: Cluster, wid: str, health: str) -> dict[str, Any] | None:
    w = await _workload(c, wid)
    return w if w is not None and w["health"] == health else None


async def _gone(c: Cluster, wid: str) -> bool:
    return (await c.call("GET", f"/v1/workloads/{wid}"))[0] == 404


async def _healthy_in(c: Cluster, service: str, cluster: str, healthy: int) -> bool:
    status, svc = await c.call("GET", f"/v1/services/default/{service}")
    return status == 200 and svc["clusters"].get(cluster, {}).get("healthy") == healthy


async def _not_in(c: Cluster, service: str) -> bool:
    status, svc = await c.call("GET", f"/v1/services/default/{service}")
    return status == 404 or "east" not in svc["clusters"]


async def test_control_restart_agents_come_back_or_are_held_after_the_grace(
    tmp_path: Path, federation: dict[str, Cluster]
) -> None:
    east = federation["east"]
    backend = Backend("vm-17", VM)
    await backend.up()
    workloads = [{"id": "vm-17-web", "service": "web", "address": VM,
                  "ports": {"http": backend.port}}]
    await _token(east, tmp_path)
    agent = Agent(vm_config(tmp_path, east.control_addr, workloads))  # type: ignore[attr-defined]
    agent.start()
    try:
        assert " running; " in await agent.running()
        await eventually(lambda: _passing(east, "vm-17-web"), what="registered")
        # the control node restarts; the agent reconnects by itself and stays passing
        await east.stop()
        await east.start()
        await eventually(lambda: _connected(east, "vm-17"), what="agent reconnected")
        await asyncio.sleep(2.5)  # past the 2 s grace
        assert await _passing(east, "vm-17-web")
        # it restarts again while the agent is gone: held critical once the grace is over
        agent.kill()
        await east.stop()
        await east.start()
        assert await _passing(east, "vm-17-web")  # within the grace, as it was
        w = await eventually(lambda: _health(east, "vm-17-web", "critical"), what="held")
        assert "since the control node started" in w["health_output"]
    finally:
        agent.kill()
        await backend.down()


async def _connected(c: Cluster, node: str) -> bool:
    _, status = await c.call("GET", "/v1/status")
    return any(a["node"] == node and a["state"] == "connected" for a in status["agents"])


async def test_sighup_on_an_agent_reloads_what_it_can_and_keeps_running(
    tmp_path: Path, federation: dict[str, Cluster]
) -> None:
    """SIGHUP on a VM agent (a deployment changed its config): the log level and API tokens
    are applied, a change of its workloads is reported as needing a restart, and the agent
    keeps running with its workloads - no error, no half-applied config."""
    east = federation["east"]
    workloads = [{"id": "vm-17-web", "service": "web", "address": VM, "ports": {"http": 8080}}]
    await _token(east, tmp_path)
    config = vm_config(tmp_path, east.control_addr, workloads)  # type: ignore[attr-defined]
    agent = Agent(config)
    agent.start()
    try:
        assert " running; " in await agent.running()
        await eventually(lambda: _passing(east, "vm-17-web"), what="registered")
        raw = yaml.safe_load(config.read_text())
        raw["discovery"]["workloads"][0]["labels"] = {"version": "v2"}
        raw["log"] = {"level": "debug", "format": "json"}
        config.write_text(yaml.safe_dump(raw))
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> str | None:
            out = "".join(agent.output)
            return out if ("config reloaded" in out or "Traceback" in out) else None

        out = await eventually(reloaded, what="the agent's reload logged")
        assert "Traceback" not in out and "Error" not in out, out
        [line] = [ln for ln in out.splitlines() if "config reloaded" in ln]
        assert "discovery" in line and "needs_restart" in line, line
        assert agent.proc.poll() is None
        assert await _passing(east, "vm-17-web")
    finally:
        agent.kill()
