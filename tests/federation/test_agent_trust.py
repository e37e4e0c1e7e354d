"""Who may mint an identity and who owns a workload, on a real control node: its API, its
control listener (mTLS, identities from the cluster's own CA) and the agent channel.

The attacks: a default bootstrap token minted the control node's own gateway identity; a
gateway identity named like an agent deregistered the agent's workloads; two agents racing
for the same new workload ids both got OK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from discovery.schema import parse_workload
from federation.agentlink import ROUTE
from federation.trust import TlsCredentials, issue_identity
from federation.trust.ca import Identity, generate_key
from federation.trust.errors import IssuanceError
from federation.trust.issuance import request_identity
from federation.trust.pemfiles import load_bundle, load_ca

from .conftest import TD, Cluster, free_port, make_pki

pytestmark = pytest.mark.timeout(90)

HOST = "127.66.0.1"


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Cluster]:
    make_pki(tmp_path, ["east"])
    c = Cluster("east", tmp_path, HOST, "us", vip_cidr="127.247.0.0/24")
    c.control_port = free_port(c.host)  # type: ignore[attr-defined]
    cfg = c.config

    def with_control() -> dict[str, Any]:
        raw = cfg()
        raw["control"] = {"listen": f"{c.host}:{c.control_port}"}  # type: ignore[attr-defined]
        return raw

    c.config = with_control  # type: ignore[method-assign]
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def _pki(control: Cluster) -> Path:
    return control.dir / "pki"


def _identity(control: Cluster, kind: str, node: str) -> Identity:
    """An identity signed by the cluster's CA (as `isthmus ca issue` would make it)."""
    return issue_identity(load_ca(_pki(control) / "ca.pem", _pki(control) / "ca.key"), kind, node)  # type: ignore[arg-type]


async def _mint(control: Cluster, node: str, kind: str, token: str):  # type: ignore[no-untyped-def]
    return await request_identity(
        f"{control.host}:{control.control_port}",  # type: ignore[attr-defined]
        node,
        kind,
        generate_key(),
        bundle=load_bundle(_pki(control) / "bundle.pem"),
        bootstrap_token=token,
        trust_domain=TD,
        cluster="east",
    )


class Channel:
    """The agent channel, spoken by hand with a given identity."""

    def __init__(self, control: Cluster, identity: Identity) -> None:
        self.url = f"https://{control.host}:{control.control_port}{ROUTE}"  # type: ignore[attr-defined]
        self.credentials = TlsCredentials(identity, load_bundle(_pki(control) / "bundle.pem"))
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def __aenter__(self) -> Channel:
        connector = aiohttp.TCPConnector(ssl=self.credentials.client_context())
        self.session = aiohttp.ClientSession(connector=connector)
        self.ws = await self.session.ws_connect(self.url, max_msg_size=64 * 1024 * 1024)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None and self.ws is not None
        await self.ws.close()
        await self.session.close()

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(msg))

    async def ack(self) -> dict[str, Any]:
        """The next acknowledgement (routing-table pushes are skipped)."""
        assert self.ws is not None
        async with asyncio.timeout(30):
            while True:
                msg = await self.ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                data = json.loads(msg.data)
                if data.get("type") == "ack":
                    return data

    async def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        await self.send(msg)
        return await self.ack()


def _register(wid: str, address: str = "10.1.0.1") -> dict[str, Any]:
    body = {"service": "web", "address": address, "ports": {"http": 8080}}
    return {"type": "register", "id": wid, "workload": body}


AGENT_VM1 = f"spiffe://{TD}/cluster/east/agent/vm-1"


# --- minting ------------------------------------------------------------------------------------


async def test_a_default_token_cannot_mint_a_gateway_identity(control: Cluster) -> None:
    status, tok = await control.call("POST", "/v1/bootstrap-tokens", {"ttl": "5m"})
    assert status == 201
    # the control node's own gateway identity: a peer would serve it the full export feed
    with pytest.raises(IssuanceError) as info:
        await _mint(control, "east-gw", "gateway", tok["token"])
    assert info.value.status == 403
    with pytest.raises(IssuanceError) as info:
        await _mint(control, "east-gw-2", "gateway", tok["token"])
    assert info.value.status == 403
    # the token was not spent: the agent it was made for still bootstraps with it
    issued = await _mint(control, "vm-1", "agent", tok["token"])
    assert str(issued.identity.spiffe_id) == AGENT_VM1


