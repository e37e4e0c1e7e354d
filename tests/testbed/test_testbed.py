"""The testbed itself: booted machines, SSH from the controller, the networks' shape (overlap,
isolation, no way out to the host), machine operations, teardown and leftovers.

Needs root and systemd-container (skipped otherwise); marked `testbed`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed import (
    EDGE_PUBLIC,
    MGMT_CIDR,
    PRIVATE_CIDR,
    PUBLIC_CIDR,
    PUBLIC_ROUTER,
    SERVICE_PRIVATE,
    VM_PRIVATE,
    Backend,
    Leg,
    NodeSpec,
    Testbed,
    runs,
    single,
)

pytestmark = pytest.mark.testbed

REPO = Path(__file__).resolve().parents[2]
TESTBED_RANGES = [ipaddress.ip_network(c) for c in (PUBLIC_CIDR, PRIVATE_CIDR, MGMT_CIDR)]
NOT_REACHED = ("timeout", "unreachable")  # "refused" would mean the address answered


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    """Backends a test starts on the shared testbed; stopped after the test."""
    started: list[Backend] = []
    yield started
    for b in started:
        if b.machine.is_running():
            b.stop()


def processes_naming(text: str) -> list[tuple[int, str]]:
    """Processes whose command line contains text."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = runs.cmdline(int(entry.name))
            if any(text in a for a in argv):
                found.append((int(entry.name), " ".join(argv)))
    return found


def netns_inodes_in_use() -> set[int]:
    inodes = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                inodes.add(os.stat(f"/proc/{entry.name}/ns/net").st_ino)
    return inodes


# --- the machines ----------------------------------------------------------------------------


def test_every_machine_booted_with_its_own_systemd(testbed: Testbed) -> None:
    assert set(testbed.machines) == {"east-edge", "east-service", "east-vm", "west-edge",
                                     "west-service"}
    for name, m in testbed.machines.items():
        state = m.system_state()
        # degraded is acceptable only with its reason: the failed units are in the message
        assert state.state in ("running", "degraded"), f"{name}: {state}"
        if state.state == "degraded":
            assert state.failed_units, f"{name}: degraded without a failed unit"
            print(f"{name}: {state}")
        assert m.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
        assert m.pid1 is not None and m.pid1 != 1
        assert m.run(["hostname"]).stdout.strip() == name
        # Debian's Python, the one a deployment installs into /opt/isthmus/venv
        version = m.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"])
        assert version.stdout.strip() == "(3, 11)"
        mounts = m.run(["findmnt", "-rn", "-o", "TARGET,FSTYPE"]).stdout.split("\n")
        assert "/etc overlay" in mounts and "/opt overlay" in mounts
        assert any(line.startswith("/var/lib/isthmus ") for line in mounts)


def test_each_machine_has_its_own_identity(testbed: Testbed) -> None:
    ids = {m.run(["cat", "/etc/machine-id"]).stdout.strip() for m in testbed.machines.values()}
    assert len(ids) == len(testbed.machines)
    host_keys = {m.run(["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout.split()[1]
                 for m in testbed.machines.values()}
    assert len(host_keys) == len(testbed.machines)


def test_ssh_from_the_controller_reaches_every_machine_with_the_run_key(
    testbed: Testbed, tmp_path: Path
) -> None:
    for name in testbed.machines:
        out = testbed.ssh(name, ["sh", "-c", "hostname; id -un"], timeout=30).stdout.split()
        assert out == [name, "root"]
    # The run's key is what lets the controller in: another key, or no key at all (there is
    # no password authentication), is refused.
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True, timeout=15)
    common = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
              "-o", f"UserKnownHostsFile={testbed.known_hosts}", "-o",
              "StrictHostKeyChecking=yes", "-o", "IdentityAgent=none"]
    target = f"root@{testbed['east-edge'].mgmt_address}"
    for extra in (["-i", str(stranger)], ["-o", "PubkeyAuthentication=no"]):
        denied = testbed.controller.run([*common, *extra, target, "true"], check=False,
                                        timeout=30)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, extra
    ok = testbed.controller.run([*common, "-i", str(testbed.private_key), target, "true"],
                                timeout=30)
    assert ok.returncode == 0
    # Strict host key checking with the run's known_hosts: the machine's own key is expected.
    assert oct(testbed.private_key.stat().st_mode & 0o777) == "0o600"
    assert oct(testbed.dir.stat().st_mode & 0o777) == "0o700"


