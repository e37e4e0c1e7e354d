"""The faults of the drills and the soak, each with its way back, and the checks they share.

Every operation is bounded in time and leaves the federation as `ensure_baseline` wants it
when it is undone: all machines up, all links up, every backend running, every appliance
active, the baseline weights, peers connected, every service served through the VM.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from federation.trust.pemfiles import load_certs
from tests.testbed import EDGE_PUBLIC, VM_PRIVATE, Leg, Node, NodeSpec

from .deploy import (
    BACKENDS,
    INGRESS_PORT,
    TRUST_DOMAIN,
    VIP_CIDR,
    Appliance,
    Deployment,
    vm_workloads,
    wait_until,
)

BASELINE_WEIGHTS = {"east": 20, "west": 80}
# Healthy endpoints per (service, cluster) in the baseline, as east sees them.
EXPECTED_HEALTHY = {("reviews", "east"): 1, ("reviews", "west"): 2, ("ratings", "west"): 1,
                    ("web", "east"): 1}
WEST_REVIEWS = ("reviews-west-1", "reviews-west-2")
HERE = Path(__file__).parent
INTRUDER = "intruder"
INTRUDER_ADDRESS = "198.51.100.66"


# --- observation ----------------------------------------------------------------------------------


def peer_state(dep: Deployment, observer: str, peer: str) -> str | None:
    return dep.peers(observer).get(peer, {}).get("state")


def status_text(app: Appliance) -> str:
    """`isthmus status` on the node, as an operator reads it."""
    return app.cli("status", check=False, timeout=30)


def status_peer_line(app: Appliance, peer: str) -> str:
    """The PEER table's line for `peer` in `isthmus status`, or ''."""
    for line in status_text(app).splitlines():
        if line.split()[:1] == [peer] and any(
                s in line.split() for s in ("connected", "stale", "unreachable")):
            return line
    return ""


def healthy_count(dep: Deployment, observer: str, service: str, cluster: str) -> int | None:
    status, body = dep.edges[observer].api("GET", f"/v1/services/default/{service}", timeout=5)
    if status != 200 or not isinstance(body, dict):
        return None
    return int(body.get("clusters", {}).get(cluster, {}).get("healthy", 0))


def identity_chain(app: Appliance) -> list[x509.Certificate]:
    """The node's identity (leaf, its CA) as written on disk."""
    return load_certs(app.data_dir / "pki" / "node.pem")


def identity_serial(app: Appliance) -> int:
    return identity_chain(app)[0].serial_number


def handshake_failures(dep: Deployment) -> dict[str, float]:
    """Refused TLS handshakes counted by each appliance."""
    return {name: app.metric_sum("isthmus_tls_handshake_failures_total")
            for name, app in dep.appliances.items()}


def log_count(app: Appliance, event_prefix: str, since: float) -> int:
    return sum(1 for ev in app.log_events(since)
               if str(ev.get("event", "")).startswith(event_prefix))


# --- baseline -------------------------------------------------------------------------------------


def ensure_baseline(dep: Deployment, timeout: float = 120.0) -> None:
    """Put back whatever an earlier drill or a failure left changed."""
    tb = dep.testbed
    for name in ("east-edge", "west-edge", "east-service", "west-service", "east-vm"):
        m = tb[name]
        if not m.is_running():
            m.boot()
        for seg in ("public", m.spec.cluster):
            if m.spec.has_leg(seg) and m.link_state(seg)["switch"] != "UP":
                m.link_up(seg)
    for app in dep.appliances.values():
        if app.active() != "active":
            app.systemctl("start", "isthmus.service", check=False)
    for key in BACKENDS:
        b = dep.backends.get(key)
        if b is None or not b.active():
            dep.start_backend(key)
    if dep.vm_extra:
        set_vm_workloads(dep, 0)
    for app in dep.appliances.values():
        app.wait_healthy(timeout)
    dep.wait_peers("connected", timeout)
    current = dep.edges["east"].api("GET", "/v1/services/default/reviews/traffic")[1]
    if not isinstance(current, dict) or current.get("weights") != BASELINE_WEIGHTS:
        dep.set_weights("reviews", BASELINE_WEIGHTS)
    wait_until(lambda: all(
        (dep.edges[c].api("GET", "/v1/services/default/reviews/traffic")[1] or {}).get(
            "weights") == BASELINE_WEIGHTS for c in ("east", "west")),
        timeout, "baseline weights on both clusters")
    for (service, cluster), n in EXPECTED_HEALTHY.items():
        wait_until(lambda s=service, c=cluster, n=n: healthy_count(dep, "east", s, c) == n,
                   timeout, f"{n} {service} healthy in {cluster}")
    dep.wait_served(timeout)


