"""The soak: mixed load for MINUTES with one fault from the drills every minute, in an order
drawn from a seed; every 10 s a sample of the load (requests, errors, p50, p99) and of each
appliance (RSS, open file descriptors). Writes soak.csv, soak.png and soak.json (the fault
log, totals, and the RSS and fd slopes with their bounds) to --out, and exits 1 when a slope
is past its bound.

    python3 -m tests.e2e.soak --minutes 30 --seed 7 --out /var/tmp/isthmus-e2e/soak

Needs what the drills need (root, the testbed's packages, nftables) and matplotlib (the `e2e`
extra: pip install -e '.[e2e]').

Slopes: an appliance that restarts (a fault kills it) starts a new lifetime with its own level;
the slope is fitted across lifetimes with a level per lifetime (pooled within-lifetime least
squares), after a warm-up of each lifetime. Bounds: RSS 16 MiB/hour (a leak of 40 bytes per
request at the soak's ~120 requests/s would pass it) and 20 descriptors/hour.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import percentile, read_records

SAMPLE_EVERY = 10.0
WARMUP = 60.0  # seconds of each appliance lifetime left out of the slope
RSS_BOUND_KIB_PER_HOUR = 16 * 1024
FD_BOUND_PER_HOUR = 20.0
FAULTS = ("backends_die", "edge_kill", "edge_poweroff", "partition", "control_crash",
          "leaf_rotation", "hostile_flood", "dns_storm")


def schedule(minutes: int, seed: int, faults: Sequence[str] = FAULTS) -> list[str]:
    """One fault per minute: every fault once per round, each round in a shuffled order."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < minutes:
        round_ = list(faults)
        rng.shuffle(round_)
        out += round_
    return out[:minutes]


@dataclass(frozen=True)
class Sample:
    t: float
    pids: dict[str, int]
    rss_kib: dict[str, int]
    fds: dict[str, int]


