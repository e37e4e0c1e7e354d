"""A cgroup of its own for each machine.

With --keep-unit and no systemd on the host, systemd-nspawn puts a machine under the cgroup it
was started in. Machines started from the same cgroup would then share one tree: two machines'
`system.slice/ssh.service` would be one cgroup, and stopping a unit in one machine would kill
the other's processes. So each machine's systemd-nspawn starts in `isthmus-testbed/<machine>`
of every hierarchy systemd uses (the unified one and, on hybrid hosts, name=systemd).
That cgroup also finds every process of a machine at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

ROOT_NAME = "isthmus-testbed"


def hierarchies() -> list[Path]:
    """Mount points of the cgroup2 hierarchy and of the v1 name=systemd hierarchy."""
    found: list[Path] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, options = [*right.split(), "", "", ""][:3]
            mount_point = Path(left.split()[4])
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
                found.append(mount_point)
    return found


def machine_cgroups(machine_name: str) -> list[Path]:
    return [h / ROOT_NAME / machine_name for h in hierarchies()]


def create(machine_name: str) -> list[Path]:
    paths = machine_cgroups(machine_name)
    for p in paths:
        p.mkdir(parents=True, exist_ok=True)
    return paths


def wrap(argv: list[str], cgroups: list[Path]) -> list[str]:
    """argv started by a shell that first moves itself into `cgroups` (then exec's argv, so
    the process keeps its pid and its command line is argv's)."""
    script = 'for c in $ITB_CGROUPS; do echo $$ > "$c/cgroup.procs" || exit 97; done; exec "$@"'
    return ["env", f"ITB_CGROUPS={' '.join(str(c) for c in cgroups)}", "sh", "-c", script,
            "sh", *argv]


def pids(path: Path) -> list[int]:
    """Every process in the cgroup and below it."""
    found: list[int] = []
    for procs in path.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(p) for p in procs.read_text().split()]
    return found


def remove(path: Path, timeout: float = 5.0) -> bool:
    """SIGKILL whatever still runs in the cgroup tree, then remove it bottom-up. True when it
    is gone."""
    if not path.exists():
        return True
    deadline = time.monotonic() + timeout
    while True:
        left = pids(path)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for d in sorted((p for p in path.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()
        if not path.exists():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def existing(prefix: str) -> list[Path]:
    """Machine cgroups whose names start with prefix, in every hierarchy."""
    found: list[Path] = []
    for h in hierarchies():
        root = h / ROOT_NAME
        if root.is_dir():
            found += [d for d in root.iterdir() if d.is_dir() and d.name.startswith(prefix)]
    return found


def remove_empty_roots() -> None:
    for h in hierarchies():
        with contextlib.suppress(OSError):
            (h / ROOT_NAME).rmdir()
