"""The seven failure drills of RELIABILITY.md, on booted machines, under a steady load from the
VM in east (load.py). Each drill bounds its duration, restores the federation at its end (and
`ensure_baseline` puts back whatever a failed one left), and writes its figures as JSON
(harness.RESULTS).

    python3 -m pytest -q -m e2e tests/e2e            # as root

Load: reviews (east 1 backend, west 2; weights east=20 west=80) and web (the VM's own workload),
two keep-alive connections and one new connection per request for each, 20 requests/s each,
plus 5 lookups/s per name at the VM's resolver.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.hlc import Stamp

from .deploy import PEER_UNREACHABLE_AFTER, TRUST_DOMAIN, Deployment, metric_sum, wait_until
from .faults import (
    BASELINE_WEIGHTS,
    PolicyWriter,
    agent_registrations,
    crash,
    cut,
    dns_storm,
    edge_off,
    edge_on,
    ensure_baseline,
    federation_sni,
    flood,
    handshake_failures,
    heal,
    healthy_count,
    hostile,
    identity_serial,
    ingress,
    intruder,
    kill_backends,
    log_count,
    peer_state,
    read_snapshot,
    reload_all,
    restore_backends,
    service_sni,
    set_vm_workloads,
    status_peer_line,
)
from .harness import RESULTS, LoadRun, reporting
from .rotation import PlaybookRotation, chains_to, fingerprints
from .stats import first_answer_from, moved_after, select, summarize

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUIET = 8.0  # seconds of load before each fault: the quiet window
COMMAND = "python3 -m pytest -q -m e2e tests/e2e/test_drills.py -k {}"


@pytest.fixture
def dep(deployment: Deployment) -> Iterator[Deployment]:
    ensure_baseline(deployment)
    yield deployment


@pytest.fixture
def csv(request: pytest.FixtureRequest) -> Path:
    return RESULTS / "load" / f"{request.node.name}.csv"


@pytest.mark.timeout(240)
def test_drill_1_backends_die(dep: Deployment, csv: Path) -> None:
    """Every reviews backend in west is killed under load: no request fails, traffic moves to
    east, and comes back when they do."""
    with reporting("1-backends-die", COMMAND.format("drill_1")) as rep:
        with LoadRun(dep, csv) as load:
            t_quiet = rep.event("load running")
            time.sleep(QUIET)
            t_kill = rep.event("kill -9 both reviews backends of west")
            kill_backends(dep)
            wait_until(lambda: healthy_count(dep, "east", "reviews", "west") == 0, 30,
                       "east sees no healthy reviews in west")
            t_seen = rep.event("east's routing table: reviews in west 0 healthy")
            time.sleep(8)
            t_restore = rep.event("backends started again")
            restore_backends(dep)
            wait_until(lambda: healthy_count(dep, "east", "reviews", "west") == 2, 30,
                       "reviews healthy in west again")
            wait_until(lambda: first_answer_from(
                select(load.records(), t_restore, targets=["reviews"]), t_restore, "west")
                is not None, 30, "reviews answered from west again")
            t_back = rep.event("traffic back in west")
            time.sleep(3)
            t_end = time.time()
        recs = select(load.records(), targets=["reviews"])
        quiet = rep.window("quiet", summarize(select(recs, t_quiet, t_kill)))
        fault = rep.window("fault", summarize(select(recs, t_kill, t_restore)))
        rep.window("after", summarize(select(recs, t_restore, t_end)))
        rep.window("web", load.window(t_quiet, t_end, targets=["web"]))
        moved = moved_after(select(recs, t_kill, t_restore), t_kill, "west")
        rep.figures.update(
            requests=quiet.requests + fault.requests, failures=fault.failed,
            client_retries=fault.retried, time_to_move_s=moved,
            control_plane_s=round(t_seen - t_kill, 2), recovery_s=round(t_back - t_restore, 2),
            p99_fault_ms=fault.p99_ms, p99_quiet_ms=quiet.p99_ms)
    assert fault.failed == 0 and fault.retried == 0, fault
    assert moved is not None and moved < t_restore - t_kill
    late = select(recs, t_kill + moved + 0.001, t_restore)
    assert late and all(r.cluster == "east" for r in late if r.ok)


@pytest.mark.timeout(360)
def test_drill_2_cluster_goes_dark(dep: Deployment, csv: Path) -> None:
    """West's edge machine loses power mid-load: requests move to east (at most one client
    retry), new connections succeed through east, east shows west stale then unreachable
    past the bound; west boots, its appliance starts by itself, rejoins, and traffic returns
    per the weights."""
    east = dep.east
    with reporting("2-cluster-dark", COMMAND.format("drill_2")) as rep:
        with LoadRun(dep, csv) as load:
            t_quiet = rep.event("load running")
            time.sleep(QUIET)
            t_off = rep.event("west-edge: SIGKILL to its PID 1 (power cut)")
            edge_off(dep, "west", how="kill")
            line = wait_until(lambda: (lambda s: s if " stale " in f" {s} " else None)(
                status_peer_line(east, "west")), 30, "isthmus status on east: west stale")
            t_stale = rep.event(f"isthmus status on east: {' '.join(line.split())}")
            assert peer_state(dep, "east", "west") == "stale"
            line = wait_until(lambda: (lambda s: s if " unreachable " in f" {s} " else None)(
                status_peer_line(east, "west")), PEER_UNREACHABLE_AFTER + 30,
                "isthmus status on east: west unreachable")
            t_unreachable = rep.event(f"isthmus status on east: {' '.join(line.split())}")
            time.sleep(2)
            t_boot = rep.event("west-edge: boot")
            edge_on(dep, "west")
            t_up = rep.event("west's appliance up (started by its own unit)")
            dep.wait_peers("connected", 60)
            t_rejoin = rep.event("peers connected again, both ways")
            wait_until(lambda: first_answer_from(
                select(load.records(), t_boot, targets=["reviews"]), t_boot, "west")
                is not None, 60, "reviews answered from west again")
            t_back = rep.event("reviews answered from west again")
            time.sleep(10)
            t_end = time.time()
        recs = select(load.records(), targets=["reviews"])
        quiet = rep.window("quiet", summarize(select(recs, t_quiet, t_off)))
        dark = rep.window("dark", summarize(select(recs, t_off, t_boot)))
        new_conns = rep.window("dark_new_connections", summarize(
            select(load.records(), t_off, t_boot, kinds=["new"], targets=["reviews"])))
        back = rep.window("back", summarize(select(recs, t_back + 1, t_end)))
        rep.window("web", load.window(t_quiet, t_end, targets=["web"]))
        moved = moved_after(select(recs, t_off, t_boot), t_off, "west")
        rep.figures.update(
            requests=quiet.requests + dark.requests + back.requests, failures=dark.failed,
            client_retries=dark.retried, time_to_move_s=moved,
            stale_after_s=round(t_stale - t_off, 1),
            unreachable_after_s=round(t_unreachable - t_off, 1),
            unreachable_bound_s=PEER_UNREACHABLE_AFTER,
            boot_to_appliance_s=round(t_up - t_boot, 1),
            boot_to_rejoin_s=round(t_rejoin - t_boot, 1),
            boot_to_traffic_s=round(t_back - t_boot, 1),
            west_share_after=round(back.share("west"), 3),
            p99_fault_ms=dark.p99_ms, p99_quiet_ms=quiet.p99_ms)
    assert dark.failed == 0, dark  # after at most one client retry
    assert new_conns.requests > 0 and new_conns.failed == 0
    assert all(r.cluster == "east" for r in select(recs, t_off + (moved or 0) + 0.001, t_boot)
               if r.ok)
    assert t_unreachable - t_off >= PEER_UNREACHABLE_AFTER
    weight = BASELINE_WEIGHTS["west"] / sum(BASELINE_WEIGHTS.values())
    assert back.requests >= 200 and abs(back.share("west") - weight) < 0.15, back


@pytest.mark.timeout(360)
def test_drill_3_partition(dep: Deployment, csv: Path) -> None:
    """West's public link goes down and up. East keeps serving, the peer turns stale; weights
    written on both sides during the split converge by last-writer-wins after healing."""
    with reporting("3-partition", COMMAND.format("drill_3")) as rep:
        with LoadRun(dep, csv) as load:
            t_quiet = rep.event("load running")
            time.sleep(QUIET)
            t_cut = rep.event("west-edge: public link down")
            cut(dep, "west")
            wait_until(lambda: peer_state(dep, "east", "west") == "stale"
                       and peer_state(dep, "west", "east") == "stale", 40,
                       "both sides see the other stale")
            t_stale = rep.event("east and west: the other is stale")
            east_write = dep.set_weights("reviews", {"east": 70, "west": 30}, via="east")
            rep.event(f"east writes east=70 west=30 ({east_write['version']})")
            time.sleep(1.5)
            west_write = dep.set_weights("reviews", {"east": 10, "west": 90}, via="west")
            rep.event(f"west writes east=10 west=90 ({west_write['version']})")
            winner = max((east_write, west_write), key=lambda w: Stamp.parse(w["version"]))
            time.sleep(5)
            t_heal = rep.event("west-edge: public link up")
            heal(dep, "west")
            dep.wait_peers("connected", 90)
            t_rejoin = rep.event("peers connected again")

            def converged() -> bool:
                views = [dep.edges[c].api("GET", "/v1/services/default/reviews/traffic")[1]
                         for c in ("east", "west")]
                return all(isinstance(v, dict) and v.get("version") == winner["version"]
                           for v in views)

            wait_until(converged, 60, "both sides on the last writer's policy")
            t_conv = rep.event(f"both sides on {winner['weights']} ({winner['version']})")
            time.sleep(3)
            t_end = time.time()
        recs = load.records()
        quiet = rep.window("quiet", summarize(select(recs, t_quiet, t_cut, targets=["reviews"])))
        split = rep.window("split", summarize(select(recs, t_cut, t_heal, targets=["reviews"])))
        web = rep.window("split_web", summarize(select(recs, t_cut, t_heal, targets=["web"])))
        rep.window("after", summarize(select(recs, t_conv, t_end, targets=["reviews"])))
        rep.figures.update(
            requests=len(select(recs, t_quiet, t_end)), failures=split.failed + web.failed,
            client_retries=split.retried, stale_after_s=round(t_stale - t_cut, 1),
            heal_to_connected_s=round(t_rejoin - t_heal, 1),
            heal_to_converged_s=round(t_conv - t_heal, 1),
            east_write=east_write, west_write=west_write, winner=winner["weights"],
            p99_fault_ms=split.p99_ms, p99_quiet_ms=quiet.p99_ms)
    assert web.failed == 0 and web.requests > 0, web  # east's own services keep being served
    assert split.failed == 0, split
    # The later write wins (the hybrid logical clocks of both sides follow one host clock here).
    assert winner is west_write


@pytest.mark.timeout(300)
def test_drill_4_control_node_crash(dep: Deployment, csv: Path) -> None:
    """SIGKILL east's appliance during a stream of agent registrations and policy writes: the
    state on disk holds every acknowledged write, the restarted node serves them, and the VM's
    workloads come back with nothing done on the VM."""
    snapshot = RESULTS / "crash-snapshot"
    writes = RESULTS / "load" / "drill-4-writes.jsonl"
    writes.unlink(missing_ok=True)
    with reporting("4-control-crash", COMMAND.format("drill_4")) as rep:
        writer = PolicyWriter(dep, writes).start()
        try:
            with LoadRun(dep, csv) as load:
                t_quiet = rep.event("load, policy writes (10/s) and agent registrations running")
                extra, acked = 0, set()
                deadline = time.monotonic() + QUIET
                while time.monotonic() < deadline:  # a registration stream from the VM agent
                    extra += 1
                    set_vm_workloads(dep, extra)
                    time.sleep(0.3)
                acked = {w for w, s in agent_registrations(dep).items() if s == "registered"}
                t_kill = rep.event("east-edge: systemctl kill --signal=KILL isthmus")
                crash(dep.east, snapshot)
                registered_at_kill = agent_registrations(dep)
                acked |= {w for w, s in registered_at_kill.items() if s == "registered"}
                writer_acked = [w for w in writer.writes() if w["status"] == 200
                                and w["t"] < t_kill]
                wait_until(lambda: dep.east.active() == "active" and dep.east.api(
                    "GET", "/v1/health", timeout=2)[0] == 200, 60, "east's appliance restarted")
                t_up = rep.event("east's appliance back (systemd Restart=on-failure)")
                writer.stop()
                expected = {f"east-vm-web-{i}" for i in range(1, extra + 1)} | {"east-vm-web"}

                def vm_back() -> bool:
                    status, body = dep.east.api("GET", "/v1/workloads?service=web.default")
                    if status != 200:
                        return False
                    passing = {w["id"] for w in body if w["health"] == "passing"}
                    return expected <= passing and dep.vm.api("GET", "/v1/health")[0] == 200

                wait_until(vm_back, 90, "every VM workload passing again at east")
                t_vm = rep.event(f"all {len(expected)} VM workloads passing again at east")
                time.sleep(2)
                t_end = time.time()
        finally:
            writer.stop()
        ids, policies = read_snapshot(snapshot, "east")
        assert writer_acked, "no policy write was acknowledged before the kill"
        last_ack = max(writer_acked, key=lambda w: Stamp.parse(w["version"]))
        on_disk = policies["reviews.default"]
        status, served = dep.east.api("GET", "/v1/services/default/reviews/traffic")
        all_acked = [w for w in writer.writes() if w["status"] == 200]
        recs = load.records()
        quiet = rep.window("quiet", summarize(select(recs, t_quiet, t_kill)))
        crash_w = rep.window("crash", summarize(select(recs, t_kill, t_vm)))
        rep.figures.update(
            requests=len(select(recs, t_quiet, t_end)), failures=crash_w.failed,
            agent_registrations_acked=len(acked), agent_registrations_lost=sorted(acked - ids),
            policy_writes_acked_before_kill=len(writer_acked),
            policy_writes_acked_total=len(all_acked),
            last_acked_version=last_ack["version"], on_disk_version=str(on_disk.stamp),
            restart_s=round(t_up - t_kill, 1), vm_workloads_back_s=round(t_vm - t_kill, 1),
            p99_quiet_ms=quiet.p99_ms, p99_fault_ms=crash_w.p99_ms)
        set_vm_workloads(dep, 0)
        dep.set_weights("reviews", BASELINE_WEIGHTS)
    assert acked and acked <= ids, sorted(acked - ids)  # no acknowledged registration lost
    assert on_disk.stamp >= Stamp.parse(last_ack["version"])  # nor the last policy write
    assert status == 200 and Stamp.parse(served["version"]) >= Stamp.parse(last_ack["version"])
    assert crash_w.failed == 0, crash_w  # the VM's data plane never needed the control node


@pytest.mark.timeout(600)
def test_drill_5_rotation_under_load(dep: Deployment, csv: Path) -> None:
    """A leaf rotation, then a root rotation with the playbook rotate-ca.yml, its start and
    then its finish phase (docs/operations.md), under load: no failed request, no refused
    handshake, every node on the new root only."""
    with reporting("5-rotation", COMMAND.format("drill_5")) as rep:
        refused_before = handshake_failures(dep)
        t0 = time.time()
        with LoadRun(dep, csv) as load:
            t_quiet = rep.event("load running")
            time.sleep(QUIET)
            serials = {n: identity_serial(a) for n, a in dep.appliances.items()}
            t_leaf = rep.event("leaf rotation: systemctl reload isthmus (edges, then the VM)")
            renewed = reload_all(dep)
            assert all(renewed[n] != serials[n] for n in serials)
            t_leaf_done = rep.event("every node holds a new identity")
            time.sleep(5)
            t_root = rep.event("root rotation: ansible-playbook rotate-ca.yml, start then finish")
            rotation = PlaybookRotation(dep)
            try:
                old_root, new_root = rotation.run()
            finally:
                for t, what in rotation.log:
                    rep.events.append((t, f"root rotation: {what}"))
            t_root_done = rep.event("root rotation done: every node on the new root only")
            time.sleep(8)
            t_end = time.time()
        refused_after = handshake_failures(dep)
        refused = {n: refused_after[n] - refused_before[n] for n in refused_before}
        logged = {n: log_count(a, "tls handshake refused", t0)
                  for n, a in dep.appliances.items()}
        # the logs are read (a missing log would also show no refusal): every node logged its
        # renewals, one per reload at least (the leaf rotation, and each step of the playbook)
        renewals = {n: log_count(a, "identity renewed", t0) for n, a in dep.appliances.items()}
        recs = load.records()
        quiet = rep.window("quiet", summarize(select(recs, t_quiet, t_leaf)))
        leaf = rep.window("leaf", summarize(select(recs, t_leaf, t_leaf_done + 5)))
        root = rep.window("root", summarize(select(recs, t_root, t_end)))
        old_fp, new_fp = fingerprints([old_root]), fingerprints([new_root])
        rep.figures.update(
            requests=len(select(recs, t_quiet, t_end)), failures=leaf.failed + root.failed,
            client_retries=leaf.retried + root.retried, refused_handshakes=refused,
            refusal_log_lines=logged, identity_renewals_logged=renewals,
            leaf_rotation_s=round(t_leaf_done - t_leaf, 1),
            root_rotation_s=round(t_root_done - t_root, 1),
            playbook_s=rotation.phases,
            bundles_after_start={n: len(f) for n, f in rotation.bundles["start"].items()},
            bundles_after_finish={n: len(f) for n, f in rotation.bundles["finish"].items()},
            p99_fault_ms=max(leaf.p99_ms, root.p99_ms), p99_quiet_ms=quiet.p99_ms)
    assert all(chains_to(a, new_root) for a in dep.appliances.values())
    # after the start every bundle trusts both roots, after the finish only the new one
    assert all(f == old_fp | new_fp for f in rotation.bundles["start"].values()), rotation.bundles
    assert all(f == new_fp for f in rotation.bundles["finish"].values()), rotation.bundles
    assert leaf.failed == 0 and root.failed == 0, (leaf, root)
    assert leaf.retried == 0 and root.retried == 0, (leaf, root)
    assert all(v == 0 for v in refused.values()), refused
    assert all(v == 0 for v in logged.values()), logged
    assert all(v >= 3 for v in renewals.values()), renewals
    dep.wait_peers("connected", 30)


@pytest.mark.timeout(420)
def test_drill_6_hostile_machines(dep: Deployment, csv: Path) -> None:
    """Hosts on the public segment with a foreign root's certificate, or a west identity
    signed by east's CA, are refused at the ingress; plaintext, TLS garbage, 2,000 silent and
    2,000 half-open connections are dropped; the load keeps zero errors and its p99 within 2x
    of the quiet p99."""
    bad = dep.workdir / "hostile"
    certs = write_hostile_identities(dep, bad)
    node = intruder(dep)
    with reporting("6-hostile", COMMAND.format("drill_6")) as rep:
        refused_before = {c: dep.edges[c].metrics() for c in ("east", "west")}
        # A valid identity from the same host is accepted: the probe can tell the difference.
        control = {sni.split(".")[0]: hostile(
            node, "identity", ingress("east"), "--sni", sni, "--cert", str(certs["valid"][0]),
            "--key", str(certs["valid"][1]), "--cluster", "west")
            for sni in (federation_sni("east"), service_sni("east"))}
        attempts = {}
        for name in ("foreign_root", "west_signed_by_east"):
            cert, key = certs[name]
            for cluster in ("east", "west"):
                for sni in (federation_sni(cluster), service_sni(cluster)):
                    attempts[f"{name} -> {cluster} {sni.split('.')[0]}"] = hostile(
                        node, "identity", ingress(cluster), "--sni", sni, "--cert", str(cert),
                        "--key", str(key), "--cluster", "west")
        with LoadRun(dep, csv, rate=20) as load:
            t_quiet = rep.event("load running (quiet)")
            time.sleep(15)
            t_flood = rep.event("flood at west's ingress (on the load's path) starts")
            floods = {"west": flood(dep, node, ingress("west"))}
            rep.event("flood at east's ingress starts")
            floods["east"] = flood(dep, node, ingress("east"))
            t_end = rep.event("flood over")
            time.sleep(3)
        recs = load.records()
        quiet = rep.window("quiet", summarize(select(recs, t_quiet, t_flood)))
        fault = rep.window("flood", summarize(select(recs, t_flood, t_end)))
        # reviews is the part of the load that crosses west's ingress
        rep.window("quiet_reviews", summarize(select(recs, t_quiet, t_flood,
                                                     targets=["reviews"])))
        rep.window("flood_reviews", summarize(select(recs, t_flood, t_end,
                                                     targets=["reviews"])))
        metrics_after = {c: dep.edges[c].metrics() for c in ("east", "west")}
        reasons = {}
        for c in ("east", "west"):
            for reason in ("untrusted_root", "cluster_mismatch"):
                reasons[f"{c}:{reason}"] = metric_sum(
                    metrics_after[c], "isthmus_tls_handshake_failures_total", reason=reason
                ) - metric_sum(refused_before[c], "isthmus_tls_handshake_failures_total",
                               reason=reason)
        rep.figures.update(
            requests=quiet.requests + fault.requests, failures=fault.failed,
            client_retries=fault.retried,
            valid_identity={k: v["outcome"] for k, v in control.items()},
            hostile_identities={k: v["outcome"] for k, v in attempts.items()},
            handshake_refusals=reasons, floods=floods,
            p99_quiet_ms=quiet.p99_ms, p99_fault_ms=fault.p99_ms)
    assert all(v["outcome"] == "accepted" for v in control.values()), control
    assert all(v["outcome"] == "refused" for v in attempts.values()), attempts
    assert all(reasons[f"{c}:untrusted_root"] > 0 and reasons[f"{c}:cluster_mismatch"] > 0
               for c in ("east", "west")), reasons
    for c, f in floods.items():
        assert f["plaintext"]["outcome"] == "dropped", (c, f)
        assert f["garbage"]["open"] == 0, (c, f)
        assert f["silent"]["still_open"] == 0, (c, f)
        assert f["syn"]["established"] == 0, (c, f)
    assert fault.failed == 0 and fault.retried == 0, fault
    assert fault.p99_ms <= 2 * quiet.p99_ms, (quiet.p99_ms, fault.p99_ms)


@pytest.mark.timeout(300)
def test_drill_7_dns_under_garbage(dep: Deployment, csv: Path) -> None:
    """Garbage packets and a query flood at the VM's resolver: it keeps answering the load's
    lookups, and the agent's memory stays bounded."""
    with reporting("7-dns-garbage", COMMAND.format("drill_7")) as rep:
        with LoadRun(dep, csv, lookup_rate=20) as load:
            t_quiet = rep.event("load running, 20 lookups/s per name")
            rss: list[tuple[float, int]] = []
            deadline = time.monotonic() + QUIET
            while time.monotonic() < deadline:
                rss.append((time.time(), dep.vm.rss_fds()[0]))
                time.sleep(1)
            base = max(r for _, r in rss)
            t_storm = rep.event("storm: garbage and a 2,000 packets/s flood for 20 s")
            proc = dns_storm(dep, seconds=20, qps=2000)
            while proc.poll() is None:
                rss.append((time.time(), dep.vm.rss_fds()[0]))
                time.sleep(1)
            out, err = proc.communicate(timeout=60)
            t_end_storm = rep.event("storm over")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                rss.append((time.time(), dep.vm.rss_fds()[0]))
                time.sleep(1)
            t_end = time.time()
        storm = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err}
        recs = load.records()
        lookups_quiet = rep.window("lookups_quiet", summarize(
            select(recs, t_quiet, t_storm, kinds=["dns"])))
        lookups = rep.window("lookups_storm", summarize(
            select(recs, t_storm, t_end_storm, kinds=["dns"])))
        http = rep.window("http_storm", summarize(select(recs, t_storm, t_end_storm)))
        peak = max(r for _, r in rss)
        final = rss[-1][1]
        rep.figures.update(
            requests=len(select(recs, t_quiet, t_end)), lookups=lookups.requests,
            failures=lookups.failed + http.failed, lookup_retries=lookups.retried,
            storm=storm, rss_base_kib=base, rss_peak_kib=peak, rss_after_kib=final,
            p99_lookup_quiet_ms=lookups_quiet.p99_ms, p99_fault_ms=lookups.p99_ms,
            rss_samples=[(round(t - t_quiet, 1), r) for t, r in rss])
    assert storm.get("sent", {}).get("queries", 0) > 10000, storm
    # TCP connections that never finish their message are closed by the idle timeout (10 s)
    assert storm["tcp_garbage"]["closed_by_resolver"] == storm["tcp_garbage"]["opened"], storm
    assert lookups.requests > 0 and lookups.failed == 0, lookups
    assert http.failed == 0, http
    assert peak - base < 64 * 1024, (base, peak)  # KiB: bounded, whatever was thrown at it
    assert final - base < 32 * 1024, (base, final)