async def test_token_body_binds_kind_and_node(control: Cluster) -> None:
    for body, field in [
        ({"kind": "admin"}, "kind"),
        ({"kind": "gateway"}, "node"),  # a gateway token names its gateway
        ({"node": "VM_1"}, "node"),
        ({"node": "vm-1\n"}, "node"),
        ({"ttl": "1h", "role": "x"}, "role"),
        ({"ttl": "99999999999999d"}, "ttl"),  # past any timedelta: 422, not 500
        ({"ttl": "9" * 400 + "s"}, "ttl"),
    ]:
        status, out = await control.call("POST", "/v1/bootstrap-tokens", body)
        assert status == 422 and out["field"] == field, (body, out)
    status, out = await control.call(
        "POST", "/v1/bootstrap-tokens", {"ttl": "1h", "kind": "gateway", "node": "east-gw-2"}
    )
    assert status == 201 and out["kind"] == "gateway" and out["node"] == "east-gw-2"
    with pytest.raises(IssuanceError) as info:
        await _mint(control, "east-gw-3", "gateway", out["token"])
    assert info.value.status == 403
    issued = await _mint(control, "east-gw-2", "gateway", out["token"])
    assert str(issued.identity.spiffe_id) == f"spiffe://{TD}/cluster/east/gateway/east-gw-2"
    # the control node's own name is live, whatever the token says
    status, out = await control.call(
        "POST", "/v1/bootstrap-tokens", {"kind": "gateway", "node": "east-gw"}
    )
    assert status == 201
    with pytest.raises(IssuanceError) as info:
        await _mint(control, "east-gw", "gateway", out["token"])
    assert info.value.status == 409


async def test_a_connected_agents_identity_is_not_minted_again(control: Cluster) -> None:
    status, out = await control.call("POST", "/v1/bootstrap-tokens", {"node": "vm-1"})
    assert status == 201
    async with Channel(control, _identity(control, "agent", "vm-1")) as vm1:
        assert (await vm1.call(_register("vm-1-web")))["ok"]
        with pytest.raises(IssuanceError) as info:
            await _mint(control, "vm-1", "agent", out["token"])
        assert info.value.status == 409 and "connected" in str(info.value)

    async def minted() -> bool:  # the channel closes on the control node a moment later
        try:
            await _mint(control, "vm-1", "agent", out["token"])
        except IssuanceError as e:
            assert e.status == 409, e
            await asyncio.sleep(0.1)
            return False
        return True

    async with asyncio.timeout(20):
        while not await minted():
            pass


# --- ownership -------------------------------------------------------------------------------


async def test_a_gateway_named_like_an_agent_cannot_touch_its_workloads(control: Cluster) -> None:
    async with Channel(control, _identity(control, "agent", "vm-1")) as vm1:
        assert (await vm1.call(_register("vm-1-web", "10.1.0.1")))["ok"]
    async with Channel(control, _identity(control, "gateway", "vm-1")) as imposter:
        ack = await imposter.call({"type": "deregister", "id": "vm-1-web"})
        assert not ack["ok"] and AGENT_VM1 in ack["error"], ack
        ack = await imposter.call(_register("vm-1-web", "10.6.6.6"))
        assert not ack["ok"] and AGENT_VM1 in ack["error"], ack
    status, w = await control.call("GET", "/v1/workloads/vm-1-web")
    assert status == 200 and w["address"] == "10.1.0.1"
    async with Channel(control, _identity(control, "agent", "vm-1")) as vm1:
        assert (await vm1.call({"type": "deregister", "id": "vm-1-web"}))["ok"]
    status, _ = await control.call("GET", "/v1/workloads/vm-1-web")
    assert status == 404


