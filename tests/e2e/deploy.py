"""Deploy the appliances on the testbed with the Ansible collection: what the drills run against.

- A wheelhouse built on the host (`pip wheel`, the host has the package registry; the machines
  do not): the project's wheel fresh each time, its dependencies cached by the hash of
  pyproject.toml.
- `ansible-playbook playbooks/site.yml` from ansible/, run in the testbed's controller as the
  README says, with the drills' inventory (tests/e2e/inventory: the example inventory plus a
  second reviews backend in west, a workload on the VM, ...) and the testbed's (connection
  settings). So the machines run what an operator deploys: the `isthmus` user and the hardened
  unit, an offline install into /opt/isthmus/venv on Debian's own Python, the root on the CA
  host (this run's directory) and cluster CA keys made on the edges, the VM bootstrapped with a
  one-time token, NAT on east-edge, the VIP routes.
- The only additions to the deployment, on the side of the test: a systemd drop-in that also
  appends each appliance's log to /opt/isthmus/log/isthmus.log (read from the host), and the
  sample backends on the service machines and the VM (the clusters' applications), each with
  the HTTP health check the inventory gives.

Layout (addresses from tests/testbed/topology.py):

    east-edge   control ingress egress dns   public 198.51.100.10  private 10.0.0.2
    west-edge   control ingress egress dns   public 198.51.100.20  private 10.0.0.2
    east-vm     agent (egress, resolver)     private 10.0.0.20, resolver 10.0.0.20:53
    east-service  reviews 10.0.0.10:9080
    west-service  reviews 10.0.0.10:9080 and 10.0.0.11:9080, ratings 10.0.0.10:9081
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.ansible_run import Ansible, Result
from tests.testbed import EDGE_PRIVATE, VM_PRIVATE, Machine, Testbed
from tests.testbed.nodes import Backend

REPO = Path(__file__).resolve().parents[2]
INVENTORY = Path(__file__).with_name("inventory")
TRUST_DOMAIN = "e2e.isthmus.test"
VIP_CIDR = "240.240.0.0/16"
INGRESS_PORT = 15443
CONTROL_PORT = 15012
METRICS_PORT = 15090
API = "http://127.0.0.1:15000"
VENV = "/opt/isthmus/venv"
CONFIG = "/etc/isthmus/isthmus.yaml"
EDGE_BUNDLE = "/etc/isthmus/pki/bundle.pem"  # the collection's trust.bundle on an edge
AGENT_BUNDLE = "/var/lib/isthmus/pki/bundle.pem"  # and on a VM (the agent rewrites it)
LOG = "/opt/isthmus/log/isthmus.log"  # /opt's overlay: survives reboots, readable from the host
UNIT = "isthmus.service"
# The test's only addition to the deployed unit: its log also goes to a file the host reads.
LOG_DROPIN = "/etc/systemd/system/isthmus.service.d/e2e-log.conf"
LOG_DROPIN_TEXT = f"""# tests/e2e: the appliance's log, also in a file the host reads
[Service]
StandardOutput=append:{LOG}
StandardError=append:{LOG}
"""
WHEEL_CACHE = Path("/var/tmp/isthmus-e2e/wheels")
# How long a peer may stay `stale` before it shows as `unreachable` (a drill waits for it;
# inventory/group_vars/isthmus_gateways.yml sets it).
PEER_UNREACHABLE_AFTER = 12.0
WEST_SECOND = "10.0.0.11"  # west-service's second address, for a second reviews backend

# The sample backends: key (also the workload id) -> (machine, service, port, address). The
# inventory registers each as a workload (test_figures.py checks that the two agree).
BACKENDS: dict[str, tuple[str, str, int, str]] = {
    "reviews-east-1": ("east-service", "reviews", 9080, "10.0.0.10"),
    "reviews-west-1": ("west-service", "reviews", 9080, "10.0.0.10"),
    "reviews-west-2": ("west-service", "reviews", 9080, WEST_SECOND),
    "ratings-west-1": ("west-service", "ratings", 9081, "10.0.0.10"),
    "east-vm-web": ("east-vm", "web", 8080, VM_PRIVATE),
}


class DeployError(Exception):
    pass


# --- on the host ---------------------------------------------------------------------------------


def _pip(*args: str, timeout: float = 600.0) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise DeployError(f"pip {' '.join(args)}: {proc.stderr.strip()[-2000:]}")


def build_wheelhouse(dest: Path, cache: Path = WHEEL_CACHE) -> list[Path]:
    """Every wheel the appliance needs, in `dest`: dependencies from a cache keyed by
    pyproject.toml (built with `pip wheel` the first time), the project's own wheel fresh."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()
                         + sys.version.encode()).hexdigest()[:16]
    deps = cache / key
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    # Symlinks stay links (a tree may hold one that points back up, as Ansible collections do).
    src = dest.parent / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests", "bench",
        "ansible", "node_modules"))
    if not (deps / "complete").exists():
        tmp = cache / f"{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _pip("wheel", "-q", "-w", str(tmp), str(src))
        for w in tmp.glob("isthmus-*.whl"):
            w.unlink()
        (tmp / "complete").write_text("")
        shutil.rmtree(deps, ignore_errors=True)
        tmp.rename(deps)
    dest.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "-q", "--no-deps", "-w", str(dest), str(src))
    for w in deps.glob("*.whl"):
        shutil.copy2(w, dest / w.name)
    return sorted(dest.glob("*.whl"))


