"""Where `isthmus ca` keeps its files under `--dir` (see docs/trust.md).

DIR/root-ca.pem, root-ca.key            the current root (keep the key offline)
DIR/bundle.pem                          every trusted root          -> trust.bundle
DIR/roots/<fingerprint>.pem/.key        roots replaced by `ca rotate-root`
DIR/clusters/<c>/ca.pem, ca.key         cluster c's CA               -> trust.ca_cert/ca_key
DIR/clusters/<c>/<kind>/<node>.pem/.key a leaf identity (leaf + CA)  -> trust.cert/key
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from federation.trust.spiffe import Kind, check_label


@dataclass(frozen=True, slots=True)
class PkiLayout:
    root: Path

    @property
    def root_cert(self) -> Path:
        return self.root / "root-ca.pem"

    @property
    def root_key(self) -> Path:
        return self.root / "root-ca.key"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle.pem"

    @property
    def retired_dir(self) -> Path:
        return self.root / "roots"

    def retired_root(self, fingerprint: str) -> tuple[Path, Path]:
        base = self.retired_dir / fingerprint[:16]
        return base.with_suffix(".pem"), base.with_suffix(".key")

    @property
    def clusters_dir(self) -> Path:
        return self.root / "clusters"

    def cluster_dir(self, cluster: str) -> Path:
        return self.clusters_dir / check_label("cluster", cluster)

    def cluster_ca_cert(self, cluster: str) -> Path:
        return self.cluster_dir(cluster) / "ca.pem"

    def cluster_ca_key(self, cluster: str) -> Path:
        return self.cluster_dir(cluster) / "ca.key"

    def identity_cert(self, cluster: str, kind: Kind | str, node: str) -> Path:
        return self.cluster_dir(cluster) / Kind(kind).value / f"{check_label('node', node)}.pem"

    def identity_key(self, cluster: str, kind: Kind | str, node: str) -> Path:
        return self.identity_cert(cluster, kind, node).with_suffix(".key")

    def clusters(self) -> list[str]:
        if not self.clusters_dir.is_dir():
            return []
        return sorted(p.name for p in self.clusters_dir.iterdir() if (p / "ca.pem").is_file())
