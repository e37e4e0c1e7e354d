"""Nodes of a testbed: a bare network namespace (`Node`: the controller, probes) or a booted
machine (`Machine`: systemd as PID 1, its own /etc, /opt, /var and network).

Every operation the deployment tests and the drills need is a method here: run a command in a
machine, copy a file in or out, power off, kill PID 1, boot again, take a link down and up,
read PID 1, addresses and listeners, start a sample backend.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cgroups, runs
from .commands import DEFAULT_TIMEOUT, MACHINE_ENV, ip, run
from .errors import BootError, CommandError, TestbedError
from .topology import NodeSpec, Topology

if TYPE_CHECKING:
    from .testbed import Testbed

BACKEND_SCRIPT = Path(__file__).with_name("backend.py")
# A machine owns its network namespace, as a host owns its network: with CAP_NET_ADMIN
# (--capability) and a writable /proc/sys/net a deployment can add routes (a VIP range local on
# lo) and turn forwarding on for an edge that is its cluster's way out. Nothing of it reaches
# the host: the namespace is the machine's alone.
NSPAWN_ENV = {**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
BACKEND_PATH = "/opt/isthmus-testbed/backend.py"  # inside a machine


@dataclass(frozen=True)
class Listener:
    """A listening socket seen by `ss` inside a machine."""

    proto: str  # tcp | udp
    address: str  # as bound: 0.0.0.0, ::, or a specific address
    port: int
    process: str  # ss's users:(...) text, e.g. users:(("sshd",pid=36,fd=3))


@dataclass(frozen=True)
class SystemState:
    """`systemctl is-system-running` of a machine and, when degraded, the units that failed."""

    state: str
    failed_units: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.state in ("running", "degraded")

    def __str__(self) -> str:
        if self.failed_units:
            return f"{self.state} (failed: {', '.join(self.failed_units)})"
        return self.state


class Node:
    """A network namespace with legs on segments. Commands run as host programs inside it."""

    def __init__(self, testbed: Testbed, spec: NodeSpec):
        self.testbed = testbed
        self.spec = spec
        self.name = spec.name
        self.netns = runs.node_netns(testbed.run_id, spec.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} netns={self.netns}>"

    @property
    def topology(self) -> Topology:
        return self.testbed.topology

    @property
    def cluster(self) -> str | None:
        return self.spec.cluster

    @property
    def role(self) -> str | None:
        return self.spec.role

    # --- addresses and links -----------------------------------------------------------------

    def address(self, segment: str) -> str:
        """This node's configured address on `segment` ("public", "east", "mgmt", ...)."""
        return self.spec.leg(segment).address

    @property
    def public_address(self) -> str:
        return self.address("public")

    @property
    def private_address(self) -> str:
        if not self.spec.cluster:
            raise TestbedError(f"node {self.name!r} is in no cluster")
        return self.address(self.spec.cluster)

    @property
    def mgmt_address(self) -> str:
        return self.address("mgmt")

    def ip_addresses(self) -> dict[str, list[str]]:
        """The live IPv4 addresses per interface, read from the namespace: {ifname: [a/len]}."""
        out = ip("-j", "-4", "addr", "show", netns=self.netns).stdout
        result: dict[str, list[str]] = {}
        for link in json.loads(out or "[]"):
            result[link["ifname"]] = [f"{a['local']}/{a['prefixlen']}"
                                      for a in link.get("addr_info", [])]
        return result

    def routes(self) -> list[dict[str, Any]]:
        return json.loads(ip("-j", "-4", "route", "show", netns=self.netns).stdout or "[]")

    def link_down(self, segment: str, *, side: str = "switch") -> None:
        """Cut this node's link to `segment`. side="switch" downs the bridge port (a pulled
        cable: the node keeps its address and routes, its interface loses carrier);
        side="node" downs the interface inside the node (the kernel drops its routes)."""
        self._set_link(segment, side, "down")

    def link_up(self, segment: str, *, side: str = "switch") -> None:
        """Undo link_down. On the node side it also puts back the default route if it was
        via this leg (the kernel removed it with the interface)."""
        self._set_link(segment, side, "up")
        if side == "node":
            self._add_default_route(segment)

    def link_state(self, segment: str) -> dict[str, str]:
        """{"switch": UP|DOWN, "node": state} of this node's link to `segment`."""
        leg = self.spec.leg(segment)
        seg_ns = runs.segment_netns(self.testbed.run_id, segment)
        sw = json.loads(ip("-j", "link", "show", self.name, netns=seg_ns).stdout)[0]
        nd = json.loads(ip("-j", "link", "show", leg.ifname, netns=self.netns).stdout)[0]
        return {"switch": "UP" if "UP" in sw["flags"] else "DOWN", "node": nd["operstate"]}

    def _set_link(self, segment: str, side: str, state: str) -> None:
        leg = self.spec.leg(segment)
        if side == "switch":
            ip("link", "set", self.name, state,
               netns=runs.segment_netns(self.testbed.run_id, segment))
        elif side == "node":
            ip("link", "set", leg.ifname, state, netns=self.netns)
        else:
            raise TestbedError(f"link side must be 'switch' or 'node', not {side!r}")

    def _add_default_route(self, segment: str) -> None:
        gw = self.spec.gateway
        cidr = self.topology.segment(segment).cidr
        if gw and ipaddress.ip_address(gw) in ipaddress.ip_network(cidr):
            ip("route", "replace", "default", "via", gw, netns=self.netns)

    # --- commands ----------------------------------------------------------------------------

    def net_argv(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run as a host program (the host's files, Python and tools) in this
        node's network namespace. For a machine: on its network, not in its file system."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def net_run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
        env: dict[str, str] | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run a host program in this node's network namespace."""
        return run(self.net_argv(argv), where=f"netns of {self.name}", input=input,
                   timeout=timeout, check=check, env=env, text=text)

    def net_popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a host program in this node's network namespace; the caller owns (and must
        end) it. Whatever still runs in the namespace at teardown is killed with it."""
        return subprocess.Popen(self.net_argv(argv), **kwargs)

    # A bare node has nothing but its network namespace: "in the node" is the same thing.
    def argv(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside this node (for callers that need their own Popen)."""
        return self.net_argv(argv)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a host program in this node's network namespace (see net_run)."""
        return self.net_run(argv, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        return self.net_popen(argv, **kwargs)

    def connect(self, address: str, port: int, timeout: float = 2.0) -> str:
        """Try a TCP connection from this node: "connected", "refused" (the address answered),
        "timeout" or "unreachable" (nothing answered, or no route)."""
        return _connect_result(self.run(_connect_argv(address, port, timeout),
                                        timeout=timeout + 10, check=False))

    def http_get(self, url: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET url from this node with Python's urllib: (status, body)."""
        return _http_result(self.run(_http_argv(url, timeout), timeout=timeout + 10))


class Machine(Node):
    """A booted machine: systemd-nspawn from the host's root with --volatile=yes, overlays for
    /etc and /opt whose upper directories are on the host (so they survive a reboot), a bind
    of a host directory on /var/lib/isthmus, and the node's own network namespace (made by the
    testbed, so addresses and routes are in place before boot and stay across reboots)."""

    def __init__(self, testbed: Testbed, spec: NodeSpec):
        super().__init__(testbed, spec)
        self.machine_name = runs.machine_name(testbed.run_id, spec.name)
        self.dir = testbed.dir / "machines" / spec.name
        self.etc_upper = self.dir / "etc"
        self.opt_upper = self.dir / "opt"
        self.var_lib_isthmus = self.dir / "var-lib-isthmus"
        self.console_log = self.dir / "console.log"
        self._proc: subprocess.Popen | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def nspawn_argv(self) -> list[str]:
        return [
            "systemd-nspawn",
            "--directory=/",
            "--volatile=yes",
            f"--overlay=/etc:{self.etc_upper}:/etc",
            f"--overlay=/opt:{self.opt_upper}:/opt",
            f"--bind={self.var_lib_isthmus}:/var/lib/isthmus",
            f"--network-namespace-path=/run/netns/{self.netns}",
            "--console=passive",
            "--register=no",  # no systemd-machined on these hosts (PID 1 is not systemd)
            "--keep-unit",
            # deployments set routes and forwarding in the machine's own network namespace
            "--capability=CAP_NET_ADMIN",
            "--resolv-conf=off",  # /etc/resolv.conf is the machine's own file in its overlay
            "--timezone=off",
            "--link-journal=no",
            f"--machine={self.machine_name}",
            "--boot",
            "systemd.firstboot=off",
        ]

    @property
    def nspawn_pid(self) -> int | None:
        return runs.nspawn_processes().get(self.machine_name)

    @property
    def pid1(self) -> int | None:
        """The machine's PID 1 (its systemd) as the host sees it, or None when it is off."""
        pid = self.nspawn_pid
        return runs.container_init(pid) if pid else None

    def is_running(self) -> bool:
        return self.nspawn_pid is not None

    def start(self) -> None:
        """Start booting (do not wait): see boot()."""
        if self.is_running():
            raise BootError(f"machine {self.name} is already running")
        self._reap()
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in (self.etc_upper, self.opt_upper, self.var_lib_isthmus):
            d.mkdir(mode=0o755, exist_ok=True)
        # A cgroup of its own (see cgroups.py), emptied of what a killed boot left in it.
        for cg in cgroups.machine_cgroups(self.machine_name):
            cgroups.remove(cg)
        argv = cgroups.wrap(self.nspawn_argv(), cgroups.create(self.machine_name))
        log = open(self.console_log, "ab")  # noqa: SIM115 - handed to the child process
        try:
            log.write(f"--- boot {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            # Its own session: a Ctrl-C at the terminal reaches the tests (which tear down in
            # order), not the machines.
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                env=NSPAWN_ENV,
            )
        finally:
            log.close()

    def boot(self, timeout: float = 60.0) -> SystemState:
        """Boot the machine (again) with the same overlays, network and /var/lib/isthmus, and
        wait until systemd has finished starting up."""
        self.start()
        return self.wait_running(timeout)

    def wait_running(self, timeout: float = 60.0) -> SystemState:
        """Wait until the machine's systemd reports running (or degraded: see failed_units)."""
        deadline = time.monotonic() + timeout
        last = "no PID 1 yet"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BootError(f"machine {self.name}: systemd-nspawn exited "
                                f"{self._proc.returncode}; {self._console_tail()}")
            pid = self.pid1
            if pid is not None:
                left = max(1.0, deadline - time.monotonic())
                proc = run(self._nsenter(pid, ["systemctl", "is-system-running", "--wait"]),
                           where=f"machine {self.name}", timeout=left, check=False)
                last = (proc.stdout.strip() or proc.stderr.strip() or last).splitlines()[-1]
                if last in ("running", "degraded"):
                    return self.system_state()
            time.sleep(0.1)
        raise BootError(f"machine {self.name} did not finish booting in {timeout:g} s "
                        f"(last: {last}); {self._console_tail()}")

    def system_state(self) -> SystemState:
        state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
        failed: tuple[str, ...] = ()
        if state != "running":
            out = self.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"],
                           check=False).stdout
            failed = tuple(line.split()[0] for line in out.splitlines() if line.strip())
        return SystemState(state or "unknown", failed)

    def poweroff(self, timeout: float = 30.0) -> None:
        """A clean shutdown (SIGRTMIN+4 to PID 1, as `machinectl poweroff` sends); waits until
        systemd-nspawn has exited. The overlays and /var/lib/isthmus stay for the next boot."""
        self._stop(graceful=True, timeout=timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Kill the machine like a power cut: SIGKILL to its PID 1."""
        self._stop(graceful=False, timeout=timeout)

    def reboot(self, timeout: float = 60.0) -> SystemState:
        self.poweroff()
        return self.boot(timeout)

    def _stop(self, *, graceful: bool, timeout: float) -> None:
        nspawn = self.nspawn_pid
        if nspawn is None:
            self._reap()
            return
        start = runs.process_start(nspawn)
        init = runs.container_init(nspawn)
        if init is not None:
            sig = (signal.SIGRTMIN + 4) if graceful else signal.SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, sig)
        if self._wait_nspawn(nspawn, start, timeout):
            return
        if graceful:  # it did not shut down in time: cut the power
            runs.kill_machine_process(nspawn)
            self._reap()
            raise BootError(f"machine {self.name} did not power off in {timeout:g} s; killed")
        runs.kill_machine_process(nspawn)
        self._reap()

    def _wait_nspawn(self, pid: int, start: int | None, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            self._proc = None
            return True
        return runs.wait_gone(pid, start, timeout)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def _console_tail(self, lines: int = 8) -> str:
        try:
            tail = self.console_log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "no console log"
        return f"console ({self.console_log}): " + " | ".join(tail)

    # --- commands ----------------------------------------------------------------------------

    def _nsenter(self, pid: int, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--target={pid}", "--all", "--", *argv]

    def argv(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside the machine (all its namespaces: its files, processes,
        network), for callers that need their own Popen."""
        pid = self.pid1
        if pid is None:
            raise TestbedError(f"machine {self.name} is not running")
        return self._nsenter(pid, argv)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
        env: dict[str, str] | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run argv inside the machine (nsenter into its namespaces) as root, with a machine's
        environment. The process is not part of the machine's systemd: use systemd_run for
        anything that must outlive the call."""
        return run(self.argv(argv), where=f"machine {self.name}", input=input, timeout=timeout,
                   check=check, env={**MACHINE_ENV, **(env or {})}, text=text)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("env", MACHINE_ENV)
        return subprocess.Popen(self.argv(argv), **kwargs)

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run(["sh", "-c", script], **kwargs)

    def ssh(self, argv: Sequence[str] | str, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a command over real SSH from the controller (as Ansible does)."""
        return self.testbed.ssh(self.name, argv, **kwargs)

    def put_file(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Write a file inside the machine (atomically, parents created)."""
        if isinstance(data, str):
            data = data.encode()
        script = ('set -e; umask 077; mkdir -p "$(dirname "$1")"; cat > "$1.tb-tmp"; '
                  'chmod "$2" "$1.tb-tmp"; mv -f "$1.tb-tmp" "$1"')
        self.run(["sh", "-c", script, "sh", path, f"{mode:o}"], input=data, text=False)

    def read_file(self, path: str) -> bytes:
        return self.run(["cat", "--", path], text=False).stdout

    def systemd_run(self, unit: str, argv: Sequence[str],
                    properties: Sequence[str] = ()) -> None:
        """Start argv as a transient service of the machine's own systemd (it outlives this
        call, stops with the machine, and is collected when it exits, failed or not, so a
        killed backend does not leave the machine degraded)."""
        props = [f"--property={p}" for p in properties]
        self.run(["systemd-run", f"--unit={unit}", "--collect", "--quiet", *props, "--",
                  *argv])

    def stop_unit(self, unit: str) -> None:
        self.run(["systemctl", "stop", unit], check=False)

    def kill_unit(self, unit: str, signo: str = "KILL") -> None:
        self.run(["systemctl", "kill", f"--signal={signo}", unit], check=False)

    def unit_active(self, unit: str) -> str:
        return self.run(["systemctl", "is-active", unit], check=False).stdout.strip()

    def start_backend(self, service: str, port: int, *, address: str = "0.0.0.0",
                      name: str | None = None, timeout: float = 15.0) -> Backend:
        """Start a sample HTTP backend (tests/testbed/backend.py, run by the machine's own
        /usr/bin/python3) answering with its service, cluster and host; returns once it
        listens."""
        self.put_file(BACKEND_PATH, BACKEND_SCRIPT.read_bytes(), 0o755)
        unit = f"testbed-backend-{name or f'{service}-{port}'}.service"
        self.systemd_run(unit, [
            "/usr/bin/python3", BACKEND_PATH, "--address", address, "--port", str(port),
            "--service", service, "--cluster", self.spec.cluster or "", "--host", self.name,
        ])
        backend = Backend(self, unit, service, address, port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(lst.port == port for lst in self.listeners(segment=None)):
                return backend
            if self.unit_active(unit) in ("failed", "inactive"):
                break
            time.sleep(0.1)
        journal = self.run(["journalctl", "-u", unit, "-n", "5", "--no-pager"],
                           check=False).stdout
        raise TestbedError(f"backend {unit} on {self.name} is not listening on port {port}: "
                           f"{journal.strip()}")

    # --- observation -------------------------------------------------------------------------

    def listeners(self, segment: str | None = "public", proto: str = "tcp") -> list[Listener]:
        """Listening sockets reachable on this machine's address on `segment` (bound to that
        address or to a wildcard), from `ss` inside the machine; segment=None: all of them."""
        flag = {"tcp": "-t", "udp": "-u"}[proto]
        out = self.run(["ss", "-H", "-l", "-n", "-p", flag]).stdout
        wanted = None if segment is None else self.address(segment)
        result = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 5:
                continue
            host, _, port = parts[3].rpartition(":")
            host = host.strip("[]").split("%")[0]
            if host.startswith("::ffff:"):
                host = host[len("::ffff:"):]
            if wanted is not None and host not in (wanted, "0.0.0.0", "::", "*"):
                continue
            result.append(Listener(proto, host, int(port), " ".join(parts[5:])))
        return result

    def connect(self, address: str, port: int, timeout: float = 2.0) -> str:
        return _connect_result(self.run(_connect_argv(address, port, timeout),
                                        timeout=timeout + 10, check=False))

    def http_get(self, url: str, timeout: float = 5.0) -> tuple[int, str]:
        return _http_result(self.run(_http_argv(url, timeout), timeout=timeout + 10))


@dataclass(frozen=True)
class Backend:
    """A sample backend started by Machine.start_backend."""

    machine: Machine
    unit: str
    service: str
    address: str
    port: int

    @property
    def url(self) -> str:
        host = self.machine.private_address if self.address == "0.0.0.0" else self.address
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        self.machine.stop_unit(self.unit)

    def kill(self) -> None:
        self.machine.kill_unit(self.unit, "KILL")

    def active(self) -> bool:
        return self.machine.unit_active(self.unit) == "active"


# Probes run by /usr/bin/python3 inside a node: no dependency on curl or ping being there.
_CONNECT = """
import socket, sys
s = socket.socket(); s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("connected")
except ConnectionRefusedError: print("refused")
except (socket.timeout, TimeoutError): print("timeout")
except OSError as e: print("unreachable", e.errno)
"""
_HTTP = """
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
    code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
print(code); sys.stdout.flush(); sys.stdout.buffer.write(body)
"""


def _connect_argv(address: str, port: int, timeout: float) -> list[str]:
    return ["/usr/bin/python3", "-c", _CONNECT, address, str(port), str(timeout)]


def _connect_result(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout.strip()
    if proc.returncode != 0 or not out:
        raise CommandError("connect probe", ["python3", "-c", "..."], proc.returncode,
                           proc.stdout, proc.stderr)
    return out.split()[0]


def _http_argv(url: str, timeout: float) -> list[str]:
    return ["/usr/bin/python3", "-c", _HTTP, url, str(timeout)]


def _http_result(proc: subprocess.CompletedProcess) -> tuple[int, str]:
    first, _, body = proc.stdout.partition("\n")
    return int(first), body


