"""A machine's own files, written before its first boot into the upper directory of its /etc
overlay (on the host, so they survive reboots of the machine).

Machines boot from the host's root, so they would start whatever the host has enabled (a
database, a resolver on port 53, apt timers that reach for the network). Each machine masks
those, and enables sshd, bound to its management address only, with its own host key and the
run's authorized key. The host's own ssh.service stays as the host has it (disabled).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .commands import run
from .topology import NodeSpec

HOST_SYSTEMD = Path("/etc/systemd/system")
SSH_UNIT = "ssh.service"
_MASKABLE = (".service", ".socket", ".timer", ".path")
SSHD_DROPIN = "ssh/sshd_config.d/isthmus-testbed.conf"
AUTHORIZED_KEYS = "ssh/isthmus-testbed/authorized_keys"


def host_enabled_units() -> list[str]:
    """Units the host's admin or its packages enabled (symlinks in /etc/systemd/system/*.wants
    and *.requires): a machine booted from the host's root would start them all."""
    units: set[str] = set()
    for wants in HOST_SYSTEMD.glob("*.wants"):
        units |= {p.name for p in wants.iterdir() if p.name.endswith(_MASKABLE)}
    for req in HOST_SYSTEMD.glob("*.requires"):
        units |= {p.name for p in req.iterdir() if p.name.endswith(_MASKABLE)}
    return sorted(units)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    _mkdirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _mkdirs(path: Path) -> None:
    # 0755 root: overlayfs shows an upper directory's own mode on the merged directory.
    path.mkdir(mode=0o755, parents=True, exist_ok=True)


def _symlink(path: Path, target: str) -> None:
    _mkdirs(path.parent)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def write_etc(upper: Path, node: NodeSpec, public_key: str, mgmt_segment: str = "mgmt") -> None:
    """Fill a fresh /etc upper directory for `node`."""
    _mkdirs(upper)
    os.chmod(upper, 0o755)
    _write(upper / "hostname", f"{node.name}\n")
    _write(upper / "machine-id", secrets.token_hex(16) + "\n", 0o444)
    _write(
        upper / "hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{node.name}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n",
    )
    # The host's resolver is not reachable from a machine (and must not be tried): no
    # nameserver until a deployment wires one in. A regular file, so it can be replaced.
    _write(upper / "resolv.conf", "# isthmus testbed: no resolver until one is deployed\n")

    systemd = upper / "systemd" / "system"
    for unit in host_enabled_units():
        if unit != SSH_UNIT:
            _symlink(systemd / unit, "/dev/null")

    if node.has_leg(mgmt_segment):
        mgmt = node.leg(mgmt_segment).address
        _symlink(systemd / "multi-user.target.wants" / SSH_UNIT, f"/lib/systemd/system/{SSH_UNIT}")
        # sshd reads its drop-ins first, and the first value of a keyword wins.
        _write(
            upper / SSHD_DROPIN,
            "# isthmus testbed: reachable from the controller on the management segment only\n"
            f"ListenAddress {mgmt}\n"
            "HostKey /etc/ssh/ssh_host_ed25519_key\n"
            f"AuthorizedKeysFile .ssh/authorized_keys /etc/{AUTHORIZED_KEYS}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UseDNS no\n",
        )
        _write(upper / AUTHORIZED_KEYS, public_key.strip() + "\n", 0o600)
        key = upper / "ssh" / "ssh_host_ed25519_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{node.name}",
             "-f", str(key)], timeout=15)
    else:
        # No management leg: nobody could reach sshd, and it must not listen elsewhere.
        _symlink(systemd / SSH_UNIT, "/dev/null")


def host_public_key(upper: Path) -> str | None:
    path = upper / "ssh" / "ssh_host_ed25519_key.pub"
    """`ssh-ed25519 AAAA...` of the machine's host key, for known_hosts."""
    return " ".join(path.read_text().split()[:2]) if path.exists() else None
