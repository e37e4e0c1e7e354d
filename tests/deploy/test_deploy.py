"""The deployment, proven on booted machines: the README's commands (pip wheel, then
ansible-playbook from ansible/ with the example inventory) build a two-cluster federation
with a VM on the testbed; then everything is checked from inside the machines, without
touching the appliances' files.

Needs root, systemd-container and nftables (tests/testbed/README.md) and the `deploy` extra
(ansible-core); run with `python3 -m pytest -q tests/deploy -m deploy`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.testbed import Machine, Testbed

from .ansible_run import EXAMPLE, ROOT, WHEELHOUSE, Ansible, Result, missing_tools

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

CONFIG = "/etc/isthmus/isthmus.yaml"
VM_DNS = "127.0.0.153"  # the agent role's default dns.listen
BACKENDS = (  # (machine, service, port, address): the clusters' applications
    ("east-service", "reviews", 9080, "0.0.0.0"),
    ("west-service", "reviews", 9080, "0.0.0.0"),
    ("west-service", "ratings", 9081, "0.0.0.0"),
    # on the VM bound to its own address: the agent's egress holds the VIPs' ports on lo
    ("east-vm", "details", 9082, "10.0.0.20"),
)


def _skip_without_tools() -> None:
    reason = missing_tools()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def ansible(testbed: Testbed) -> Iterator[Ansible]:
    """The README's first step on the controller side: the offline wheelhouse, built where
    there is a package index (the host's namespace; the controller and machines have none)."""
    _skip_without_tools()
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(WHEELHOUSE),
                    "."], cwd=ROOT, check=True, timeout=600, capture_output=True)
    runner = Ansible(testbed, testbed.dir / "ca")
    runner.log.append(("pip wheel", time.monotonic() - t, 0))
    backends = [testbed[m].start_backend(s, p, address=a) for m, s, p, a in BACKENDS]
    try:
        yield runner
    finally:
        for b in backends:
            b.stop()
        for what, seconds, rc in runner.log:
            print(f"deploy timing: {seconds:6.1f} s  rc={rc}  {what}")


@pytest.fixture(scope="module")
def deployed(ansible: Ansible) -> Ansible:
    """`ansible-playbook -i inventories/example playbooks/site.yml`, once for the module."""
    result = ansible.playbook("site.yml")
    assert result.rc == 0, result.tail()
    assert set(result.recap) == {"east-edge", "west-edge", "east-vm"}, result.tail()
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in result.recap.values())
    return ansible


