"""Runs: names, the state file, and finding and removing what a run left behind.

Everything a run creates carries the prefix `itb-<run id>-`: network namespaces
(`itb-<id>-seg-<segment>`, `itb-<id>-node-<node>`) and machine names (`itb-<id>-<node>`, in the
`systemd-nspawn --machine=` argument). Its files live in `/var/tmp/isthmus-testbed/<id>/` and
its state file is `/run/isthmus-testbed/<id>.json`. So a run that was killed can be found by
name alone and removed by the next `up`, even when its state file is gone.

A run is live while its owner process (recorded in the state file with its start time, so a
reused pid does not count) is alive. A run made by `python3 -m tests.testbed up` has no owner:
it stays until `down`, and the next `up` replaces it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cgroups
from .commands import run

PREFIX = "itb"
STATE_DIR = Path("/run/isthmus-testbed")
DATA_DIR = Path("/var/tmp/isthmus-testbed")
# Where systemd-nspawn keeps a per-machine directory on the host while a machine runs.
NSPAWN_PROPAGATE = Path("/run/systemd/nspawn/propagate")

_RUN_ID = re.compile(r"^[0-9a-f]{6}$")
_OURS = re.compile(rf"^{PREFIX}-([0-9a-f]{{6}})-")


def new_run_id() -> str:
    return secrets.token_hex(3)


def segment_netns(run_id: str, segment: str) -> str:
    return f"{PREFIX}-{run_id}-seg-{segment}"


def node_netns(run_id: str, node: str) -> str:
    return f"{PREFIX}-{run_id}-node-{node}"


def machine_name(run_id: str, node: str) -> str:
    return f"{PREFIX}-{run_id}-{node}"


def run_dir(run_id: str) -> Path:
    return DATA_DIR / run_id


def state_path(run_id: str) -> Path:
    return STATE_DIR / f"{run_id}.json"


# --- processes -------------------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """The start time of pid in clock ticks since boot (field 22 of /proc/PID/stat), or None
    when there is no such process (or it is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited; only its parent's wait() is missing
        return None
    return int(fields[19])


def owner_alive(owner: dict[str, int] | None) -> bool:
    if not owner:
        return False
    return process_start(int(owner["pid"])) == int(owner["start"])


def this_process_as_owner() -> dict[str, int]:
    pid = os.getpid()
    start = process_start(pid)
    assert start is not None
    return {"pid": pid, "start": start}


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def nspawn_processes() -> dict[str, int]:
    """Every running systemd-nspawn of ours: {machine name: pid}."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name))
        if not argv or os.path.basename(argv[0]) != "systemd-nspawn":
            continue
        for arg in argv[1:]:
            if arg.startswith("--machine=") and _OURS.match(arg[len("--machine=") :]):
                found[arg[len("--machine=") :]] = int(entry.name)
    return found


def children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def container_init(nspawn_pid: int) -> int | None:
    """The machine's PID 1 as the host sees it: the child of systemd-nspawn that is pid 1 in its
    own pid namespace and has exec'd systemd (before that it is still nspawn's set-up code)."""
    for kid in children(nspawn_pid):
        try:
            status = Path(f"/proc/{kid}/status").read_text()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines()
                      if line.startswith("NSpid:")), [])
        if len(nspid) >= 2 and nspid[-1] == "1":
            exe = ""
            with contextlib.suppress(OSError):
                exe = os.readlink(f"/proc/{kid}/exe")
            if os.path.basename(exe) == "systemd":
                return kid
    return None


def wait_gone(pid: int, start: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = process_start(pid)
        if now is None or (start is not None and now != start):
            return True
        # A zombie child of ours is gone for our purposes; reap it if it is ours.
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return process_start(pid) is None


def kill_machine_process(nspawn_pid: int, timeout: float = 10.0) -> None:
    kill_machine_processes([nspawn_pid], timeout)


def kill_machine_processes(nspawn_pids: list[int], timeout: float = 10.0) -> None:
    """Stop machines hard, all at once: SIGKILL each one's PID 1 (the kernel then kills
    everything in its pid namespace and systemd-nspawn exits), then SIGKILL a systemd-nspawn
    that lingers."""
    starts = {pid: process_start(pid) for pid in nspawn_pids}
    for pid in nspawn_pids:
        init = container_init(pid)
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid, start in starts.items():
        if start is None:
            continue
        if not wait_gone(pid, start, max(0.1, deadline - time.monotonic())):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, start, 5.0)


# --- namespaces ------------------------------------------------------------------------------


def list_netns() -> list[str]:
    out = run(["ip", "netns", "list"], timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    proc = run(["ip", "netns", "pids", name], check=False, timeout=10)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def delete_netns(name: str) -> None:
    """Kill what still runs in the namespace (processes a test started in it), then delete it:
    its veths and bridges go with it."""
    for pid in netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run(["ip", "netns", "delete", name], check=False, timeout=10)


# --- state files -----------------------------------------------------------------------------


def write_state(run_id: str, state: dict[str, Any]) -> None:
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_path(run_id)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_state(run_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(run_id).read_text())
    except (OSError, ValueError):
        return None


# --- what exists -----------------------------------------------------------------------------


@dataclass
class Remains:
    """What exists of a run (or of all runs), found by name."""

    netns: list[str] = field(default_factory=list)
    machines: dict[str, int] = field(default_factory=dict)  # machine name -> nspawn pid
    dirs: list[Path] = field(default_factory=list)
    state_files: list[Path] = field(default_factory=list)
    propagate_dirs: list[Path] = field(default_factory=list)
    cgroups: list[Path] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.netns or self.machines or self.dirs or self.state_files
                    or self.propagate_dirs or self.cgroups)

    def describe(self) -> str:
        parts = []
        if self.machines:
            parts.append("machines " + ", ".join(f"{m} (pid {p})"
                                                 for m, p in sorted(self.machines.items())))
        if self.netns:
            parts.append("namespaces " + ", ".join(sorted(self.netns)))
        for label, paths in (("dirs", self.dirs), ("state files", self.state_files),
                             ("nspawn dirs", self.propagate_dirs), ("cgroups", self.cgroups)):
            if paths:
                parts.append(f"{label} " + ", ".join(str(p) for p in sorted(paths)))
        return "; ".join(parts) or "nothing"


def remains(run_id: str | None = None) -> Remains:
    """Everything of ours that exists, for one run or (run_id None) for all runs."""

    def mine(name: str) -> bool:
        m = _OURS.match(name)
        return bool(m) and (run_id is None or m.group(1) == run_id)

    found = Remains()
    found.netns = [n for n in list_netns() if mine(n)]
    found.machines = {m: p for m, p in nspawn_processes().items() if mine(m)}
    if DATA_DIR.is_dir():
        found.dirs = [d for d in DATA_DIR.iterdir()
                      if _RUN_ID.match(d.name) and (run_id is None or d.name == run_id)]
    if STATE_DIR.is_dir():
        found.state_files = [f for f in STATE_DIR.glob("*.json")
                             if _RUN_ID.match(f.stem) and (run_id is None or f.stem == run_id)]
    if NSPAWN_PROPAGATE.is_dir():
        found.propagate_dirs = [d for d in NSPAWN_PROPAGATE.iterdir() if mine(d.name)]
    found.cgroups = [c for c in cgroups.existing(f"{PREFIX}-") if mine(c.name)]
    return found


def run_ids(found: Remains) -> set[str]:
    ids: set[str] = set()
    for name in [*found.netns, *found.machines,
                 *(p.name for p in [*found.propagate_dirs, *found.cgroups])]:
        m = _OURS.match(name)
        if m:
            ids.add(m.group(1))
    ids |= {d.name for d in found.dirs} | {f.stem for f in found.state_files}
    return ids


def is_live(run_id: str) -> bool:
    """A run whose owner process is still alive; a detached (command-line) run is not."""
    state = read_state(run_id)
    return bool(state) and owner_alive(state.get("owner"))


def destroy(run_id: str) -> Remains:
    """Remove everything of a run, found by name: machines (hard), namespaces (with anything
    still running in them), files. Returns what could not be removed (normally nothing)."""
    found = remains(run_id)
    kill_machine_processes(list(found.machines.values()))
    for cg in found.cgroups:  # stragglers of a machine, whatever their parent
        cgroups.remove(cg)
    cgroups.remove_empty_roots()
    for ns in found.netns:
        delete_netns(ns)
    for d in found.propagate_dirs:
        # Left by nspawn when it could not clean up after itself; empty once the machine is gone.
        with contextlib.suppress(OSError):
            d.rmdir()
    for d in found.dirs:
        shutil.rmtree(d, ignore_errors=True)
    for f in found.state_files:
        with contextlib.suppress(OSError):
            f.unlink()
    return remains(run_id)


def cleanup_leftovers(keep: set[str] | None = None) -> dict[str, Remains]:
    """Destroy every run that is not live (its owner died, or it was made detached), except
    those in `keep`. Returns {run id: what remained} for runs that could not be fully removed."""
    keep = keep or set()
    failed: dict[str, Remains] = {}
    for rid in sorted(run_ids(remains())):
        if rid in keep or is_live(rid):
            continue
        left = destroy(rid)
        if not left.empty():
            failed[rid] = left
    return failed
