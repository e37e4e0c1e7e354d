"""The root rotation of docs/operations.md, step by step, on the deployed testbed.

The CA host is this process (`isthmus ca` on the PKI directory); what a playbook does on the
nodes is behind `RotationSteps`: `DirectSteps` does it with the testbed's own tools (files put
into the machines, `systemctl reload isthmus`). The Ansible playbook `rotate-ca.yml` does the
same three things on real hosts; a `RotationSteps` that runs it (`ansible-playbook` in the
testbed's controller, one tag per step) can replace `DirectSteps` without touching
`rotate_root`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from federation.trust.pemfiles import load_certs

from .deploy import PKI_DIR, Appliance, Deployment, Pki, wait_until
from .faults import identity_chain


class RotationSteps(Protocol):
    """What happens on the nodes, one method per step of the procedure."""

    def distribute_bundle(self) -> None:
        """Steps 2 and 5: every node's trust.bundle becomes the CA host's bundle.pem, and every
        node has reloaded it (control nodes before their agents)."""

    def install_cluster_cas(self) -> None:
        """Step 3: each control node's trust.ca_cert/ca_key become its re-issued cluster CA."""

    def reissue_identities(self) -> None:
        """Step 4: every node holds an identity issued by its re-issued cluster CA."""


@dataclass
class DirectSteps:
    dep: Deployment
    timeout: float = 60.0

    def _reload(self, apps: list[Appliance], done: Callable[[Appliance], bool],
                what: str) -> None:
        # Control nodes first: an agent's renewal brings back its control node's bundle.
        for group in ([a for a in apps if a.kind == "edge"], [a for a in apps
                                                               if a.kind == "agent"]):
            for app in group:
                app.sighup()
            for app in group:
                wait_until(lambda a=app: done(a), self.timeout, f"{app.name}: {what}")

    def distribute_bundle(self) -> None:
        data = self.dep.pki.bundle.read_bytes()
        want = roots_of(self.dep.pki.bundle)
        apps = list(self.dep.appliances.values())
        started = time.time() - 1
        for app in apps:
            app.machine.put_file(f"{PKI_DIR}/bundle.pem", data, 0o644)

        def reloaded(app: Appliance) -> bool:
            # An agent's renewal rewrites its file with its control node's: compare the roots.
            path = app.machine.etc_upper / PKI_DIR.removeprefix("/etc/") / "bundle.pem"
            return roots_of(path) == want and any(
                str(ev.get("event", "")).startswith("trust bundle reloaded")
                for ev in app.log_events(started))

        self._reload(apps, reloaded, "bundle reloaded")

    def install_cluster_cas(self) -> None:
        for cluster, app in self.dep.edges.items():
            cert, key = self.dep.pki.cluster_ca(cluster)
            app.machine.put_file(f"{PKI_DIR}/cluster-ca.pem", cert.read_bytes(), 0o644)
            app.machine.put_file(f"{PKI_DIR}/cluster-ca.key", key.read_bytes(), 0o600)

    def reissue_identities(self) -> None:
        cas = {c: load_certs(self.dep.pki.cluster_ca(c)[0])[0] for c in self.dep.edges}
        self._reload(list(self.dep.appliances.values()),
                     lambda a: signed_by(identity_chain(a)[0], cas[a.cluster]),
                     "identity issued by the re-issued cluster CA")


def roots_of(path: Path) -> set[bytes]:
    return {c.fingerprint(hashes.SHA256()) for c in load_certs(path)}


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    pub = issuer.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        return False
    try:
        pub.verify(cert.signature, cert.tbs_certificate_bytes,
                   ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
    except Exception:
        return False
    return True


def chains_to(app: Appliance, root: x509.Certificate) -> bool:
    leaf, ca = identity_chain(app)[:2]
    return signed_by(leaf, ca) and signed_by(ca, root)


@dataclass
class RootRotation:
    """Replace the root A by a new root B with every node in service."""

    pki: Pki
    steps: RotationSteps
    dep: Deployment
    log: list[tuple[float, str]] = field(default_factory=list)

    def _step(self, what: str) -> None:
        self.log.append((time.time(), what))

    def run(self) -> x509.Certificate:
        old_root = load_certs(self.pki.dir / "root-ca.pem")[0]
        self._step("1. isthmus ca rotate-root")
        self.pki.ca("rotate-root")
        new_root = load_certs(self.pki.dir / "root-ca.pem")[0]
        assert new_root != old_root
        self._step("2. distribute the two-root bundle, reload every node")
        self.steps.distribute_bundle()
        self._step("3. isthmus ca cluster --force per cluster, install on the control nodes")
        for cluster in self.dep.edges:
            self.pki.ca("cluster", "--cluster", cluster, "--force")
        self.steps.install_cluster_cas()
        self._step("4. re-issue identities (reload control nodes, then agents)")
        self.steps.reissue_identities()
        stale = [a.name for a in self.dep.appliances.values() if not chains_to(a, new_root)]
        assert not stale, f"identities not chained to the new root: {stale}"
        self._step("5. isthmus ca retire-root, distribute the new-root bundle")
        self.pki.ca("retire-root")
        self.steps.distribute_bundle()
        self._step("done")
        return new_root