def pooled_slope(samples: Sequence[tuple[float, int, float]], warmup: float = WARMUP
                 ) -> tuple[float, float, int]:
    """(slope per second, its standard error, points used) of y over t, from (t, lifetime, y)
    points: each lifetime (a process id) keeps its own level; its first `warmup` seconds and
    lifetimes with fewer than 3 points are left out."""
    lifetimes: dict[int, list[tuple[float, float]]] = {}
    for t, life, y in samples:
        lifetimes.setdefault(life, []).append((t, y))
    xs: list[float] = []
    ys: list[float] = []
    groups = 0
    for points in lifetimes.values():
        start = min(t for t, _ in points)
        kept = [(t, y) for t, y in points if t - start >= warmup]
        if len(kept) < 3:
            continue
        groups += 1
        mx = sum(t for t, _ in kept) / len(kept)
        my = sum(y for _, y in kept) / len(kept)
        xs += [t - mx for t, _ in kept]
        ys += [y - my for _, y in kept]
    sxx = sum(x * x for x in xs)
    if len(xs) - groups < 2 or sxx == 0:
        return 0.0, 0.0, len(xs)
    b = sum(x * y for x, y in zip(xs, ys, strict=True)) / sxx
    resid = sum((y - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    dof = len(xs) - groups - 1
    se = (resid / dof / sxx) ** 0.5 if dof > 0 else 0.0
    return b, se, len(xs)


def within_bound(slope_per_s: float, se_per_s: float, bound_per_hour: float) -> bool:
    """Flat: the slope, less two standard errors of noise, is under the bound."""
    return (slope_per_s - 2 * se_per_s) * 3600 <= bound_per_hour


@dataclass
class Soak:
    dep: Any  # Deployment
    out: Path
    minutes: int
    seed: int
    samples: list[Sample] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    current: str = ""
    stop: threading.Event = field(default_factory=threading.Event)

    def pids(self) -> dict[str, int]:
        return {name: app.main_pid() for name, app in self.dep.appliances.items()}

    def sampler(self, load_csv: Path, t0: float) -> None:
        nxt = time.time() + SAMPLE_EVERY
        while not self.stop.wait(max(0.0, nxt - time.time())):
            t1 = nxt
            nxt += SAMPLE_EVERY
            recs = [r for r in read_records(load_csv) if t1 - SAMPLE_EVERY <= r.t < t1
                    and r.kind != "dns"]
            lat = [r.lat_ms for r in recs if r.ok]
            rss, fds, pids = {}, {}, {}
            for name, app in self.dep.appliances.items():
                with contextlib.suppress(Exception):
                    pids[name] = app.main_pid()
                    rss[name], fds[name] = app.rss_fds()
            self.samples.append(Sample(t1, pids, rss, fds))
            row = {"t": round(t1, 1), "elapsed_s": round(t1 - t0, 1), "fault": self.current,
                   "requests": len(recs), "errors": sum(not r.ok for r in recs),
                   "retried": sum(r.attempts > 1 for r in recs),
                   "p50_ms": round(percentile(lat, 50), 2),
                   "p99_ms": round(percentile(lat, 99), 2)}
            for name in self.dep.appliances:
                row[f"{name}_rss_kib"] = rss.get(name, 0)
                row[f"{name}_fds"] = fds.get(name, 0)
                row[f"{name}_pid"] = pids.get(name, 0)
            self.rows.append(row)
            self.write_csv()

    def write_csv(self) -> None:
        if not self.rows:
            return
        with open(self.out / "soak.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            w.writeheader()
            w.writerows(self.rows)

    def slopes(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in self.dep.appliances:
            for metric, bound in (("rss_kib", RSS_BOUND_KIB_PER_HOUR), ("fds", FD_BOUND_PER_HOUR)):
                pts = [(s.t, s.pids.get(name, 0),
                        float((s.rss_kib if metric == "rss_kib" else s.fds).get(name, 0)))
                       for s in self.samples if s.pids.get(name)]
                b, se, n = pooled_slope(pts)
                out[f"{name}.{metric}"] = {
                    "slope_per_hour": round(b * 3600, 2), "stderr_per_hour": round(se * 3600, 2),
                    "bound_per_hour": bound, "points": n,
                    "lifetimes": len({p[1] for p in pts}),
                    "flat": within_bound(b, se, bound)}
        return out


def run_fault(dep: Any, name: str, node: Any) -> dict[str, Any]:
    """Inject `name` and undo it; bounded (about 40 s of fault at most)."""
    from . import faults as f

    info: dict[str, Any] = {}
    if name == "backends_die":
        f.kill_backends(dep)
        time.sleep(15)
        f.restore_backends(dep)
    elif name in ("edge_kill", "edge_poweroff"):
        f.edge_off(dep, "west", how="kill" if name == "edge_kill" else "poweroff")
        time.sleep(15)
        f.edge_on(dep, "west")
    elif name == "partition":
        f.cut(dep, "west")
        time.sleep(20)
        f.heal(dep, "west")
    elif name == "control_crash":
        f.crash(dep.east)
        f.wait_until(lambda: dep.east.api("GET", "/v1/health", timeout=2)[0] == 200, 60,
                     "east restarted")
    elif name == "leaf_rotation":
        f.reload_all(dep)
    elif name == "hostile_flood":
        info = {k: v for k, v in f.flood(dep, node, f.ingress("west"), hold=5).items()}
    elif name == "dns_storm":
        proc = f.dns_storm(dep, seconds=15, qps=1500)
        out, _ = proc.communicate(timeout=90)
        info = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    else:
        raise ValueError(f"unknown fault {name!r}")
    return info


def plot(rows: list[dict[str, Any]], faults: list[dict[str, Any]], names: Sequence[str],
         path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["elapsed_s"] / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(12, 12), sharex=True)
    ax = axes[0]
    ax.plot(x, [r["requests"] for r in rows], label="requests / 10 s")
    ax.plot(x, [r["errors"] for r in rows], label="errors / 10 s", color="tab:red")
    ax.set_ylabel("requests")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    ax.plot(x, [r["p50_ms"] for r in rows], label="p50")
    ax.plot(x, [r["p99_ms"] for r in rows], label="p99")
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.legend(loc="upper right", fontsize=8)
    nan = float("nan")  # a gap where the appliance did not run (its machine was off)
    for name in names:
        axes[2].plot(x, [r[f"{name}_rss_kib"] / 1024 if r[f"{name}_pid"] else nan
                         for r in rows], label=name)
        axes[3].plot(x, [r[f"{name}_fds"] if r[f"{name}_pid"] else nan for r in rows],
                     label=name)
    axes[2].set_ylabel("RSS (MiB)")
    axes[3].set_ylabel("open fds")
    axes[3].set_xlabel("minutes")
    for a in axes[2:]:
        a.legend(loc="upper right", fontsize=8)
    t0 = rows[0]["t"] - rows[0]["elapsed_s"] if rows else 0
    for fault in faults:
        m = (fault["t"] - t0) / 60
        for a in axes:
            a.axvline(m, color="grey", alpha=0.3, linewidth=0.8)
        axes[0].text(m, axes[0].get_ylim()[1], fault["fault"], rotation=90, fontsize=7,
                     va="top", ha="right", color="dimgrey")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--soak", "--minutes", dest="minutes", metavar="MINUTES", type=int, required=True,
        help="length in minutes; one fault per minute",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/var/tmp/isthmus-e2e/soak"))
    args = p.parse_args(argv)
    if not 1 <= args.minutes <= 24 * 60:
        p.error("--minutes: from 1 to 1440")
    from tests.testbed import Testbed
    from tests.testbed.fixtures import sigterm_as_interrupt

    from . import faults as f
    from .conftest import e2e_skip_reason
    from .deploy import Deployment
    from .harness import RATINGS, REVIEWS, WEB, LoadRun

    reason = e2e_skip_reason()
    try:
        import matplotlib  # noqa: F401 - the plot comes at the end: fail now, not in 30 min
    except ImportError:
        reason = reason or "needs matplotlib: pip install -e '.[e2e]'"
    if reason:
        print(f"soak: {reason}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    plan = schedule(args.minutes, args.seed)
    print(json.dumps({"minutes": args.minutes, "seed": args.seed, "faults": plan}), flush=True)
    with sigterm_as_interrupt():
        tb = Testbed.up()
        try:
            dep = Deployment.install(tb)
            node = f.intruder(dep)
            soak = Soak(dep, args.out, args.minutes, args.seed)
            load = LoadRun(dep, args.out / "load.csv", targets=(REVIEWS, RATINGS, WEB),
                           duration=args.minutes * 60 + 300)
            load.csv.unlink(missing_ok=True)
            load.start()
            t0 = time.time()
            sampler = threading.Thread(target=soak.sampler, args=(load.csv, t0), daemon=True)
            sampler.start()
            try:
                for minute, fault in enumerate(plan):
                    start = t0 + minute * 60
                    time.sleep(max(0.0, start - time.time()))
                    soak.current = fault
                    entry: dict[str, Any] = {"minute": minute, "fault": fault, "t": time.time()}
                    try:
                        entry["info"] = run_fault(dep, fault, node)
                        f.ensure_baseline(dep, timeout=90)
                        entry["ok"] = True
                    except Exception as e:  # the soak goes on; the log says what broke
                        entry["ok"] = False
                        entry["error"] = f"{type(e).__name__}: {e}"[:1000]
                        with contextlib.suppress(Exception):
                            f.ensure_baseline(dep, timeout=120)
                    entry["recovered_s"] = round(time.time() - entry["t"], 1)
                    soak.faults.append(entry)
                    soak.current = ""
                    print(json.dumps({k: v for k, v in entry.items() if k != "info"}),
                          flush=True)
                time.sleep(max(0.0, t0 + len(plan) * 60 - time.time()))
            finally:
                soak.stop.set()
                sampler.join(30)
                load.stop()
            records = read_records(load.csv)
            http = [r for r in records if r.kind != "dns"]
            slopes = soak.slopes()
            summary = {
                "minutes": args.minutes, "seed": args.seed, "plan": plan,
                "faults": soak.faults,
                "requests": len(http), "errors": sum(not r.ok for r in http),
                "errors_by_target": {t: sum(not r.ok for r in http if r.target == t)
                                     for t in sorted({r.target for r in http})},
                "lookups": sum(r.kind == "dns" for r in records),
                "lookup_errors": sum(r.kind == "dns" and not r.ok for r in records),
                "slopes": slopes,
                "flat": all(s["flat"] for s in slopes.values()),
            }
            (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
            soak.write_csv()
            plot(soak.rows, soak.faults, list(dep.appliances), args.out / "soak.png",
                 f"isthmus soak: {args.minutes} min, seed {args.seed}, one fault per minute")
            print(json.dumps({k: summary[k] for k in ("requests", "errors", "flat")}),
                  flush=True)
            return 0 if summary["flat"] else 1
        finally:
            tb.down()


if __name__ == "__main__":
    sys.exit(main())