def test_sshd_listens_on_the_management_address_only(testbed: Testbed) -> None:
    for name, m in testbed.machines.items():
        sshd = [lst for lst in m.listeners(segment=None) if "sshd" in lst.process]
        assert [(lst.address, lst.port) for lst in sshd] == [(m.mgmt_address, 22)], name
    for edge in ("east-edge", "west-edge"):
        assert testbed[edge].listeners("public") == [], edge


def test_host_units_are_masked_and_host_sshd_is_not_running(testbed: Testbed) -> None:
    m = testbed["east-edge"]
    # Nothing but the machine's own sshd answers on port 22 in the host's main namespace.
    host = subprocess.run(["ss", "-H", "-ltn", "sport = :22"], capture_output=True, text=True,
                          timeout=10, check=True)
    assert host.stdout.strip() == ""
    for unit in ("apt-daily.timer", "unbound.service", "haproxy.service", "postgresql.service"):
        if Path(f"/etc/systemd/system/timers.target.wants/{unit}").exists() or Path(
                f"/etc/systemd/system/multi-user.target.wants/{unit}").exists():
            assert m.run(["systemctl", "is-enabled", unit], check=False).stdout.strip() == \
                "masked"


# --- the networks ----------------------------------------------------------------------------


def test_private_ranges_overlap_and_clusters_are_isolated(
    testbed: Testbed, backends: list[Backend]
) -> None:
    east, west = testbed["east-service"], testbed["west-service"]
    assert east.private_address == west.private_address == SERVICE_PRIVATE
    assert f"{SERVICE_PRIVATE}/24" in east.ip_addresses()["priv0"]
    assert f"{SERVICE_PRIVATE}/24" in west.ip_addresses()["priv0"]
    backends.append(east.start_backend("probe", 9080))
    backends.append(west.start_backend("probe", 9080))
    backends.append(testbed["east-vm"].start_backend("vmprobe", 9081))

    # The same address answers as a different machine in each cluster.
    _, body = testbed["east-vm"].http_get(f"http://{SERVICE_PRIVATE}:9080/")
    assert json.loads(body)["host"] == "east-service"
    _, body = testbed["west-edge"].http_get(f"http://{SERVICE_PRIVATE}:9080/")
    assert json.loads(body)["host"] == "west-service"

    # An address that exists only in east is reachable in east and nowhere in west.
    assert testbed["east-service"].connect(VM_PRIVATE, 9081) == "connected"
    assert west.connect(VM_PRIVATE, 9081, timeout=1) in NOT_REACHED
    assert testbed["west-edge"].connect(VM_PRIVATE, 9081, timeout=1) in NOT_REACHED


def test_management_segment_is_no_path_between_machines(testbed: Testbed) -> None:
    # Machines' ports on the management bridge are isolated: the controller reaches them,
    # they do not reach each other (so it is no side channel between the clusters).
    west_edge = testbed["west-edge"].mgmt_address
    assert testbed.controller.connect(west_edge, 22) == "connected"
    assert testbed["east-vm"].connect(west_edge, 22, timeout=1) in NOT_REACHED


def test_edges_reach_each_other_over_the_public_segment(
    testbed: Testbed, backends: list[Backend]
) -> None:
    for cluster, other in (("east", "west"), ("west", "east")):
        edge = testbed[f"{cluster}-edge"]
        backends.append(edge.start_backend("edgeprobe", 8081, address=EDGE_PUBLIC[cluster]))
        status, body = testbed[f"{other}-edge"].http_get(f"http://{EDGE_PUBLIC[cluster]}:8081/")
        assert status == 200 and json.loads(body)["host"] == f"{cluster}-edge"
    for name in ("east-edge", "west-edge"):
        routes = {r["dst"]: r.get("gateway") for r in testbed[name].routes()}
        assert routes["default"] == "198.51.100.1"