@dataclass
class Pki:
    """The CA host's directory (`isthmus ca --dir`, the inventory's pki_ca_dir): the root and
    the bundle. Cluster CA keys are on the edges (the collection makes them there)."""

    dir: Path

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle.pem"

    @property
    def root(self) -> Path:
        return self.dir / "root-ca.pem"


# --- an appliance in a machine ------------------------------------------------------------------


@dataclass
class Appliance:
    """One appliance: an edge (control, ingress, egress, dns) or the VM's agent."""

    machine: Machine
    cluster: str
    kind: str  # "edge" | "agent"

    @property
    def name(self) -> str:
        return self.machine.name

    @property
    def log_path(self) -> Path:
        """The appliance's log on the host (the machine's /opt overlay)."""
        return self.machine.opt_upper / LOG.removeprefix("/opt/")

    @property
    def data_dir(self) -> Path:
        """/var/lib/isthmus of the machine, on the host."""
        return self.machine.var_lib_isthmus

    def token(self) -> str:
        """The admin token (the appliance writes it at its first start; "" before that)."""
        try:
            return (self.machine.etc_upper / "isthmus" / "api-token").read_text().strip()
        except FileNotFoundError:
            return ""

    # --- systemd ---
    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        return self.machine.run(["systemctl", *args], check=check, timeout=timeout).stdout

    def main_pid(self) -> int:
        out = self.systemctl("show", "-p", "MainPID", "--value", UNIT, check=False).strip()
        return int(out) if out.isdigit() else 0

    def active(self) -> str:
        return self.machine.unit_active(UNIT)

    def sighup(self) -> None:
        self.systemctl("reload", UNIT)

    def sigkill(self) -> None:
        self.systemctl("kill", "--signal=KILL", UNIT)

    def restart(self) -> None:
        self.systemctl("restart", UNIT, timeout=60)

    def rss_fds(self) -> tuple[int, int]:
        """(resident set in KiB, open file descriptors) of the appliance's main process; (0, 0)
        when it does not run."""
        script = (f'p=$(systemctl show -p MainPID --value {UNIT}); [ "$p" -gt 0 ] || exit 0; '
                  'r=$(sed -n "s/^VmRSS:[^0-9]*\\([0-9]*\\).*/\\1/p" /proc/$p/status); '
                  'n=$(ls /proc/$p/fd | wc -l); echo "$r $n"')
        out = self.machine.run(["sh", "-c", script], check=False, timeout=15).stdout.split()
        return (int(out[0]), int(out[1])) if len(out) == 2 else (0, 0)

    # --- the CLI and the API, in the machine ---
    def cli(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        proc = self.machine.run([f"{VENV}/bin/isthmus", *args, "--config", CONFIG],
                                check=check, timeout=timeout)
        return proc.stdout

    def api(self, method: str, path: str, body: Any = None,
            timeout: float = 10.0) -> tuple[int, Any]:
        """Call the operators' API (127.0.0.1:15000 in the machine) with curl on its network."""
        argv = ["curl", "-sS", "-m", str(timeout), "-X", method, "-o", "-",
                "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {self.token()}"]
        data = None
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
            data = json.dumps(body)
        argv.append(f"{API}{path}")
        proc = self.machine.net_run(argv, input=data, check=False, timeout=timeout + 5)
        text, _, code = proc.stdout.rpartition("\n")
        if not code.strip().isdigit() or code.strip() == "000":
            return 0, proc.stderr.strip()
        try:
            return int(code), json.loads(text) if text.strip() else None
        except ValueError:
            return int(code), text

    def metrics(self) -> str:
        """Prometheus text from the appliance's metrics listener."""
        addr = VM_PRIVATE if self.kind == "agent" else EDGE_PRIVATE
        listen = "127.0.0.1" if self.kind == "agent" else addr
        proc = self.machine.net_run(["curl", "-sS", "-m", "5",
                                     f"http://{listen}:{METRICS_PORT}/metrics"],
                                    check=False, timeout=15)
        return proc.stdout

    def metric_sum(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

    def log_events(self, since: float = 0.0) -> list[dict[str, Any]]:
        """The appliance's JSON log lines (with `ts` >= since, when they carry one)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict) and _event_time(ev) >= since:
                    out.append(ev)
        return out

    def wait_healthy(self, timeout: float = 90.0) -> None:
        """Until GET /v1/health answers 200 (an agent: its control channel is up and its
        workloads taken)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            status, body = self.api("GET", "/v1/health", timeout=3)
            if status == 200:
                return
            last = (status, body)
            time.sleep(0.3)
        raise DeployError(f"{self.name}: appliance not healthy in {timeout:g} s (last {last}); "
                          f"log tail: {self.log_tail()}")

    def log_tail(self, n: int = 8) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _event_time(ev: dict[str, Any]) -> float:
    for key in ("ts", "time", "timestamp"):
        v = ev.get(key)
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                return dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    return 0.0


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        got = dict(_labels(rest.rstrip("}")))
        if all(got.get(k) == v for k, v in labels.items()):
            with contextlib.suppress(ValueError):
                total += float(value)
    return total


def _labels(text: str) -> Iterator[tuple[str, str]]:
    while text:
        key, _, text = text.partition("=")
        assert text.startswith('"')
        end = 1
        while text[end] != '"':
            end += 2 if text[end] == "\\" else 1
        yield key.strip(", "), text[1:end]
        text = text[end + 1 :].lstrip(",")


# --- the inventory ------------------------------------------------------------------------------


@cache
def inventory_vars(group: str) -> dict[str, Any]:
    """A group's variables in the drills' inventory."""
    return yaml.safe_load((INVENTORY / "group_vars" / f"{group}.yml").read_text()) or {}


def inventory_workloads() -> dict[str, dict[str, Any]]:
    """Every workload the inventory registers (the edges' and the VM's), by id."""
    out = {}
    for group, key in (("east", "gateway_workloads"), ("west", "gateway_workloads"),
                       ("isthmus_agents", "agent_workloads")):
        for w in inventory_vars(group).get(key, []):
            out[w["id"]] = w
    return out


def vm_workloads(extra: int = 0) -> list[dict[str, Any]]:
    """The VM's own workloads as the inventory gives them (web), and `extra` more
    registrations of the same backend (drill 4's stream of agent registrations)."""
    base = list(inventory_vars("isthmus_agents")["agent_workloads"])
    web = base[0]
    out = [*base]
    out += [{**web, "id": f"{web['id']}-{i}"} for i in range(1, extra + 1)]
    return out


# --- the deployment ------------------------------------------------------------------------------


@dataclass
class Deployment:
    testbed: Testbed
    workdir: Path
    pki: Pki
    east: Appliance
    west: Appliance
    vm: Appliance
    backends: dict[str, Backend] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    vm_extra: int = 0  # workloads the agent's config holds beyond its own (drill 4)
    _ansible: Ansible | None = field(default=None, repr=False)

    @property
    def appliances(self) -> dict[str, Appliance]:
        return {"east-edge": self.east, "west-edge": self.west, "east-vm": self.vm}

    @property
    def edges(self) -> dict[str, Appliance]:
        return {"east": self.east, "west": self.west}

    # --- install ---
    @classmethod
    def install(cls, tb: Testbed, workdir: Path | None = None) -> Deployment:
        t0 = time.monotonic()
        workdir = workdir or tb.dir / "e2e"
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dep = cls(tb, workdir, Pki(workdir / "pki"),
                  Appliance(tb["east-edge"], "east", "edge"),
                  Appliance(tb["west-edge"], "west", "edge"),
                  Appliance(tb["east-vm"], "east", "agent"))
        build_wheelhouse(dep.wheelhouse)
        dep.timings["wheelhouse"] = time.monotonic() - t0
        t = time.monotonic()
        dep._prepare_machines()
        dep._start_backends()
        dep.timings["backends"] = time.monotonic() - t
        t = time.monotonic()
        result = dep.playbook("site.yml")
        if result.rc != 0:
            raise DeployError(f"site.yml failed (rc {result.rc}):\n{result.tail(40)}")
        dep.timings["site.yml"] = time.monotonic() - t
        t = time.monotonic()
        for app in dep.appliances.values():
            app.wait_healthy()
        dep.set_weights("reviews", {"east": 20, "west": 80})
        dep.wait_served()
        dep.timings["ready"] = time.monotonic() - t
        dep.timings["total"] = time.monotonic() - t0
        return dep

    @property
    def wheelhouse(self) -> Path:
        return self.workdir / "wheels"

    def playbook(self, name: str, *args: str) -> Result:
        """`ansible-playbook playbooks/<name>` from ansible/ in the testbed's controller, with
        the drills' inventory, the testbed's, this run's wheelhouse and CA directory."""
        if self._ansible is None:
            self._ansible = Ansible(self.testbed, self.pki.dir)
        return self._ansible.playbook(name, "-e", f"isthmus_wheelhouse={self.wheelhouse}",
                                      *args, inventory=INVENTORY)

    def _prepare_machines(self) -> None:
        """What the test adds beside the deployment: the log drop-in on the appliances'
        machines (in place before the unit first starts), and west-service's second address
        (its second reviews backend)."""
        for app in self.appliances.values():
            app.machine.run(["mkdir", "-p", str(Path(LOG).parent)])
            app.machine.put_file(LOG_DROPIN, LOG_DROPIN_TEXT, 0o644)
        self.testbed["west-service"].net_run(
            ["ip", "addr", "replace", f"{WEST_SECOND}/24", "dev", "priv0"])

    def _start_backends(self) -> None:
        for key in BACKENDS:
            self.start_backend(key)

    def start_backend(self, key: str) -> Backend:
        """Start (again) the sample backend `key` of BACKENDS; returns once it listens."""
        node, service, port, address = BACKENDS[key]
        self.backends[key] = self.testbed[node].start_backend(
            service, port, address=address, name=key)
        return self.backends[key]

    def cluster_ca(self, cluster: str) -> tuple[Path, Path]:
        """The cluster CA's certificate and key as its edge holds them (made there by the
        collection; read from the host, as someone holding the edge's files could)."""
        pki = self.edges[cluster].machine.etc_upper / "isthmus" / "pki"
        return pki / "cluster-ca.pem", pki / "cluster-ca.key"

    def bundle_path(self, app: Appliance) -> Path:
        """The node's trust.bundle, on the host."""
        if app.kind == "agent":
            return app.data_dir / AGENT_BUNDLE.removeprefix("/var/lib/isthmus/")
        return app.machine.etc_upper / EDGE_BUNDLE.removeprefix("/etc/")

    def set_vm_config_workloads(self, workloads: list[dict[str, Any]]) -> None:
        """Replace the agent's `discovery.workloads` in its deployed config (kept as the
        collection wrote it otherwise: root-owned, readable by the appliance's group)."""
        cfg = yaml.safe_load(self.vm.machine.read_file(CONFIG))
        cfg["discovery"]["workloads"] = workloads
        self.vm.machine.put_file(CONFIG, yaml.safe_dump(cfg, sort_keys=True), 0o640)
        self.vm.machine.run(["chgrp", "isthmus", CONFIG])

    # --- operations the drills use ---
    def set_weights(self, service: str, weights: dict[str, int], via: str = "east",
                    failover: bool = True) -> dict[str, Any]:
        status, body = self.edges[via].api(
            "PUT", f"/v1/services/default/{service}/traffic",
            {"weights": weights, "failover": failover})
        if status != 200:
            raise DeployError(f"traffic set via {via}: {status} {body}")
        return body

    def peers(self, cluster: str) -> dict[str, dict[str, Any]]:
        status, body = self.edges[cluster].api("GET", "/v1/peers", timeout=5)
        if status != 200 or not isinstance(body, list):
            return {}
        return {p["cluster"]: p for p in body}

    def resolve(self, name: str, timeout: float = 2.0) -> str | None:
        """The VM's resolver's answer for `name` (A), or None."""
        proc = self.vm.machine.net_run(
            ["dig", "+short", "+tries=1", f"+time={max(1, int(timeout))}", f"@{VM_PRIVATE}",
             name, "A"], check=False, timeout=timeout + 5)
        lines = [x for x in proc.stdout.split() if x and x[0].isdigit()]
        return lines[0] if lines else None

    def get_via_vm(self, name: str, port: int, timeout: float = 5.0) -> dict[str, Any] | None:
        """GET / of a service through the VM's resolver and egress: the backend's answer."""
        vip = self.resolve(name)
        if vip is None:
            return None
        proc = self.vm.machine.net_run(["curl", "-sS", "-m", str(timeout),
                                        f"http://{vip}:{port}/ready"],
                                       check=False, timeout=timeout + 5)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return None

    def wait_served(self, timeout: float = 90.0,
                    want: Sequence[tuple[str, int, str]] = (
                        ("reviews.default.global", 9080, "east"),
                        ("reviews.default.global", 9080, "west"),
                        ("ratings.default.global", 9081, "west"),
                        ("web.default.global", 8080, "east"))) -> None:
        """Until the VM's egress serves every (service, cluster) in `want`."""
        deadline = time.monotonic() + timeout
        missing = set(want)
        while missing and time.monotonic() < deadline:
            for name, port, cluster in sorted(missing):
                body = self.get_via_vm(name, port, timeout=3)
                if body is not None and body.get("cluster") == cluster:
                    missing.discard((name, port, cluster))
            if missing:
                time.sleep(0.2)
        if missing:
            raise DeployError(f"not served through the VM after {timeout:g} s: {sorted(missing)}; "
                              f"east: {self.east.log_tail(4)}; vm: {self.vm.log_tail(4)}")

    def wait_peers(self, state: str = "connected", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {c: self.peers(c).get(o, {}).get("state")
                      for c, o in (("east", "west"), ("west", "east"))}
            if all(s == state for s in states.values()):
                return
            time.sleep(0.3)
        raise DeployError(f"peers not {state} after {timeout:g} s: {states}")

    def samples(self) -> dict[str, tuple[int, int]]:
        """(RSS KiB, open fds) of every appliance."""
        return {name: app.rss_fds() for name, app in self.appliances.items()}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    """Poll until `predicate()` is truthy (returns it) or raise naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    """`python3 -m tests.e2e.deploy`: a testbed with the appliances installed, held until
    Ctrl-C or SIGTERM (then torn down), for looking around between drills."""
    import argparse
    import signal
    import threading

    from tests.testbed.fixtures import sigterm_as_interrupt

    argparse.ArgumentParser(description=main.__doc__).parse_args(argv)
    with sigterm_as_interrupt():
        tb = Testbed.up()
        try:
            dep = Deployment.install(tb)
            print(json.dumps({"run_id": tb.run_id, "dir": str(tb.dir),
                              "timings": {k: round(v, 1) for k, v in dep.timings.items()}}),
                  flush=True)
            print(f"exec: python3 -m tests.testbed exec --run {tb.run_id} east-vm", flush=True)
            stop = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            stop.wait()
        finally:
            tb.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