async def test_records_of_the_old_agent_form_stay_the_agents(control: Cluster) -> None:
    assert control.app is not None and control.app.catalog is not None
    body = {"service": "web", "address": "10.1.0.1", "ports": {"http": 8080}}
    # what an older control node stored for agent vm-1
    await control.app.catalog.put(parse_workload(body, "old-web", "east", "agent:vm-1"))
    async with Channel(control, _identity(control, "gateway", "vm-1")) as imposter:
        ack = await imposter.call({"type": "deregister", "id": "old-web"})
        assert not ack["ok"] and "agent:vm-1" in ack["error"]
    async with Channel(control, _identity(control, "agent", "vm-1")) as vm1:
        assert (await vm1.call(_register("old-web", "10.1.0.2")))["ok"]
    assert control.app.catalog.get("old-web").workload.source == AGENT_VM1


async def test_the_api_does_not_take_over_an_agents_workload(control: Cluster) -> None:
    async with Channel(control, _identity(control, "agent", "vm-1")) as vm1:
        assert (await vm1.call(_register("vm-1-web", "10.1.0.1")))["ok"]
    body = {"service": "web", "address": "10.6.6.6", "ports": {"http": 1}}
    status, out = await control.call("PUT", "/v1/workloads/vm-1-web", body)
    assert status == 409 and AGENT_VM1 in out["error"], out
    status, w = await control.call("GET", "/v1/workloads/vm-1-web")
    assert w["address"] == "10.1.0.1"
    # an operator may still remove it (a decommissioned VM), and then register it
    status, _ = await control.call("DELETE", "/v1/workloads/vm-1-web")
    assert status == 204
    await control.register("vm-1-web", "web")


async def test_two_agents_racing_for_new_ids_get_one_owner_each(control: Cluster) -> None:
    ids = [f"race-{i}" for i in range(200)]
    agents = {
        f"spiffe://{TD}/cluster/east/agent/{n}": _identity(control, "agent", n)
        for n in ("vm-1", "vm-2")
    }
    acks: dict[str, dict[str, dict[str, Any]]] = {}

    async def agent(sid: str, identity: Identity) -> None:
        async with Channel(control, identity) as ch:
            for wid in ids:  # pipelined: the control node works on both channels at once
                await ch.send(_register(wid))
            got = [await ch.ack() for _ in ids]
        acks[sid] = {a["id"]: a for a in got}

    await asyncio.gather(*(agent(s, i) for s, i in agents.items()))
    assert control.app is not None and control.app.catalog is not None
    winners: dict[str, int] = dict.fromkeys(agents, 0)
    for wid in ids:
        ok = [sid for sid in agents if acks[sid][wid]["ok"]]
        assert len(ok) == 1, f"{wid}: OK to {ok}"
        (owner,) = ok
        loser = next(s for s in agents if s != owner)
        assert f"belongs to {owner}" in acks[loser][wid]["error"]
        assert control.app.catalog.get(wid).workload.source == owner
        winners[owner] += 1
    assert sum(winners.values()) == len(ids)


async def test_cli_token_create_binds_kind_and_node(
    control: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from isthmus.cli import main

    api = ["--api", f"http://{control.api_listen}", "--token-file", str(control.dir / "api-token")]
    argv = ["token", "create", "--ttl", "5m", "--kind", "gateway", "--node", "east-gw-2", *api]
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert "gateway, node east-gw-2" in out.err
    with pytest.raises(IssuanceError) as info:
        await _mint(control, "east-gw-2", "agent", token)
    assert info.value.status == 403
    issued = await _mint(control, "east-gw-2", "gateway", token)
    assert issued.identity.spiffe_id.node == "east-gw-2"
    # a gateway token without a node is refused, with one line on stderr
    argv = ["token", "create", "--kind", "gateway", *api]
    assert await asyncio.to_thread(main, argv) == 1
    assert "node" in capsys.readouterr().err


async def test_a_corrupt_token_file_is_503_not_a_ttl_error(control: Cluster) -> None:
    path = control.dir / "data" / "bootstrap-tokens.json"
    path.write_text("{nope")
    status, out = await control.call("POST", "/v1/bootstrap-tokens", {"ttl": "5m"})
    assert status == 503 and "bootstrap-tokens.json" in out["error"] and "field" not in out
    path.unlink()
    status, _ = await control.call("POST", "/v1/bootstrap-tokens", {"ttl": "5m"})
    assert status == 201