def write_hostile_identities(dep: Deployment, d: Path) -> dict[str, tuple[Path, Path]]:
    """Three identities for the intruder: a valid west gateway (the control: a stolen but
    genuine identity is accepted, so the probe can tell), a west gateway under another root of
    the same trust domain, and a west gateway signed by east's CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from federation.trust import create_cluster_ca, create_root, generate_key, issue_identity
    from federation.trust.pemfiles import load_ca, write_certs, write_key
    from federation.trust.spiffe import SpiffeId

    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, Path]] = {}

    def save(name: str, key: object, chain: list[x509.Certificate]) -> None:
        write_key(d / f"{name}.key", key, force=True)  # type: ignore[arg-type]
        write_certs(d / f"{name}.pem", chain, force=True)
        out[name] = (d / f"{name}.pem", d / f"{name}.key")

    east_ca = load_ca(*dep.cluster_ca("east"))
    valid = issue_identity(load_ca(*dep.cluster_ca("west")), "gateway", "west-probe")
    save("valid", valid.key, list(valid.chain))
    other_root = create_root(TRUST_DOMAIN)
    foreign = issue_identity(create_cluster_ca(other_root, "west"), "gateway", "west-edge")
    save("foreign_root", foreign.key, list(foreign.chain))
    # The library refuses to sign another cluster's identity: build it as an attacker holding
    # east's CA key would.
    key = generate_key()
    sid = SpiffeId.for_node(TRUST_DOMAIN, "west", "gateway", "west-edge")
    now = valid.cert.not_valid_before_utc
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "west-edge")]))
            .issuer_name(east_ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(valid.cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                str(sid))]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                east_ca.cert.extensions.get_extension_for_class(
                    x509.SubjectKeyIdentifier).value), critical=False)
            .sign(east_ca.key, hashes.SHA256()))
    save("west_signed_by_east", key, [cert, east_ca.cert])
    return out