def eventually(probe, what: str, timeout: float = 60.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def api(machine: Machine, path: str) -> object:
    """GET the control API on a machine from inside it, with the token the deployment wrote
    (read, never changed)."""
    script = ("import json,sys,urllib.request\n"
              "tok=open('/etc/isthmus/api-token').read().strip()\n"
              "r=urllib.request.Request('http://127.0.0.1:15000'+sys.argv[1],"
              "headers={'Authorization':'Bearer '+tok})\n"
              "print(urllib.request.urlopen(r,timeout=10).read().decode())\n")
    return json.loads(machine.run(["/usr/bin/python3", "-c", script, path]).stdout)


def calls(vm: Machine, name: str, port: int, n: int) -> list[str]:
    """n GETs from the VM to a service's global name, each on a new connection; the cluster
    of the backend that answered each (\"error\" for a failure)."""
    script = (
        "import json,socket,sys,urllib.request\n"
        "ip=socket.gethostbyname(sys.argv[1])\n"
        "for _ in range(int(sys.argv[3])):\n"
        "    try:\n"
        "        b=urllib.request.urlopen(f'http://{ip}:{sys.argv[2]}/',timeout=5).read()\n"
        "        print(json.loads(b)['cluster'])\n"
        "    except Exception as e:\n"
        "        print('error', e)\n")
    out = vm.run(["/usr/bin/python3", "-c", script, name, str(port), str(n)], timeout=120)
    return [line.split()[0] for line in out.stdout.splitlines()]


def unit_start(machine: Machine) -> tuple[str, str]:
    out = machine.run(["systemctl", "show", "-p", "MainPID", "-p",
                       "ActiveEnterTimestampMonotonic", "isthmus.service"]).stdout
    props = dict(line.split("=", 1) for line in out.split())
    return props["MainPID"], props["ActiveEnterTimestampMonotonic"]


# --- before anything is deployed ------------------------------------------------------------


def test_a_missing_or_mistyped_variable_stops_the_run_before_any_change(
    ansible: Ansible, testbed: Testbed, tmp_path: Path,
) -> None:
    broken = tmp_path / "inventory"
    shutil.copytree(EXAMPLE, broken)
    all_vars = broken / "group_vars" / "all.yml"
    raw = yaml.safe_load(all_vars.read_text())
    del raw["isthmus_trust_domain"]
    all_vars.write_text(yaml.safe_dump(raw))
    result = ansible.playbook("site.yml", inventory=broken)
    assert result.rc != 0, result.tail()
    assert "isthmus_trust_domain" in result.output, result.tail()
    assert all(r["changed"] == 0 for r in result.recap.values()), result.recap

    mistyped = ansible.playbook("site.yml", "-e", "gateway_log_level=verbose")
    assert mistyped.rc != 0
    assert "gateway_log_level" in mistyped.output and "verbose" in mistyped.output
    assert all(r["changed"] == 0 for r in mistyped.recap.values()), mistyped.recap

    # nothing was made anywhere: no software, no config, no root on the CA host
    for name in ("east-edge", "west-edge", "east-vm"):
        m = testbed[name]
        assert m.run(["test", "-e", "/opt/isthmus"], check=False).returncode == 1, name
        assert m.run(["test", "-e", "/etc/isthmus"], check=False).returncode == 1, name
    assert not ansible.ca_dir.exists()


# --- the federation the three commands build ------------------------------------------------


def test_the_vm_resolves_global_names_and_reaches_west_over_the_public_segment(
    deployed: Ansible, testbed: Testbed,
) -> None:
    vm = testbed["east-vm"]
    # its resolver is the machine's: both dig at it and the libc resolver answer
    dig = vm.run(["dig", f"@{VM_DNS}", "+short", "ratings.default.global"]).stdout.split()
    assert len(dig) == 1 and dig[0].startswith("240.240."), dig
    libc = vm.run(["getent", "ahostsv4", "ratings.default.global"]).stdout.split()
    assert libc[0] == dig[0]
    # ratings runs only in west (10.0.0.10 there; east's 10.0.0.10 is another machine), so an
    # answer from west-service crossed the public segment: VIP -> the VM's egress -> east's
    # edge (masquerade) -> west's ingress -> west-service.
    out = vm.run(["curl", "-sS", "-m", "10", f"http://{dig[0]}:9081/"]).stdout
    body = json.loads(out)
    assert (body["service"], body["cluster"], body["host"]) == ("ratings", "west",
                                                                "west-service"), body
    # the VIP range is a local route on the VM, put there by the deployment
    routes = vm.run(["ip", "route", "show", "table", "local"]).stdout
    assert "local 240.240.0.0/16 dev lo" in routes


def test_the_edges_only_public_listener_is_the_ingress(
    deployed: Ansible, testbed: Testbed,
) -> None:
    for name in ("east-edge", "west-edge"):
        edge = testbed[name]
        tcp = sorted({lst.port for lst in edge.listeners("public", "tcp")})
        udp = sorted({lst.port for lst in edge.listeners("public", "udp")})
        assert (tcp, udp) == ([15443], []), (name, edge.listeners("public", "tcp"),
                                             edge.listeners("public", "udp"))
        ps = edge.run(["ps", "-o", "user=", "-C", "isthmus"], check=False).stdout.split()
        assert ps and set(ps) == {"isthmus"}, ps  # its own user, not root


def test_a_west_backend_shows_up_at_easts_api(deployed: Ansible, testbed: Testbed) -> None:
    east = testbed["east-edge"]

    def ratings() -> dict | None:
        svc = api(east, "/v1/services/default/ratings")
        return svc if svc.get("clusters", {}).get("west", {}).get("healthy") == 1 else None

    svc = eventually(ratings, "ratings healthy in west, seen from east")
    assert "east" not in svc["clusters"]
    peers = api(east, "/v1/peers")
    assert [(p["cluster"], p["state"]) for p in peers] == [("west", "connected")]
    # the VM's workload, registered by its agent, health-checked by east's control node
    details = eventually(lambda: (lambda w: w if w.get("health") == "passing" else None)(
        api(east, "/v1/workloads/east-vm-details")), "the VM's workload passing")
    assert details["address"] == "10.0.0.20"


def test_the_unit_is_hardened(deployed: Ansible, testbed: Testbed) -> None:
    for name in ("east-edge", "east-vm"):
        out = testbed[name].run(["systemd-analyze", "security", "--no-pager",
                                 "isthmus.service"]).stdout
        score = float(out.strip().splitlines()[-1].split("isthmus.service:")[1].split()[0])
        print(f"systemd-analyze security exposure {name}: {score}")
        assert score <= 2.0, out[-2000:]
    mode = testbed["east-edge"].run(["stat", "-c", "%a %U", "/etc/isthmus/api-token",
                                     "/etc/isthmus/pki/cluster-ca.key"]).stdout.split("\n")
    assert mode[:2] == ["600 isthmus", "600 isthmus"], mode


def test_shift_traffic_moves_a_measured_share(deployed: Ansible, testbed: Testbed) -> None:
    vm = testbed["east-vm"]

    def shift(east: int, west: int) -> Result:
        extra = json.dumps({"isthmus_traffic": [
            {"service": "reviews.default", "weights": {"east": east, "west": west}}]})
        result = deployed.playbook("shift-traffic.yml", "-e", extra)
        assert result.rc == 0, result.tail()
        return result

    shift(100, 0)
    eventually(lambda: set(calls(vm, "reviews.default.global", 9080, 20)) == {"east"},
               "all of reviews in east")
    first = shift(20, 80)
    assert sum(first.changed().values()) == 1  # one write, federation-wide
    eventually(lambda: "west" in calls(vm, "reviews.default.global", 9080, 20),
               "reviews shifting to west")
    got = calls(vm, "reviews.default.global", 9080, 200)
    assert "error" not in got, got
    west = got.count("west") / len(got)
    # 80 % expected; binomial sd for 200 draws is 2.8 %: 4.5 sd each side
    print(f"shift-traffic: weights east=20 west=80, measured west share {west:.3f} of 200")
    assert 0.67 <= west <= 0.93, got
    # the same weights again change nothing
    again = shift(20, 80)
    assert sum(again.changed().values()) == 0, again.tail()


def test_check_diff_shows_a_change_and_changes_nothing(
    deployed: Ansible, testbed: Testbed,
) -> None:
    east = testbed["east-edge"]
    before_file = east.read_file(CONFIG)
    before_unit = unit_start(east)
    result = deployed.playbook("site.yml", "--check", "--diff", "-e", "gateway_log_level=debug")
    assert result.rc == 0, result.tail()
    assert "-  level: info" in result.output and "+  level: debug" in result.output, \
        result.tail(120)
    assert result.recap["east-edge"]["changed"] >= 1
    assert east.read_file(CONFIG) == before_file
    assert unit_start(east) == before_unit


def test_a_second_run_of_every_playbook_changes_nothing(
    deployed: Ansible, testbed: Testbed,
) -> None:
    weights = json.dumps({"isthmus_traffic": [
        {"service": "reviews.default", "weights": {"east": 20, "west": 80}}]})
    for playbook, args in (("site.yml", ()), ("vm.yml", ()), ("shift-traffic.yml",
                                                               ("-e", weights))):
        result = deployed.playbook(playbook, *args)
        assert result.rc == 0, result.tail()
        assert result.recap and set(result.changed().values()) == {0}, (playbook,
                                                                         result.tail(80))


def test_the_modules_register_idempotently_with_check_and_diff(
    deployed: Ansible, testbed: Testbed,
) -> None:
    args = json.dumps({"id": "batch-1", "service": "batch.jobs", "address": "10.0.0.10",
                       "ports": {"tcp": 7000}, "check": {"ttl": "1m"}})
    check = deployed.module("east-edge", "isthmus.appliance.workload", args, "--check", "--diff")
    assert check.rc == 0 and '"changed": true' in check.output, check.tail()
    east = testbed["east-edge"]
    assert api(east, "/v1/workloads?service=batch.jobs") == []
    first = deployed.module("east-edge", "isthmus.appliance.workload", args)
    assert first.rc == 0 and '"changed": true' in first.output, first.tail()
    again = deployed.module("east-edge", "isthmus.appliance.workload",
                            args.replace('"1m"', '"60s"'))  # the same duration, spelled anew
    assert again.rc == 0 and '"changed": false' in again.output, again.tail()
    [stored] = api(east, "/v1/workloads?service=batch.jobs")
    assert stored["check"] == {"ttl": "1m"}
    gone = deployed.module("east-edge", "isthmus.appliance.workload",
                           json.dumps({"id": "batch-1", "state": "absent"}))
    assert gone.rc == 0 and '"changed": true' in gone.output, gone.tail()
    assert api(east, "/v1/workloads?service=batch.jobs") == []
    refused = deployed.module("east-edge", "isthmus.appliance.workload",
                              json.dumps({"id": "east-reviews-1", "service": "reviews",
                                          "address": "10.0.0.99", "ports": {"http": 1}}))
    assert refused.rc != 0 and "409" in refused.output, refused.tail()


def test_an_unreachable_machine_fails_alone_and_the_others_are_deployed(
    deployed: Ansible, testbed: Testbed,
) -> None:
    vm, east, west = testbed["east-vm"], testbed["east-edge"], testbed["west-edge"]
    before = unit_start(east)
    vm.poweroff()
    try:
        result = deployed.playbook("site.yml", "-e", "gateway_log_level=debug")
        assert result.rc != 0
        recap = result.recap
        assert recap["east-vm"]["unreachable"] == 1, result.tail()
        for edge in ("east-edge", "west-edge"):
            assert recap[edge]["failed"] == 0 and recap[edge]["unreachable"] == 0, recap
            assert recap[edge]["changed"] >= 1, recap
        for edge in (east, west):
            assert yaml.safe_load(edge.read_file(CONFIG))["log"]["level"] == "debug"
        # a log level is applied live: reloaded with SIGHUP, not restarted
        assert unit_start(east) == before
    finally:
        vm.boot()
        # the VM's own application is no unit of the deployment: it comes back by hand
        for m, service, port, address in BACKENDS:
            if m == "east-vm":
                vm.start_backend(service, port, address=address)
        restore = deployed.playbook("vm.yml")
    assert restore.rc == 0, restore.tail()
    assert restore.recap["east-vm"]["changed"] == 0, restore.tail()  # it was deployed before
    # the VM's agent came back with its machine, and serves as before
    eventually(lambda: calls(vm, "ratings.default.global", 9081, 3) == ["west"] * 3,
               "the VM calling west again")


def test_a_change_of_the_vms_workloads_reloads_the_agent(
    deployed: Ansible, testbed: Testbed,
) -> None:
    """agent_workloads is applied live: vm.yml reloads the agent (SIGHUP), which registers the
    new workload with its control node and, on the way back, removes it; never a restart."""
    vm, east = testbed["east-vm"], testbed["east-edge"]
    example = yaml.safe_load((EXAMPLE / "group_vars" / "isthmus_agents.yml").read_text())
    workloads = example["agent_workloads"]
    extra = {**workloads[0], "id": "east-vm-details-2"}
    before = unit_start(vm)
    grown = deployed.playbook("vm.yml", "-e", json.dumps({"agent_workloads": [*workloads,
                                                                               extra]}))
    assert grown.rc == 0, grown.tail()
    assert grown.recap["east-vm"]["changed"] >= 1, grown.tail()
    try:
        eventually(lambda: [w for w in api(east, "/v1/workloads?service=details.default")
                            if w["id"] == "east-vm-details-2" and w["health"] == "passing"],
                   "the new VM workload passing at east")
    except AssertionError as e:
        journal = vm.run(["journalctl", "-u", "isthmus.service", "-n", "80", "--no-pager"])
        raise AssertionError(
            f"{e}\nat east: {api(east, '/v1/workloads?service=details.default')}"
            f"\nthe VM's agent:\n{journal.stdout}") from None
    back = deployed.playbook("vm.yml")
    assert back.rc == 0, back.tail()
    eventually(lambda: [w["id"] for w in api(east, "/v1/workloads?service=details.default")]
               == ["east-vm-details"], "the extra VM workload gone from east")
    assert unit_start(vm) == before  # reloaded, never restarted


def _issuer_root(machine: Machine) -> str:
    """The CN of the root that the machine's own identity chains to (through its CA)."""
    shown = machine.run(["/opt/isthmus/venv/bin/isthmus", "ca", "show",
                         "/var/lib/isthmus/pki/node.pem"]).stdout
    ca_part = shown.split("[1]")[1]
    return ca_part.split("issuer:")[1].splitlines()[0].strip()


def _bundle_subjects(pem: bytes) -> list[str]:
    from cryptography import x509

    return [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(pem)]


BUNDLES = (("east-edge", "/etc/isthmus/pki/bundle.pem"),
           ("west-edge", "/etc/isthmus/pki/bundle.pem"),
           ("east-vm", "/var/lib/isthmus/pki/bundle.pem"))


def test_rotate_ca_start_then_finish_rotates_the_root_with_everything_live(
    deployed: Ansible, testbed: Testbed,
) -> None:
    """rotate-ca.yml (docs/operations.md "Root rotation"), applied live with SIGHUP: started
    with agents left to their half-life renewal, the finish phase refuses while the VM's
    identity is under the old root; the start phase again renews the VM (and changes nothing
    on the edges); the finish then retires the old root, and traffic flows all along."""
    vm, east = testbed["east-vm"], testbed["east-edge"]
    old_root = _issuer_root(east)
    units = {n: unit_start(testbed[n]) for n in ("east-edge", "west-edge", "east-vm")}

    start = deployed.playbook("rotate-ca.yml", "-e", "isthmus_rotation_renew_agents=false")
    assert start.rc == 0, start.tail()
    new_roots = {_issuer_root(testbed[n]) for n in ("east-edge", "west-edge")}
    assert len(new_roots) == 1 and old_root not in new_roots, (old_root, new_roots)
    [new_root] = new_roots
    assert _issuer_root(vm) == old_root
    for name, bundle in BUNDLES:
        assert len(_bundle_subjects(testbed[name].read_file(bundle))) == 2, name
    eventually(lambda: calls(vm, "ratings.default.global", 9081, 3) == ["west"] * 3,
               "the VM calling west across the rotation")

    early = deployed.playbook("rotate-ca.yml", "-e", "isthmus_rotation=finish")
    assert early.rc != 0
    assert "east-vm still holds an identity issued under the old root" in early.output, \
        early.tail()
    assert (deployed.ca_dir / "bundle.pem").read_text().count("BEGIN CERTIFICATE") == 2

    # the start phase again continues the rotation: the VM renews (SIGHUP) under the new root
    again = deployed.playbook("rotate-ca.yml")
    assert again.rc == 0, again.tail()
    assert again.changed()["east-vm"] >= 1 and _issuer_root(vm) == new_root, again.tail()
    assert again.changed()["west-edge"] == 0, again.tail()  # its CA is under the new root

    finish = deployed.playbook("rotate-ca.yml", "-e", "isthmus_rotation=finish")
    assert finish.rc == 0, finish.tail()
    ca_host = _bundle_subjects((deployed.ca_dir / "bundle.pem").read_bytes())
    assert ca_host == [new_root], ca_host
    for name, bundle in BUNDLES:
        assert _bundle_subjects(testbed[name].read_file(bundle)) == [new_root], name
        assert _issuer_root(testbed[name]) == new_root, name
    # applied live: not one appliance restarted (the same main process throughout)
    assert {n: unit_start(testbed[n]) for n in units} == units
    eventually(lambda: calls(vm, "ratings.default.global", 9081, 3) == ["west"] * 3,
               "the VM calling west after the old root is gone")
    assert calls(vm, "reviews.default.global", 9080, 10).count("error") == 0
