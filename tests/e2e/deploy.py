"""Install the appliances on the testbed directly (no Ansible): what the drills run against.

- A wheelhouse built on the host (`pip wheel`, the host has the package registry; the machines
  do not): the project's wheel fresh each time, its dependencies cached by the hash of
  pyproject.toml.
- In each appliance machine, `/opt/isthmus/venv` made by the machine's own `/usr/bin/python3`
  (Debian's), installed `--no-index` from the wheelhouse.
- PKI made on the host (the "CA host") with `isthmus ca`: one root, a CA per cluster. Edges hold
  their cluster CA and issue their own identity; the VM gets its identity from east's control
  node with a one-time bootstrap token made by `isthmus token create` on east.
- Configs in `/etc/isthmus/isthmus.yaml`, and an enabled systemd unit `isthmus.service` in the
  machine's own `/etc` (its overlay survives a reboot), so a rebooted edge starts its appliance by
  itself; `Restart=on-failure` brings a killed appliance back.
- Sample backends on the service machines (reviews in both clusters, two in west; ratings in
  west) and one on the VM (web, the VM's own workload, registered by its agent), each with an
  HTTP health check.
- The VM reaches the public segment through its edge (NAT on east-edge's public leg), as hosts of
  a real cluster do, so its egress can open tunnels to west's ingress.

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
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.testbed import EDGE_PRIVATE, EDGE_PUBLIC, VM_PRIVATE, Machine, Testbed
from tests.testbed.commands import MACHINE_ENV
from tests.testbed.nodes import Backend

REPO = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "e2e.isthmus.test"
VIP_CIDR = "240.240.0.0/16"
INGRESS_PORT = 15443
CONTROL_PORT = 15012
METRICS_PORT = 15090
API = "http://127.0.0.1:15000"
VENV = "/opt/isthmus/venv"
WHEELS = "/opt/isthmus/wheels"
CONFIG = "/etc/isthmus/isthmus.yaml"
PKI_DIR = "/etc/isthmus/pki"
LOG = "/opt/isthmus/log/isthmus.log"  # /opt's overlay: survives reboots, readable from the host
UNIT = "isthmus.service"
WHEEL_CACHE = Path("/var/tmp/isthmus-e2e/wheels")
REGIONS = {"east": "us-east", "west": "us-west"}
# How long a peer may stay `stale` before it shows as `unreachable` (a drill waits for it).
PEER_UNREACHABLE_AFTER = 12.0
WEST_SECOND = "10.0.0.11"  # west-service's second address, for a second reviews backend

# The sample backends: key (also the workload id) -> (machine, service, port, address).
BACKENDS: dict[str, tuple[str, str, int, str]] = {
    "reviews-east-1": ("east-service", "reviews", 9080, "10.0.0.10"),
    "reviews-west-1": ("west-service", "reviews", 9080, "10.0.0.10"),
    "reviews-west-2": ("west-service", "reviews", 9080, WEST_SECOND),
    "ratings-west-1": ("west-service", "ratings", 9081, "10.0.0.10"),
    "east-vm-web": ("east-vm", "web", 8080, VM_PRIVATE),
}

UNIT_TEXT = f"""[Unit]
Description=Isthmus appliance
After=network.target

[Service]
ExecStart={VENV}/bin/isthmus run --config {CONFIG} --log-format json
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
TimeoutStopSec=20
StandardOutput=append:{LOG}
StandardError=append:{LOG}

