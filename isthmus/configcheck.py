"""`isthmus config check`: what `isthmus run` would refuse, found without starting anything."""

from __future__ import annotations

import os
from pathlib import Path

from discovery.errors import StoreError
from dns.errors import DnsError
from dns.server import DnsServer
from federation.routing import TableHolder
from isthmus.catalogs import read_consul_token
from isthmus.config import (
    Config,
    exposed_listeners,
    listeners_in_use,
    role_problems,
    split_host_port,
)


def _readable(path: str) -> bool:
    return os.access(path, os.R_OK)


def deeper_problems(cfg: Config) -> list[str]:
    problems = role_problems(cfg)
    roles = set(cfg.roles)
    if "dns" in roles or "agent" in roles:
        try:
            DnsServer(cfg.dns.corefile, cfg.dns.listen, TableHolder(), base_dir=cfg.data_dir)
        except DnsError as e:
            problems.append(f"dns.corefile: {e}")
    needs_bundle = "agent" in roles or bool({"ingress", "egress"} & roles or cfg.federation.peers)
    if needs_bundle and not _readable(cfg.trust.bundle):
        problems.append(f"trust.bundle: cannot read {cfg.trust.bundle} (the trusted roots; "
                        "`isthmus ca init` makes them)")
    if "agent" in roles and not (Path(cfg.trust.cert).exists() or
                                 _readable(cfg.agent.bootstrap_token_file)):
        problems.append(
            f"agent.bootstrap_token_file: cannot read {cfg.agent.bootstrap_token_file} and there "
            f"is no identity in {cfg.trust.cert} yet (create a token with `isthmus token create` "
            "on the control node)"
        )
    if cfg.discovery.backend == "consul":
        problems += _consul_problems(cfg)
    seen: dict[tuple[str, int], str] = {}
    for key, listen in listeners_in_use(cfg):
        host, port = split_host_port(listen)
        if port == 0:
            continue
        for (h, p), other in seen.items():
            overlap = h == host or "0.0.0.0" in (h, host) or "::" in (h, host)
            if p == port and overlap:
                problems.append(f"{key}: {listen} is also {other}'s address")
        seen[(host, port)] = key
    return problems


def _consul_problems(cfg: Config) -> list[str]:
    c = cfg.discovery.consul
    out = []
    if c.token_file is not None:
        try:
            read_consul_token(c.token_file)
        except StoreError as e:
            out.append(str(e))
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(c.tls, key)
        if path is not None and not _readable(path):
            out.append(f"discovery.consul.tls.{key}: cannot read {path}")
    if c.tls.ca_file and not c.address.startswith("https://"):
        out.append(f"discovery.consul.tls.ca_file is set but discovery.consul.address "
                   f"{c.address} is not https://: TLS would not be used")
    return out


def summary(cfg: Config) -> list[str]:
    lines = [
        f"cluster {cfg.cluster}, node {cfg.node}, trust domain {cfg.trust_domain}, roles "
        f"{', '.join(cfg.roles)}",
        f"data_dir {cfg.data_dir}",
    ]
    exposed = set(exposed_listeners(cfg))
    for key, listen in listeners_in_use(cfg):
        note = "  (reachable from other hosts)" if (key, listen) in exposed else ""
        lines.append(f"{key} {listen}{note}")
    if cfg.federation.peers:
        peers = ", ".join(f"{p.cluster} at {p.address}" for p in cfg.federation.peers)
        lines.append(f"peers: {peers}; exports {', '.join(cfg.federation.export)}")
    if cfg.discovery.workloads:
        lines.append(f"static workloads: {len(cfg.discovery.workloads)}")
    if cfg.discovery.backend == "consul":
        c = cfg.discovery.consul
        lines.append(f"catalog: consul at {c.address}"
                     + (f", datacenter {c.datacenter}" if c.datacenter else "")
                     + (", ACL token from a file" if c.token_file else ", no ACL token"))
    return lines
