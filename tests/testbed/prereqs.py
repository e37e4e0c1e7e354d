"""What the testbed needs on the host, how to check it, and how to install it.

Machines boot from the host's own root, so every program a machine runs (sshd, Python, venv)
is a package installed on the host. Installing openssh-server must not open sshd on the host:
`install()` keeps the package scripts from starting it and leaves the host's ssh.service
disabled; machines enable sshd in their own /etc overlay.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .commands import run
from .errors import PrerequisiteError

# Debian packages, one per line in README.md. bridge-utils is not needed: `ip link` makes bridges.
APT_PACKAGES: tuple[str, ...] = (
    "systemd-container",  # systemd-nspawn
    "openssh-server",  # sshd inside the machines (never started on the host)
    "openssh-client",  # ssh and ssh-keygen on the controller
    "iproute2",  # ip netns, veth, bridge; ss inside the machines
    "util-linux",  # nsenter
    "python3",  # Debian's /usr/bin/python3, the machines' Python
    "python3-venv",  # so a deployment can build /opt/isthmus/venv on a machine
)

# Program -> the package that brings it.
COMMANDS: dict[str, str] = {
    "systemd-nspawn": "systemd-container",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ip": "iproute2",
    "ss": "iproute2",
    "bridge": "iproute2",
    "nsenter": "util-linux",
}
MACHINE_FILES: dict[str, str] = {
    "/usr/bin/python3": "python3",
    "/usr/lib/python3.11/ensurepip/__init__.py": "python3-venv",
    "/lib/systemd/system/ssh.service": "openssh-server",
}
INSTALL_HINT = "python3 -m tests.testbed prereqs --install"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Check:
    problems: tuple[str, ...]
    missing_packages: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def default_search_path() -> str:
    return os.environ.get("PATH", "") + ":" + ":".join(_SBIN)


def check(search_path: str | None = None) -> Check:
    """What is missing for the testbed on this host; commands are looked up in search_path
    (default: PATH and the sbin directories)."""
    search_path = default_search_path() if search_path is None else search_path
    problems: list[str] = []
    missing: set[str] = set()
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces, systemd-nspawn)")
    for cmd, pkg in COMMANDS.items():
        if shutil.which(cmd, path=search_path) is None:
            problems.append(f"{cmd} not found (Debian package {pkg})")
            missing.add(pkg)
    for path, pkg in MACHINE_FILES.items():
        if not os.path.exists(path):
            problems.append(f"{path} not found (Debian package {pkg})")
            missing.add(pkg)
    if not os.path.exists("/proc/self/ns/net"):
        problems.append("the kernel has no network namespaces")
    return Check(tuple(problems), tuple(sorted(missing)))


def require() -> None:
    """Raise PrerequisiteError listing everything that is missing (and how to install it)."""
    reason = skip_reason()
    if reason:
        raise PrerequisiteError(reason)


def skip_reason(search_path: str | None = None) -> str | None:
    """Why the testbed cannot run here, in one line, or None when it can."""
    result = check(search_path)
    if result.ok:
        return None
    hint = f"; install with: {INSTALL_HINT}" if result.missing_packages else ""
    return "the testbed needs root and systemd-container: " + "; ".join(result.problems) + hint


def host_runs_systemd() -> bool:
    return os.path.isdir("/run/systemd/system")


def install() -> list[str]:
    """apt-get install what is missing, without starting any service on the host, then make
    sure the host's own sshd is disabled (and stopped, where the host runs systemd). Returns
    the packages installed."""
    if os.geteuid() != 0:
        raise PrerequisiteError("installing the testbed's packages needs root")
    missing = [p for p in APT_PACKAGES if not _installed(p)]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env, timeout=300)
        with _no_service_starts():
            run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                env=env, timeout=600)
    disable_host_sshd()
    return missing


def _installed(pkg: str) -> bool:
    proc = run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False, timeout=30)
    return proc.returncode == 0 and proc.stdout.endswith("installed")


@contextlib.contextmanager
def _no_service_starts():
    """Debian's policy-rc.d: while it exits 101, package scripts start no service."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# isthmus testbed: no service starts during install\n"
                           "exit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink()


def disable_host_sshd() -> None:
    """The host's ssh.service disabled (machines enable sshd in their own /etc overlay)."""
    if not os.path.exists("/lib/systemd/system/ssh.service"):
        return
    if host_runs_systemd():
        run(["systemctl", "disable", "--now", "ssh.service", "ssh.socket"], check=False,
            timeout=60)
    else:
        run(["systemctl", "disable", "ssh.service", "ssh.socket"], check=False, timeout=60)


def host_sshd_enabled() -> bool:
    proc = run(["systemctl", "is-enabled", "ssh.service"], check=False, timeout=30)
    return proc.stdout.strip() == "enabled"


def report() -> str:
    """What `python3 -m tests.testbed prereqs` prints."""
    result = check()
    lines = ["Debian packages: " + " ".join(APT_PACKAGES)]
    if result.ok:
        lines.append("all present")
    else:
        lines += [f"missing: {p}" for p in result.problems]
        if result.missing_packages:
            lines.append(f"install with: {INSTALL_HINT}")
    if os.path.exists("/lib/systemd/system/ssh.service"):
        state = "enabled" if host_sshd_enabled() else "disabled"
        lines.append(f"host ssh.service: {state} (the testbed wants it disabled on the host)")
    return "\n".join(lines)