# --- backends -------------------------------------------------------------------------------------


def kill_backends(dep: Deployment, keys: Sequence[str] = WEST_REVIEWS) -> float:
    """SIGKILL the backends (no goodbye, listeners gone); the time of the kill."""
    t = time.time()
    for key in keys:
        dep.backends[key].kill()
    return t


def restore_backends(dep: Deployment, keys: Sequence[str] = WEST_REVIEWS) -> None:
    for key in keys:
        dep.start_backend(key)


# --- machines and links ---------------------------------------------------------------------------


def edge_off(dep: Deployment, cluster: str = "west", how: str = "kill") -> float:
    """Stop a cluster's edge machine: "kill" (SIGKILL to its PID 1, a power cut) or
    "poweroff" (a clean shutdown)."""
    m = dep.edges[cluster].machine
    t = time.time()
    m.kill() if how == "kill" else m.poweroff()
    return t


def edge_on(dep: Deployment, cluster: str = "west", timeout: float = 120.0) -> float:
    """Boot the edge again; nothing else is done: its appliance starts from its own unit.
    Returns when the appliance answers its health check."""
    app = dep.edges[cluster]
    t = time.time()
    app.machine.boot(timeout)
    app.wait_healthy(timeout)
    return t


def cut(dep: Deployment, cluster: str = "west") -> float:
    """Pull the edge's public cable (the bridge port goes down; addresses and routes stay)."""
    t = time.time()
    dep.edges[cluster].machine.link_down("public")
    return t


def heal(dep: Deployment, cluster: str = "west") -> float:
    t = time.time()
    dep.edges[cluster].machine.link_up("public")
    return t


# --- the control node -----------------------------------------------------------------------------


def crash(app: Appliance, snapshot: Path | None = None) -> float:
    """SIGKILL the appliance; with `snapshot`, copy its data_dir before systemd restarts it
    (RestartSec=2): the state a crash left on disk."""
    pid = app.main_pid()
    t = time.time()
    app.sigkill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and app.machine.run(
            ["test", "-e", f"/proc/{pid}"], check=False).returncode == 0:
        time.sleep(0.02)
    if snapshot is not None:
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
        for f in app.data_dir.iterdir():
            if f.is_file() and f.name.startswith(("catalog.db", "federation.db")):
                shutil.copy2(f, snapshot / f.name)
    return t


def read_snapshot(snapshot: Path, cluster: str) -> tuple[set[str], dict[str, Any]]:
    """Workload ids and traffic policies in a copied data_dir, read by the product's own stores
    (what the appliance itself reads at start)."""
    from discovery.embedded import EmbeddedCatalog
    from federation.hlc import HybridClock
    from federation.policy import PolicyStore

    async def read() -> tuple[set[str], dict[str, Any]]:
        catalog = EmbeddedCatalog(snapshot, cluster, VIP_CIDR)
        await catalog.open()
        try:
            ids = {st.workload.id for st in catalog.workloads()}
        finally:
            await catalog.close()
        store = PolicyStore(snapshot, HybridClock(cluster))
        await store.open()
        try:
            policies = {str(p.service): p for p in store.all()}
        finally:
            await store.close()
        return ids, policies

    return asyncio.run(read())


def set_vm_workloads(dep: Deployment, extra: int) -> None:
    """The agent's config with `extra` more workloads, applied by SIGHUP (no restart)."""
    dep.set_vm_config_workloads(vm_workloads(extra))
    dep.vm.sighup()
    dep.vm_extra = extra


def agent_registrations(dep: Deployment) -> dict[str, str]:
    """What the agent says of each of its workloads: registered, pending or refused."""
    status, body = dep.vm.api("GET", "/v1/workloads", timeout=5)
    if status != 200 or not isinstance(body, list):
        return {}
    return {w["id"]: w.get("registration", "") for w in body}


