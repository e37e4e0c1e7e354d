"""The Corefile used when the operator gives none, and /etc/resolv.conf reading."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"


def resolv_conf_nameservers(path: str = RESOLV_CONF) -> list[str]:
    """The `nameserver` addresses of a resolv.conf file, in order (missing file: none)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        log.warning("resolv.conf unreadable", extra={"path": path, "error": e.strerror})
        return []
    out = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ipaddress.ip_address(parts[1].split("%", 1)[0])
            except ValueError:
                continue
            out.append(parts[1])
    return out


def upstream_token(address: str, port: int = 53) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def would_be_us(nameserver: str, listen_hosts: tuple[str, ...], listen_port: int) -> bool:
    """A loopback nameserver on our own port is this resolver (agent mode): skip it."""
    ip = ipaddress.ip_address(nameserver.split("%", 1)[0])
    if not ip.is_loopback or listen_port != 53:
        return False
    return any(
        ipaddress.ip_address(h).is_unspecified or ipaddress.ip_address(h) == ip
        for h in listen_hosts
    )


def default_corefile(
    listen_hosts: tuple[str, ...], listen_port: int, resolv_conf: str = RESOLV_CONF
) -> str:
    """`global` answered and cached; everything else forwarded to the host's nameservers."""
    upstreams = [
        ns
        for ns in resolv_conf_nameservers(resolv_conf)
        if not would_be_us(ns, listen_hosts, listen_port)
    ]
    text = "global {\n    errors\n    global\n    cache 30\n}\n"
    if upstreams:
        text += (
            ". {\n    errors\n    forward . "
            + " ".join(upstream_token(u) for u in upstreams)
            + "\n    cache 30\n}\n"
        )
    else:
        log.warning(
            "no upstream nameserver: names outside the global zone are refused",
            extra={"resolv_conf": resolv_conf},
        )
    return text