def test_service_machines_cannot_reach_the_public_segment(
    testbed: Testbed, backends: list[Backend]
) -> None:
    for cluster in ("east", "west"):
        backends.append(testbed[f"{cluster}-edge"].start_backend(
            "edgeprobe", 8082, address=EDGE_PUBLIC[cluster]))
    assert testbed["east-edge"].connect(EDGE_PUBLIC["west"], 8082) == "connected"
    for name in ("east-service", "east-vm", "west-service"):
        m = testbed[name]
        other = "west" if m.cluster == "east" else "east"
        assert {r["dst"]: r.get("gateway") for r in m.routes()}["default"] == "10.0.0.2"
        # Their default route leads to their edge, which does not forward. (The edge's own
        # public address answers them: it is an address of their gateway, not the segment.)
        assert m.connect(EDGE_PUBLIC[other], 8082, timeout=1) in NOT_REACHED, name
        # The public segment's own address answers anything that reaches it (with a reset).
        assert m.connect(PUBLIC_ROUTER, 80, timeout=1) in NOT_REACHED, name
    assert testbed["east-edge"].connect(PUBLIC_ROUTER, 80) == "refused"


def test_the_host_main_namespace_has_no_route_or_address_in_testbed_ranges(
    testbed: Testbed,
) -> None:
    # Checked by reading tables only: nothing is sent from the host's namespace.
    routes = json.loads(subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"],
                                       capture_output=True, text=True, check=True,
                                       timeout=10).stdout)
    for r in routes:
        if r["dst"] in ("default", "0.0.0.0/0"):
            continue  # the host's own way out; nothing in the testbed is routed through it
        net = ipaddress.ip_network(r["dst"], strict=False)
        assert not any(net.overlaps(n) for n in TESTBED_RANGES), r
    addrs = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True,
                                      text=True, check=True, timeout=10).stdout)
    for link in addrs:
        for a in link.get("addr_info", []):
            assert not any(ipaddress.ip_address(a["local"]) in n for n in TESTBED_RANGES), a
    links = {link["ifname"] for link in json.loads(subprocess.run(
        ["ip", "-j", "link"], capture_output=True, text=True, check=True, timeout=10).stdout)}
    assert not links & ({"br0", "pub0", "priv0", "mgmt0"} | set(testbed.nodes))


# --- machine operations ----------------------------------------------------------------------


def test_link_down_and_up_on_the_public_segment(
    testbed: Testbed, backends: list[Backend]
) -> None:
    west = testbed["west-edge"]
    backends.append(west.start_backend("edgeprobe", 8083, address=EDGE_PUBLIC["west"]))
    east = testbed["east-edge"]
    assert east.connect(EDGE_PUBLIC["west"], 8083) == "connected"
    try:
        west.link_down("public")
        assert west.link_state("public")["switch"] == "DOWN"
        assert east.connect(EDGE_PUBLIC["west"], 8083, timeout=1) in NOT_REACHED
        # its private leg is untouched
        assert testbed["west-service"].connect("10.0.0.2", 22, timeout=1) == "refused"
    finally:
        west.link_up("public")
    assert east.connect(EDGE_PUBLIC["west"], 8083) == "connected"


def test_host_programs_run_on_a_machines_network(
    testbed: Testbed, backends: list[Backend]
) -> None:
    # net_run: the host's own tools and Python (with the project's packages) on the VM's
    # network, as a load generator would run; run: inside the machine's own file system.
    vm = testbed["east-vm"]
    backends.append(testbed["east-service"].start_backend("probe", 9085))
    here = vm.net_run([sys.executable, "-c", "import aiohttp, sys; print(sys.prefix)"])
    assert here.stdout.strip() == sys.prefix
    assert vm.net_run(["test", "-d", str(REPO)], check=False).returncode == 0
    assert vm.run(["test", "-d", str(REPO)], check=False).returncode != 0  # not in the machine
    script = ("import json, sys, urllib.request; "
              "print(json.load(urllib.request.urlopen(sys.argv[1], timeout=5))['host'])")
    out = vm.net_run([sys.executable, "-c", script, f"http://{SERVICE_PRIVATE}:9085/"])
    assert out.stdout.strip() == "east-service"


def test_a_probe_host_joins_the_public_segment(testbed: Testbed, backends: list[Backend]) -> None:
    backends.append(testbed["west-edge"].start_backend("edgeprobe", 8084,
                                                       address=EDGE_PUBLIC["west"]))
    probe = testbed.add_node(NodeSpec("probe", (Leg("public", "198.51.100.66", "pub0"),),
                                      boot=False, role="hostile"))
    try:
        status, body = probe.http_get(f"http://{EDGE_PUBLIC['west']}:8084/")
        assert status == 200 and json.loads(body)["host"] == "west-edge"
        assert probe.connect(SERVICE_PRIVATE, 9080, timeout=1) in NOT_REACHED
    finally:
        testbed.remove_node("probe")
    assert "probe" not in testbed.nodes
    assert runs.node_netns(testbed.run_id, "probe") not in runs.list_netns()