@dataclass
class PolicyWriter:
    """writer.py on east-edge's network: a stream of traffic-policy writes."""

    dep: Deployment
    out: Path
    via: str = "east"
    interval: float = 0.1
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PolicyWriter:
        app = self.dep.edges[self.via]
        token = app.machine.etc_upper / "isthmus" / "api-token"
        self.proc = app.machine.net_popen(
            [sys.executable, str(HERE / "writer.py"), "--api", "http://127.0.0.1:15000",
             "--token-file", str(token), "--out", str(self.out), "--interval",
             str(self.interval), "--duration", "300"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def writes(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in self.out.read_text().splitlines()
                    if line.strip()]
        except FileNotFoundError:
            return []


# --- identities -----------------------------------------------------------------------------------


def reload_all(dep: Deployment, timeout: float = 60.0) -> dict[str, int]:
    """SIGHUP the control nodes, then the agent (its renewal writes its control node's
    bundle, so the control node goes first); returns when every node wrote a new identity."""
    before = {n: identity_serial(a) for n, a in dep.appliances.items()}
    for group in ((dep.east, dep.west), (dep.vm,)):
        for app in group:
            app.sighup()
        for app in group:
            wait_until(lambda a=app: identity_serial(a) != before[a.name], timeout,
                       f"{app.name} renewed its identity after SIGHUP")
    time.sleep(0.5)  # the file is written just before the new identity is swapped in
    return {n: identity_serial(a) for n, a in dep.appliances.items()}


# --- hostile hosts --------------------------------------------------------------------------------


def intruder(dep: Deployment) -> Node:
    tb = dep.testbed
    if INTRUDER not in tb.nodes:
        tb.add_node(NodeSpec(INTRUDER, (Leg("public", INTRUDER_ADDRESS, "pub0"),), boot=False,
                             role="hostile"))
    return tb[INTRUDER]


def hostile(node: Node, mode: str, target: str, *args: str, timeout: float = 120.0
            ) -> dict[str, Any]:
    proc = node.net_run([sys.executable, str(HERE / "hostile.py"), mode, "--target", target,
                         *args], timeout=timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ingress(cluster: str) -> str:
    return f"{EDGE_PUBLIC[cluster]}:{INGRESS_PORT}"


def federation_sni(cluster: str) -> str:
    return f"federation.{cluster}.{TRUST_DOMAIN}"


def service_sni(cluster: str, service: str = "reviews", port: str = "http") -> str:
    return f"{port}.{service}.default.{cluster}.{TRUST_DOMAIN}"


def flood(dep: Deployment, node: Node, target: str, count: int = 2000, hold: float = 8.0
          ) -> dict[str, Any]:
    """Plaintext, TLS garbage and `count` silent connections at `target`, then `count`
    connections whose handshake never completes (the intruder drops the SYN-ACKs)."""
    out: dict[str, Any] = {}
    out["plaintext"] = hostile(node, "plaintext", target, "--hold", "5")
    out["garbage"] = hostile(node, "garbage", target, "--count", "200")
    out["silent"] = hostile(node, "silent", target, "--count", str(count), "--hold", str(hold))
    host, _, port = target.rpartition(":")
    rules = ("table ip isthmus_e2e_syn {\n chain input {\n"
             "  type filter hook input priority filter; policy accept;\n"
             f"  ip saddr {host} tcp sport {port} tcp flags & (syn|ack) == (syn|ack) drop\n"
             " }\n}\n")
    node.net_run(["nft", "-f", "-"], input=rules)
    try:
        out["syn"] = hostile(node, "syn", target, "--count", str(count), "--hold", str(hold))
    finally:
        node.net_run(["nft", "delete", "table", "ip", "isthmus_e2e_syn"], check=False)
    return out


# --- DNS ------------------------------------------------------------------------------------------


def dns_storm(dep: Deployment, seconds: float = 15.0, qps: int = 2000) -> subprocess.Popen[str]:
    """dnsstorm.py at the VM's resolver from east-service (the VM's own network); the caller
    waits for it."""
    return dep.testbed["east-service"].net_popen(
        [sys.executable, str(HERE / "dnsstorm.py"), "--target", VM_PRIVATE, "--seconds",
         str(seconds), "--qps", str(qps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
