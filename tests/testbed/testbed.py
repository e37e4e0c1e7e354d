"""The builder: `Testbed.up()` makes the small internet of booted machines, `down()` removes
every trace of it. See README.md beside this file for what it builds and how to use it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import cgroups, prereqs, provision, runs
from .commands import DEFAULT_TIMEOUT, ip, run
from .errors import BootError, TeardownError, TestbedError
from .nodes import Machine, Node, SystemState
from .topology import Leg, NodeSpec, Segment, Topology, internet


class Testbed:
    """A built testbed. Nodes by name: `tb["east-edge"]`; `tb.machines`, `tb.controller`.

    Files for tests and Ansible (all under `tb.dir`, the run's directory, 0700):
    `ssh_config` (one Host per machine, by node name), `known_hosts`, `private_key`
    (ed25519, made for this run), `inventory` (YAML: one group per cluster).
    """

    __test__ = False

    def __init__(self, run_id: str, topology: Topology, owner: dict[str, int] | None):
        self.run_id = run_id
        self.topology = topology
        self.owner = owner
        self.dir = runs.run_dir(run_id)
        self.ssh_dir = self.dir / "ssh"
        self.private_key = self.ssh_dir / "id_ed25519"
        self.ssh_config = self.ssh_dir / "config"
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.inventory = self.dir / "inventory.yml"
        self.nodes: dict[str, Node] = {}
        for spec in topology.nodes:
            self.nodes[spec.name] = Machine(self, spec) if spec.boot else Node(self, spec)
        self.timings: dict[str, float] = {}
        self.boot_states: dict[str, SystemState] = {}
        self._down = False

    # --- access ------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:  # Machine or Node; Any keeps call sites short
        try:
            return self.nodes[name]
        except KeyError:
            raise TestbedError(f"testbed {self.run_id} has no node {name!r} "
                               f"(it has {', '.join(self.nodes)})") from None

    @property
    def machines(self) -> dict[str, Machine]:
        return {n: m for n, m in self.nodes.items() if isinstance(m, Machine)}

    @property
    def controller(self) -> Node:
        return self["controller"]

    def cluster(self, name: str) -> dict[str, Machine]:
        """The machines of a cluster by role: {"edge": ..., "service": ..., "vm": ...}."""
        return {m.spec.role or m.name: m for m in self.machines.values()
                if m.spec.cluster == name}

    def segment_netns(self, segment: str) -> str:
        return runs.segment_netns(self.run_id, segment)

    def ssh_argv(self, machine: str, argv: Sequence[str] | str = ()) -> list[str]:
        """The command line that runs argv on `machine` over SSH from the controller."""
        remote = [argv] if isinstance(argv, str) else list(argv)
        return self.controller.argv(["ssh", "-F", str(self.ssh_config), machine, "--", *remote])

    def ssh(self, machine: str, argv: Sequence[str] | str, *, input: str | None = None,
            timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command on `machine` over real SSH from the controller namespace."""
        return run(self.ssh_argv(machine, argv), where=f"ssh {machine}", input=input,
                   timeout=timeout, check=check)

    def ansible_env(self) -> dict[str, str]:
        """Environment for ansible-playbook run in the controller: the inventory and the
        run's SSH settings (ansible's own ControlPersist sockets go under the run dir)."""
        return {
            **os.environ,
            "ANSIBLE_INVENTORY": str(self.inventory),
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.dir / "ansible-cp"),
        }

    # --- build -------------------------------------------------------------------------------

    @classmethod
    def up(cls, topology: Topology | None = None, *, detached: bool = False,
           boot_timeout: float = 90.0) -> Testbed:
        """Build a testbed: first remove what killed runs left, then segments, nodes, machines
        (booted in parallel), SSH access and the inventory. On any failure, Ctrl-C included,
        whatever was built is torn down before the exception goes on.

        detached=True (the command line's `up`) records no owner process: the testbed stays
        after this process exits, until `down`, and the next `up` replaces it.
        """
        prereqs.require()
        topology = topology or internet()
        topology.validate()
        t0 = time.monotonic()
        runs.cleanup_leftovers()
        run_id = runs.new_run_id()
        while runs.read_state(run_id) or runs.run_dir(run_id).exists():
            run_id = runs.new_run_id()
        tb = cls(run_id, topology, None if detached else runs.this_process_as_owner())
        tb.timings["cleanup"] = time.monotonic() - t0
        try:
            tb._save("building")  # first, so a run killed from here on is found and removed
            tb._build(boot_timeout)
            tb._save("ready")
        except BaseException:
            with contextlib.suppress(Exception):
                tb.down()
            raise
        tb.timings["up"] = time.monotonic() - t0
        return tb

    def _build(self, boot_timeout: float) -> None:
        t = time.monotonic()
        self.dir.mkdir(mode=0o700, parents=True)
        self.ssh_dir.mkdir(mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"isthmus-testbed-{self.run_id}",
             "-f", str(self.private_key)], timeout=15)
        public_key = self.private_key.with_suffix(".pub").read_text()
        for seg in self.topology.segments:
            self._make_segment(seg)
        for node in self.nodes.values():
            self._make_node(node)
        self.timings["network"] = time.monotonic() - t

        t = time.monotonic()
        for m in self.machines.values():
            provision.write_etc(m.etc_upper, m.spec, public_key)
        self._write_access_files()
        self.timings["provision"] = time.monotonic() - t

        t = time.monotonic()
        for m in self.machines.values():
            m.start()
        pool = ThreadPoolExecutor(max_workers=max(1, len(self.machines)))
        try:
            futures = {n: pool.submit(m.wait_running, boot_timeout)
                       for n, m in self.machines.items()}
            self.boot_states = {n: f.result() for n, f in futures.items()}
        finally:
            # On Ctrl-C do not wait for the others' boots: teardown kills them (and the
            # waiting systemctl calls, which run inside the machines) at once.
            pool.shutdown(wait=False, cancel_futures=True)
        self.timings["boot"] = time.monotonic() - t

    def _make_segment(self, seg: Segment) -> None:
        ns = self.segment_netns(seg.name)
        run(["ip", "netns", "add", ns], timeout=10)
        ip("link", "set", "lo", "up", netns=ns)
        ip("link", "add", "br0", "type", "bridge", netns=ns)
        ip("link", "set", "br0", "up", netns=ns)
        if seg.address:
            prefix = seg.cidr.split("/")[1]
            ip("addr", "add", f"{seg.address}/{prefix}", "dev", "br0", netns=ns)

    def _make_node(self, node: Node) -> None:
        run(["ip", "netns", "add", node.netns], timeout=10)
        ip("link", "set", "lo", "up", netns=node.netns)
        for leg in node.spec.legs:
            self._attach(node, leg)
        if node.spec.gateway:
            ip("route", "add", "default", "via", node.spec.gateway, netns=node.netns)

    def _attach(self, node: Node, leg: Leg) -> None:
        """A veth pair made directly in the two namespaces (never in the host's): `leg.ifname`
        in the node, a port named after the node on the segment's bridge."""
        seg_ns = self.segment_netns(leg.segment)
        ip("link", "add", "name", leg.ifname, "netns", node.netns, "type", "veth",
           "peer", "name", node.name, "netns", seg_ns)
        ip("link", "set", node.name, "master", "br0", "up", netns=seg_ns)
        if node.spec.boot and self.topology.segment(leg.segment).isolate_machines:
            run(["bridge", "-n", seg_ns, "link", "set", "dev", node.name, "isolated", "on"],
                where=f"netns {seg_ns}", timeout=15)
        prefix = self.topology.segment(leg.segment).cidr.split("/")[1]
        ip("addr", "add", f"{leg.address}/{prefix}", "dev", leg.ifname, netns=node.netns)
        ip("link", "set", leg.ifname, "up", netns=node.netns)

    def add_node(self, spec: NodeSpec, boot_timeout: float = 90.0) -> Node:
        """Add a node to a running testbed (a drill's probe or hostile host on the public
        segment, or another machine): its namespace, legs, and for a machine, a boot."""
        self.topology = self.topology.with_node(spec)
        node: Node = Machine(self, spec) if spec.boot else Node(self, spec)
        self.nodes[spec.name] = node
        self._save("ready")
        self._make_node(node)
        if isinstance(node, Machine):
            key = self.private_key.with_suffix(".pub").read_text()
            provision.write_etc(node.etc_upper, spec, key)
            self._write_access_files()
            node.boot(boot_timeout)
        return node

    def remove_node(self, name: str) -> None:
        """Remove a node added by add_node (or any node): its machine is killed, its namespace
        deleted with its veths (their bridge ports go with them) and its files removed."""
        node = self[name]
        if isinstance(node, Machine):
            node.kill()
            for cg in cgroups.machine_cgroups(node.machine_name):
                cgroups.remove(cg)
            shutil.rmtree(node.dir, ignore_errors=True)
        runs.delete_netns(node.netns)
        del self.nodes[name]
        self.topology = Topology(self.topology.segments,
                                 tuple(n for n in self.topology.nodes if n.name != name),
                                 self.topology.name, self.topology.clusters)
        self._write_access_files()
        self._save("ready")

    # --- teardown ----------------------------------------------------------------------------

    def down(self) -> None:
        """Remove everything of this run (machines, namespaces with their bridges and veths and
        anything running in them, files, state) and check by name that nothing is left."""
        t = time.monotonic()
        left = runs.destroy(self.run_id)
        for m in self.machines.values():
            m._reap()
        self._down = True
        self.timings["down"] = time.monotonic() - t
        if not left.empty():
            raise TeardownError(f"testbed {self.run_id}: left behind {left.describe()}")

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- state -------------------------------------------------------------------------------

    def _save(self, phase: str) -> None:
        runs.write_state(self.run_id, {
            "run_id": self.run_id,
            "phase": phase,
            "owner": self.owner,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dir": str(self.dir),
            "topology": asdict(self.topology),
            "netns": {
                "segments": {s.name: self.segment_netns(s.name) for s in self.topology.segments},
                "nodes": {n: node.netns for n, node in self.nodes.items()},
            },
            "machines": {n: m.machine_name for n, m in self.machines.items()},
            "files": {
                "ssh_config": str(self.ssh_config),
                "known_hosts": str(self.known_hosts),
                "private_key": str(self.private_key),
                "inventory": str(self.inventory),
            },
        })

    @classmethod
    def attach(cls, run_id: str | None = None) -> Testbed:
        """A Testbed object for a run built by another process (the command line's `up`);
        with no run_id, the only (or newest) run that has a state file."""
        if run_id is None:
            states = sorted(runs.STATE_DIR.glob("*.json"), key=lambda p: p.stat().st_mtime)
            if not states:
                raise TestbedError("no testbed is up (no state file in "
                                   f"{runs.STATE_DIR}); run: python3 -m tests.testbed up")
            run_id = states[-1].stem
        state = runs.read_state(run_id)
        if state is None:
            raise TestbedError(f"no testbed {run_id!r} (no state file {runs.state_path(run_id)})")
        return cls(run_id, topology_from_dict(state["topology"]), state.get("owner"))

    # --- files for SSH and Ansible -----------------------------------------------------------

    def _write_access_files(self) -> None:
        machines = [m for m in self.machines.values() if m.spec.has_leg("mgmt")]
        known = []
        config = [
            f"# isthmus testbed {self.run_id}: ssh -F {self.ssh_config} NODE (from the",
            f"# controller namespace: ip netns exec {self.controller.netns} ssh ...)",
        ]
        for m in machines:
            key = provision.host_public_key(m.etc_upper)
            if key:
                known.append(f"{m.name},{m.mgmt_address} {key}")
            config += [f"Host {m.name}", f"  HostName {m.mgmt_address}"]
        config += [
            "Host *",
            "  User root",
            f"  IdentityFile {self.private_key}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 10",
            "  LogLevel ERROR",
        ]
        _write_private(self.known_hosts, "\n".join(known) + "\n")
        _write_private(self.ssh_config, "\n".join(config) + "\n")
        _write_private(self.inventory, self.inventory_yaml())

    def inventory_yaml(self) -> str:
        """An Ansible inventory (YAML) of the machines: one group per cluster, connection
        settings, and each machine's testbed addresses as `testbed_*` host variables. Ansible
        merges it with another inventory given by a second -i (group_vars, roles)."""
        q = json.dumps  # a JSON string is a valid YAML scalar
        lines = [
            f"# isthmus testbed {self.run_id}: generated, do not edit",
            "all:",
            "  vars:",
            "    ansible_user: root",
            "    ansible_python_interpreter: /usr/bin/python3",
            f"    ansible_ssh_private_key_file: {q(str(self.private_key))}",
            f"    ansible_ssh_common_args: {q(f'-F {self.ssh_config}')}",
            "  children:",
        ]
        groups: dict[str, list[Machine]] = {}
        for m in self.machines.values():
            if not m.spec.has_leg("mgmt"):
                continue
            groups.setdefault(m.spec.cluster or "testbed_other", []).append(m)
            if m.spec.role:
                groups.setdefault(f"testbed_{m.spec.role}s", []).append(m)
        for group, members in groups.items():
            lines += [f"    {group}:", "      hosts:"]
            for m in members:
                lines.append(f"        {m.name}:")
                lines.append(f"          ansible_host: {q(m.mgmt_address)}")
                lines.append(f"          testbed_cluster: {q(m.spec.cluster or '')}")
                lines.append(f"          testbed_role: {q(m.spec.role or '')}")
                if m.spec.cluster and m.spec.has_leg(m.spec.cluster):
                    lines.append(f"          testbed_private_address: {q(m.private_address)}")
                if m.spec.has_leg("public"):
                    lines.append(f"          testbed_public_address: {q(m.public_address)}")
                lines.append("          testbed_addresses:")
                for leg in m.spec.legs:
                    lines.append(f"            {leg.segment}: {q(leg.address)}")
        return "\n".join(lines) + "\n"

    # --- reporting ---------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What `status` prints: per node its namespace, addresses, and for machines the
        nspawn pid, PID 1 and systemd state."""
        nodes: dict[str, Any] = {}
        for name, node in self.nodes.items():
            info: dict[str, Any] = {
                "netns": node.netns,
                "legs": {leg.segment: leg.address for leg in node.spec.legs},
                "gateway": node.spec.gateway,
                "role": node.spec.role,
                "cluster": node.spec.cluster,
            }
            if isinstance(node, Machine):
                pid1 = node.pid1
                info.update({"machine": node.machine_name, "nspawn_pid": node.nspawn_pid,
                             "pid1": pid1,
                             "state": str(node.system_state()) if pid1 else "off"})
            nodes[name] = info
        return {"run_id": self.run_id, "dir": str(self.dir), "owner": self.owner,
                "ssh_config": str(self.ssh_config), "inventory": str(self.inventory),
                "nodes": nodes}

    def walk_netns(self) -> Iterator[str]:
        for seg in self.topology.segments:
            yield self.segment_netns(seg.name)
        for node in self.nodes.values():
            yield node.netns


def topology_from_dict(d: dict[str, Any]) -> Topology:
    return Topology(
        segments=tuple(Segment(**s) for s in d["segments"]),
        nodes=tuple(
            NodeSpec(**{**n, "legs": tuple(Leg(**leg) for leg in n["legs"])}) for n in d["nodes"]
        ),
        name=d.get("name", "custom"),
        clusters=tuple(d.get("clusters", ())),
    )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


__all__ = ["BootError", "Testbed", "topology_from_dict"]
