"""What the drills share: the load generator as a process on the VM's network, and the figures
each drill reports (written as JSON for RELIABILITY.md)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.testbed import VM_PRIVATE

from .deploy import Deployment
from .stats import Record, Summary, read_records, select, summarize

LOAD_SCRIPT = Path(__file__).with_name("load.py")
RESULTS = Path(os.environ.get("ISTHMUS_E2E_RESULTS", "/var/tmp/isthmus-e2e/results"))

REVIEWS = "reviews.default.global:9080"
RATINGS = "ratings.default.global:9081"
WEB = "web.default.global:8080"


@dataclass
class LoadRun:
    """load.py running on the VM's network, writing every request to `csv`."""

    dep: Deployment
    csv: Path
    targets: Sequence[str] = (REVIEWS, WEB)
    keepalive: int = 2
    fresh: int = 1
    rate: float = 20.0
    lookup_rate: float = 5.0
    duration: float = 900.0  # a bound, in case nobody stops it
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    def argv(self) -> list[str]:
        argv = [sys.executable, str(LOAD_SCRIPT), "--out", str(self.csv), "--dns", VM_PRIVATE,
                "--keepalive", str(self.keepalive), "--fresh", str(self.fresh),
                "--rate", str(self.rate), "--lookup-rate", str(self.lookup_rate),
                "--duration", str(self.duration)]
        for t in self.targets:
            argv += ["--target", t]
        return argv

    def start(self, warmup: float = 3.0) -> LoadRun:
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.csv.with_suffix(".log"), "wb")  # noqa: SIM115 - the child's output
        try:
            self.proc = self.dep.vm.machine.net_popen(self.argv(), stdout=log,
                                                      stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.started = time.time()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"load generator exited {self.proc.returncode}: "
                                   f"{self.csv.with_suffix('.log').read_text()[-2000:]}")
            if len(self.records()) >= 10:
                break
            time.sleep(0.2)
        time.sleep(warmup)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def records(self) -> list[Record]:
        return read_records(self.csv)

    def window(self, t0: float, t1: float = float("inf"), targets: Sequence[str] | None = None,
               kinds: Sequence[str] = ("ka", "new")) -> Summary:
        return summarize(select(self.records(), t0, t1, kinds, targets))

    def __enter__(self) -> LoadRun:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def short(target: str) -> str:
    return target.split(".")[0]


@dataclass
class DrillReport:
    """The figures of one drill, as RELIABILITY.md shows them."""

    drill: str
    command: str
    started: float = field(default_factory=time.time)
    figures: dict[str, Any] = field(default_factory=dict)
    windows: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)

    def event(self, what: str) -> float:
        t = time.time()
        self.events.append((t, what))
        return t

    def window(self, name: str, summary: Summary) -> Summary:
        self.windows[name] = summary.to_json()
        return summary

    def write(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.drill}.json"
        out = {"drill": self.drill, "command": self.command, "started": self.started,
               "duration_s": round(time.time() - self.started, 1), "figures": self.figures,
               "windows": self.windows,
               "events": [(round(t - self.started, 2), w) for t, w in self.events]}
        path.write_text(json.dumps(out, indent=2) + "\n")
        return path


@contextlib.contextmanager
def reporting(drill: str, command: str) -> Iterator[DrillReport]:
    """A report written at the end of the drill, also when it fails (with the failure)."""
    rep = DrillReport(drill, command)
    try:
        yield rep
    except BaseException as e:
        rep.figures["failure"] = f"{type(e).__name__}: {e}"[:2000]
        raise
    finally:
        rep.write()
