"""The catalog backend a config asks for: the embedded store, or Consul."""

from __future__ import annotations

import stat
from pathlib import Path

from discovery.catalog import Catalog
from discovery.consul.client import ConsulOptions
from discovery.consul.mapping import MappingRules
from discovery.consul.store import ConsulCatalog
from discovery.embedded import EmbeddedCatalog
from discovery.errors import StoreError
from discovery.limits import WriteLimits
from discovery.model import Health
from isthmus.config import Config, ConsulSection


def make_catalog(cfg: Config) -> Catalog:
    """Raises StoreError (a DiscoveryError) naming the key when the backend cannot be built."""
    limits = WriteLimits(min_check_interval=cfg.discovery.min_check_interval)
    if cfg.discovery.backend == "embedded":
        return EmbeddedCatalog(cfg.data_dir, cfg.cluster, cfg.egress.vip_cidr, limits=limits)
    return ConsulCatalog(
        consul_options(cfg.discovery.consul, cfg.cluster),
        data_dir=cfg.data_dir,
        vip_cidr=cfg.egress.vip_cidr,
        limits=limits,
    )


def consul_options(c: ConsulSection, cluster: str) -> ConsulOptions:
    return ConsulOptions(
        address=c.address,
        token=read_consul_token(c.token_file) if c.token_file else None,
        datacenter=c.datacenter,
        ca_file=c.tls.ca_file,
        cert_file=c.tls.cert_file,
        key_file=c.tls.key_file,
        stale_reads=c.stale_reads,
        wait=c.wait,
        request_timeout=c.request_timeout,
        max_connections=c.max_connections,
        liveness_interval=c.liveness_interval,
        retry_max=c.retry_max,
        query_min_interval=c.query_min_interval,
        startup_timeout=c.startup_timeout,
        kv_prefix=c.kv_prefix or "",
        ignore_services=tuple(c.ignore_services),
        rules=MappingRules(
            cluster=cluster,
            namespace_meta_key=c.namespace_meta_key,
            namespace_tag_prefix=c.namespace_tag_prefix,
            port_name_meta_key=c.port_name_meta_key,
            port_meta_prefix=c.port_meta_prefix,
            default_port_name=c.default_port_name,
            region_node_meta=c.locality_node_meta.region,
            zone_node_meta=c.locality_node_meta.zone,
            warning_is=Health(c.warning_is),
        ),
    )


def read_consul_token(path: str) -> str:
    """The ACL token from `path`: a secret, so the file must be private (0600 or tighter)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        token = p.read_text().strip()
    except OSError as e:
        raise StoreError(f"discovery.consul.token_file: cannot read {p}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StoreError(
            f"discovery.consul.token_file: {p} is readable by others (mode "
            f"{stat.S_IMODE(mode):04o}): expected 0600; run `chmod 600 {p}`"
        )
    if not token:
        raise StoreError(f"discovery.consul.token_file: {p} is empty: expected a Consul ACL token")
    return token
