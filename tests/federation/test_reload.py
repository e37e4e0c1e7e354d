"""SIGHUP (`Appliance.reload`) on a control node and on a VM agent: the agent's workloads
follow its config file over the control channel, and trust is reloaded - the bundle, the
cluster CA re-issued under a new root, and a fresh identity (the rotation steps of
docs/operations.md without a restart)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from federation.trust import TrustBundle, create_cluster_ca, create_root
from federation.trust.pemfiles import load_certs, write_bundle, write_certs, write_key
from isthmus import config as configmod
from isthmus.appliance import Appliance

from .conftest import TD, Cluster, eventually, free_port, make_pki

pytestmark = pytest.mark.timeout(90)

HOST = "127.66.0.1"
VM = "127.66.0.9"


def write_config(path: Path, raw: dict[str, Any]) -> Appliance:
    path.write_text(yaml.safe_dump(raw))
    return Appliance(configmod.load(path), str(path))


def vm_workload(wid: str, port: int) -> dict[str, Any]:
    return {"id": wid, "service": wid.split("-")[-1], "address": VM, "ports": {"http": port}}


def agent_raw(tmp: Path, control: Cluster, control_port: int, token: str,
              workloads: list[dict[str, Any]]) -> dict[str, Any]:
    d = tmp / "vm"
    d.mkdir(exist_ok=True)
    if not (d / "bundle.pem").exists():
        shutil.copy(control.dir / "pki" / "bundle.pem", d / "bundle.pem")
    (d / "token").write_text(token + "\n")
    return {
        "cluster": "east", "trust_domain": TD, "node": "vm-1", "roles": ["agent"],
        "data_dir": str(d / "data"),
        "trust": {"bundle": str(d / "bundle.pem"), "cert": str(d / "agent.pem"),
                  "key": str(d / "agent.key"), "ca_cert": str(d / "none.pem"),
                  "ca_key": str(d / "none.key")},
        "agent": {"control": f"{HOST}:{control_port}",
                  "bootstrap_token_file": str(d / "token")},
        "dns": {"listen": f"{VM}:{free_port(VM)}"},
        "api": {"listen": f"{VM}:{free_port(VM)}", "token_file": str(d / "api-token")},
        "metrics": {"enabled": False},
        "egress": {"vip_cidr": "127.247.0.0/24"},
        "discovery": {"workloads": workloads},
    }


class Control:
    """A control node started from a config file, so that reload() re-reads it."""

    def __init__(self, tmp: Path) -> None:
        make_pki(tmp, ["east"])
        self.cluster = Cluster("east", tmp, HOST, "us", vip_cidr="127.247.0.0/24")
        self.control_port = free_port(HOST)
        self.path = tmp / "east.yaml"

    async def start(self) -> None:
        raw = self.cluster.config()
        raw["control"] = {"listen": f"{HOST}:{self.control_port}"}
        self.cluster.app = write_config(self.path, raw)
        await self.cluster.app.start()
        import aiohttp

        self.cluster.http = aiohttp.ClientSession()

    @property
    def app(self) -> Appliance:
        assert self.cluster.app is not None
        return self.cluster.app

    async def close(self) -> None:
        await self.cluster.close()


@pytest.fixture
async def control(tmp_path: Path):
    c = Control(tmp_path)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


async def start_agent(tmp: Path, c: Control, workloads: list[dict[str, Any]]
                      ) -> tuple[Appliance, Path]:
    status, tok = await c.cluster.call("POST", "/v1/bootstrap-tokens", {"ttl": "5m"})
    assert status == 201
    path = tmp / "vm.yaml"
    agent = write_config(path, agent_raw(tmp, c.cluster, c.control_port, tok["token"],
                                         workloads))
    await agent.start()
    return agent, path


async def test_agent_reload_registers_and_drops_workloads(tmp_path: Path,
                                                          control: Control) -> None:
    port = free_port(VM)
    agent, path = await start_agent(tmp_path, control, [vm_workload("vm-1-web", port)])
    try:
        async def owned(wid: str) -> bool:
            s, _ = await control.cluster.call("GET", f"/v1/workloads/{wid}")
            return s == 200

        await eventually(lambda: owned("vm-1-web"), what="vm-1-web registered")
        raw = yaml.safe_load(path.read_text())
        raw["discovery"]["workloads"] = [vm_workload("vm-1-web", port),
                                         vm_workload("vm-1-api", port)]
        path.write_text(yaml.safe_dump(raw))
        assert await agent.reload() is True
        await eventually(lambda: owned("vm-1-api"), what="vm-1-api registered after SIGHUP")
        assert agent.agent_link is not None
        assert agent.agent_link.registrations["vm-1-api"].state == "registered"

        raw["discovery"]["workloads"] = [vm_workload("vm-1-api", port)]
        path.write_text(yaml.safe_dump(raw))
        assert await agent.reload() is True

        async def dropped() -> bool:
            return not await owned("vm-1-web")

        await eventually(dropped, what="vm-1-web deregistered after SIGHUP")
        assert await owned("vm-1-api")
        assert set(agent.agent_link.registrations) == {"vm-1-api"}
    finally:
        await agent.stop()


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    try:
        pub.verify(cert.signature, cert.tbs_certificate_bytes,
                   ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:
        return False
    return True


async def test_reload_rotates_leaves_and_picks_up_a_cluster_ca_under_a_new_root(
    tmp_path: Path, control: Control,
) -> None:
    agent, _ = await start_agent(tmp_path, control, [])
    try:
        assert agent.trust is not None and control.app.trust is not None
        gw, vm = control.app.trust.credentials, agent.trust.credentials
        old_gw, old_vm = gw.identity.serial, vm.identity.serial

        # A leaf rotation on demand: SIGHUP renews the identity, on a gateway and on an agent.
        assert await control.app.reload() is True
        assert gw.identity.serial != old_gw
        assert await agent.reload() is True
        assert vm.identity.serial != old_vm

        # A root rotation: the bundle with both roots, then the cluster CA under the new root.
        pki = control.cluster.dir / "pki"
        old_root = load_certs(pki / "bundle.pem")[0]
        new_root = create_root(TD)
        both = TrustBundle.of([new_root.cert, old_root])
        write_bundle(pki / "bundle.pem", both)
        write_bundle(tmp_path / "vm" / "bundle.pem", both)
        new_ca = create_cluster_ca(new_root, "east")
        write_key(pki / "ca.key", new_ca.key, force=True)
        write_certs(pki / "ca.pem", [new_ca.cert], force=True)

        assert await control.app.reload() is True
        assert len(gw.bundle.roots) == 2
        assert signed_by(gw.identity.cert, new_ca.cert)  # re-issued under the new CA
        assert await agent.reload() is True
        assert len(vm.bundle.roots) == 2
        # renewed from the control node, whose issuer now signs with the new CA
        assert signed_by(vm.identity.cert, new_ca.cert)

        # Retire the old root: the agent's channel and the node's listeners keep working.
        only_new = TrustBundle.of([new_root.cert])
        write_bundle(pki / "bundle.pem", only_new)
        write_bundle(tmp_path / "vm" / "bundle.pem", only_new)
        assert await control.app.reload() is True
        assert await agent.reload() is True
        assert len(gw.bundle.roots) == 1 and len(vm.bundle.roots) == 1
        assert signed_by(vm.identity.cert, new_ca.cert)
    finally:
        await agent.stop()