def test_a_machine_keeps_etc_opt_and_var_lib_isthmus_across_poweroff_and_kill(
    testbed_factory,
) -> None:
    tb = testbed_factory(single())
    m = tb["solo"]
    m.put_file("/etc/isthmus/config.yaml", "cluster: solo\n", 0o600)
    m.put_file("/opt/isthmus/marker", "opt\n")
    m.put_file("/var/lib/isthmus/catalog.db", "state\n")
    m.put_file("/var/tmp/scratch", "gone after a boot\n")
    m.run(["useradd", "--system", "--no-create-home", "isthmus"])
    first_pid1 = m.pid1

    m.poweroff()
    assert m.pid1 is None and not m.is_running()
    assert m.boot().ok
    assert m.pid1 not in (None, first_pid1)
    check = ("cat /etc/isthmus/config.yaml /opt/isthmus/marker /var/lib/isthmus/catalog.db; "
             "stat -c %a /etc/isthmus/config.yaml; id -un isthmus; ls /var/tmp")
    out = m.sh(check).stdout.split()
    assert out[:6] == ["cluster:", "solo", "opt", "state", "600", "isthmus"]
    assert "scratch" not in out

    m.kill()  # a power cut: SIGKILL to PID 1
    assert m.pid1 is None
    assert m.boot().ok
    assert m.sh(check).stdout.split()[:6] == out[:6]
    assert tb.ssh("solo", "hostname").stdout.strip() == "solo"  # sshd is back too
    assert m.read_file("/var/lib/isthmus/catalog.db") == b"state\n"


# --- teardown and leftovers ------------------------------------------------------------------


def test_teardown_removes_every_namespace_bridge_machine_and_process(testbed: Testbed) -> None:
    tb = Testbed.up()
    try:
        rid = tb.run_id
        netns = set(tb.walk_netns())
        assert netns <= set(runs.list_netns())
        inodes = {os.stat(f"/run/netns/{ns}").st_ino for ns in netns}
        pids = {m.nspawn_pid for m in tb.machines.values()} | {m.pid1 for m in
                                                                tb.machines.values()}
        assert None not in pids and processes_naming(f"itb-{rid}-")
        bridge = tb.segment_netns("public")
        assert "br0" in subprocess.run(["ip", "-n", bridge, "-br", "link"], capture_output=True,
                                       text=True, check=True, timeout=10).stdout
    finally:
        tb.down()

    assert not (netns & set(runs.list_netns())), "namespaces left"  # the bridges were in them
    assert not (inodes & netns_inodes_in_use()), "a process still runs in a testbed namespace"
    assert processes_naming(f"itb-{rid}-") == []
    assert all(runs.process_start(p) is None for p in pids if p)
    assert runs.remains(rid).empty(), runs.remains(rid).describe()
    assert not tb.dir.exists() and not runs.state_path(rid).exists()
    # Another testbed (the session's, owned by this live process) was not touched.
    assert all(m.is_running() for m in testbed.machines.values())
    print(f"up {tb.timings['up']:.1f} s, down {tb.timings['down']:.1f} s")


def test_a_killed_runs_leftovers_are_removed_by_the_next_up(
    testbed: Testbed, testbed_factory
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.testbed", "up", "--topology", "single", "--hold"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    rid = None
    lines = []
    watchdog = threading.Timer(60, proc.kill)  # bounds the wait for its "holding" line
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("holding testbed "):
                rid = line.split()[2].rstrip(";")
                break
        assert rid, "".join(lines)
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGKILL)  # no teardown: everything it built stays behind
        proc.wait(10)
        proc.stdout.close()
    left = runs.remains(rid)
    assert left.machines and left.netns and left.dirs and left.state_files
    assert not runs.is_live(rid)

    tb = testbed_factory(single())
    assert tb.run_id != rid
    assert runs.remains(rid).empty(), runs.remains(rid).describe()
    assert processes_naming(f"itb-{rid}-") == []
    # The session's testbed belongs to a live process: the cleanup left it alone.
    assert all(m.is_running() for m in testbed.machines.values())
    assert not runs.remains(testbed.run_id).empty()