[Install]
WantedBy=multi-user.target
"""


class DeployError(Exception):
    pass


# --- on the host -------------------------------------------------------------------------------


def isthmus_argv(*args: str) -> list[str]:
    """The `isthmus` CLI of this checkout, on the host."""
    return [sys.executable, "-c", "import sys; from isthmus.cli import main; sys.exit(main())",
            *args]


def isthmus(*args: str, timeout: float = 60.0) -> str:
    proc = subprocess.run(isthmus_argv(*args), capture_output=True, text=True, timeout=timeout,
                          check=False, cwd=REPO)
    if proc.returncode != 0:
        raise DeployError(f"isthmus {' '.join(args)}: exit {proc.returncode}: "
                          f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


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


def tar_of(paths: Sequence[Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in paths:
            tar.add(p, arcname=p.name)
    return buf.getvalue()


@dataclass
class Pki:
    """The CA host's directory (`isthmus ca --dir`)."""

    dir: Path

    def ca(self, *args: str) -> str:
        return isthmus("ca", *args, "--dir", str(self.dir))

    def create(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ca("init", "--trust-domain", TRUST_DOMAIN)
        for cluster in REGIONS:
            self.ca("cluster", "--cluster", cluster)

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle.pem"

    def cluster_ca(self, cluster: str) -> tuple[Path, Path]:
        return (self.dir / "clusters" / cluster / "ca.pem",
                self.dir / "clusters" / cluster / "ca.key")


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


# --- configs ----------------------------------------------------------------------------------


def _check(url: str) -> dict[str, Any]:
    return {"http": url, "interval": "1s", "timeout": "1s"}


def edge_workloads(cluster: str) -> list[dict[str, Any]]:
    if cluster == "east":
        return [{"id": "reviews-east-1", "service": "reviews", "address": "10.0.0.10",
                 "ports": {"http": 9080}, "check": _check("http://10.0.0.10:9080/healthz")}]
    return [
        {"id": "reviews-west-1", "service": "reviews", "address": "10.0.0.10",
         "ports": {"http": 9080}, "check": _check("http://10.0.0.10:9080/healthz")},
        {"id": "reviews-west-2", "service": "reviews", "address": WEST_SECOND,
         "ports": {"http": 9080}, "check": _check(f"http://{WEST_SECOND}:9080/healthz")},
        {"id": "ratings-west-1", "service": "ratings", "address": "10.0.0.10",
         "ports": {"http": 9081}, "check": _check("http://10.0.0.10:9081/healthz")},
    ]


def vm_workloads(extra: int = 0) -> list[dict[str, Any]]:
    """The VM's own workload (web), and `extra` more registrations of the same backend (the
    drills' stream of agent registrations)."""
    base = {"service": "web", "address": VM_PRIVATE, "ports": {"http": 8080},
            "check": _check(f"http://{VM_PRIVATE}:8080/healthz")}
    out = [{"id": "east-vm-web", **base}]
    out += [{"id": f"east-vm-web-{i}", **base} for i in range(1, extra + 1)]
    return out


def edge_config(cluster: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    other = "west" if cluster == "east" else "east"
    region = REGIONS[cluster]
    public = EDGE_PUBLIC[cluster]
    cfg: dict[str, Any] = {
        "cluster": cluster,
        "trust_domain": TRUST_DOMAIN,
        "node": f"{cluster}-edge",
        "locality": {"region": region, "zone": f"{region}-1a"},
        "roles": ["control", "ingress", "egress", "dns"],
        "data_dir": "/var/lib/isthmus",
        "trust": {"bundle": f"{PKI_DIR}/bundle.pem", "ca_cert": f"{PKI_DIR}/cluster-ca.pem",
                  "ca_key": f"{PKI_DIR}/cluster-ca.key"},
        "api": {"listen": "127.0.0.1:15000", "token_file": "/etc/isthmus/api-token"},
        "control": {"listen": f"{EDGE_PRIVATE}:{CONTROL_PORT}"},
        "metrics": {"listen": f"{EDGE_PRIVATE}:{METRICS_PORT}"},
        "ingress": {"listen": f"{public}:{INGRESS_PORT}",
                    "public_address": f"{public}:{INGRESS_PORT}"},
        "egress": {"vip_cidr": VIP_CIDR},
        "dns": {"listen": f"{EDGE_PRIVATE}:53"},
        "federation": {
            "peers": [{"cluster": other, "address": f"{EDGE_PUBLIC[other]}:{INGRESS_PORT}"}],
            "export": ["*.default"],
            "peer_unreachable_after": f"{PEER_UNREACHABLE_AFTER:g}s",
        },
        "discovery": {"workloads": edge_workloads(cluster)},
        "log": {"level": "info", "format": "json"},
        "drain_timeout": "5s",
    }
    for key, value in (extra or {}).items():
        cfg[key] = value
    return cfg


def agent_config(extra_workloads: int = 0) -> dict[str, Any]:
    return {
        "cluster": "east",
        "trust_domain": TRUST_DOMAIN,
        "node": "east-vm",
        "locality": {"region": "us-east", "zone": "us-east-1b"},
        "roles": ["agent"],
        "data_dir": "/var/lib/isthmus",
        "trust": {"bundle": f"{PKI_DIR}/bundle.pem"},
        "agent": {"control": f"{EDGE_PRIVATE}:{CONTROL_PORT}",
                  "bootstrap_token_file": "/etc/isthmus/bootstrap-token"},
        "api": {"listen": "127.0.0.1:15000", "token_file": "/etc/isthmus/api-token"},
        "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"},
        "egress": {"vip_cidr": VIP_CIDR},
        "dns": {"listen": f"{VM_PRIVATE}:53"},
        "discovery": {"workloads": vm_workloads(extra_workloads)},
        "log": {"level": "info", "format": "json"},
        "drain_timeout": "5s",
    }


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
        wheels = build_wheelhouse(workdir / "wheels")
        dep.timings["wheelhouse"] = time.monotonic() - t0
        t = time.monotonic()
        dep.pki.create()
        dep._network()
        dep._start_backends()
        archive = tar_of(wheels)
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(lambda a: _install_venv(a.machine, archive), dep.appliances.values()))
        dep.timings["venvs"] = time.monotonic() - t
        t = time.monotonic()
        for edge in dep.edges.values():
            dep._write_edge(edge)
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(_enable_and_wait, dep.edges.values()))
        dep._write_agent()
        _enable_and_wait(dep.vm)
        dep.timings["start"] = time.monotonic() - t
        t = time.monotonic()
        dep.set_weights("reviews", {"east": 20, "west": 80})
        dep.wait_served()
        dep.timings["ready"] = time.monotonic() - t
        dep.timings["total"] = time.monotonic() - t0
        return dep

    def _network(self) -> None:
        """The VIP range is local on every egress (`ip route add local`); east's machines reach
        the public segment through NAT on east-edge; west-service gets a second address."""
        for m in (self.east.machine, self.west.machine, self.vm.machine):
            m.net_run(["ip", "route", "replace", "local", VIP_CIDR, "dev", "lo"])
        edge = self.east.machine
        edge.net_run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        rules = ("table ip isthmus_e2e_nat {\n"
                 " chain postrouting {\n"
                 "  type nat hook postrouting priority srcnat; policy accept;\n"
                 f'  oifname "pub0" ip saddr {EDGE_PRIVATE.rsplit(".", 1)[0]}.0/24 masquerade\n'
                 " }\n}\n")
        edge.net_run(["nft", "-f", "-"], input=rules)
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

    def _write_pki(self, app: Appliance, with_ca: bool) -> None:
        m = app.machine
        m.run(["mkdir", "-p", "-m", "0700", PKI_DIR])
        m.put_file(f"{PKI_DIR}/bundle.pem", self.pki.bundle.read_bytes(), 0o644)
        if with_ca:
            cert, key = self.pki.cluster_ca(app.cluster)
            m.put_file(f"{PKI_DIR}/cluster-ca.pem", cert.read_bytes(), 0o644)
            m.put_file(f"{PKI_DIR}/cluster-ca.key", key.read_bytes(), 0o600)

    def write_config(self, app: Appliance, cfg: dict[str, Any]) -> None:
        app.machine.put_file(CONFIG, yaml.safe_dump(cfg, sort_keys=False), 0o600)

    def _write_edge(self, app: Appliance) -> None:
        self._write_pki(app, with_ca=True)
        self.write_config(app, edge_config(app.cluster))
        _write_unit(app.machine)

    def _write_agent(self) -> None:
        self._write_pki(self.vm, with_ca=False)
        token = self.east.cli("token", "create", "--ttl", "1h", "--node", "east-vm").split()[0]
        self.vm.machine.put_file("/etc/isthmus/bootstrap-token", token + "\n", 0o600)
        self.write_config(self.vm, agent_config())
        _write_unit(self.vm.machine)

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


def _install_venv(m: Machine, archive: bytes) -> None:
    m.run(["mkdir", "-p", WHEELS, str(Path(LOG).parent)])
    m.run(["tar", "-x", "-C", WHEELS], input=archive, text=False, timeout=60)
    m.run(["/usr/bin/python3", "-m", "venv", VENV], timeout=120)
    env = {**MACHINE_ENV, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    m.run([f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", WHEELS, "isthmus"],
          env=env, timeout=300)


def _write_unit(m: Machine) -> None:
    m.put_file(f"/etc/systemd/system/{UNIT}", UNIT_TEXT, 0o644)
    m.run(["systemctl", "daemon-reload"])


def _enable_and_wait(app: Appliance) -> None:
    app.systemctl("enable", "--now", UNIT)
    app.wait_healthy()


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
