"""The root rotation of docs/operations.md as an operator runs it: the collection's playbook
`rotate-ca.yml`, its start phase and then, right away, its finish phase, on the deployed testbed.

- start: a new root beside the old one on the CA host (this run's directory); the two-root
  bundle on every machine, one at a time, control nodes first, each reloaded (SIGHUP); each
  edge's cluster CA signed again under the new root from a CSR made on the edge, then reloaded
  (it loads the CA and reissues its identity under it); then the VM's agent reloaded, so that
  it renews from east's control node under the new root.
- finish: refused while any machine's identity does not chain to the new root; the old root
  retired; the one-root bundle on every machine, reloaded.

Between and after the phases every node is checked from the host: its identity chains to the
new root, and what its bundle holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from federation.trust.pemfiles import load_certs

from .deploy import Appliance, Deployment
from .faults import identity_chain


def fingerprints(certs: list[x509.Certificate]) -> set[str]:
    return {c.fingerprint(hashes.SHA256()).hex() for c in certs}


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
class PlaybookRotation:
    """Replace the root A by a new root B with every node in service, with rotate-ca.yml."""

    dep: Deployment
    log: list[tuple[float, str]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds each playbook run took
    bundles: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # after -> node -> fps

    def _step(self, what: str) -> None:
        self.log.append((time.time(), what))

    def _bundles(self) -> dict[str, set[str]]:
        out = {"CA host": fingerprints(load_certs(self.dep.pki.bundle))}
        for name, app in self.dep.appliances.items():
            out[name] = fingerprints(load_certs(self.dep.bundle_path(app)))
        return out

    def _playbook(self, phase: str, *args: str) -> None:
        self._step(f"rotate-ca.yml {' '.join(args) or '(start)'}")
        result = self.dep.playbook("rotate-ca.yml", *args)
        self.phases[phase] = round(result.seconds, 1)
        if result.rc != 0:
            raise AssertionError(f"rotate-ca.yml {phase} failed (rc {result.rc}):\n"
                                 f"{result.tail(40)}")
        self._step(f"rotate-ca.yml {phase} done ({result.seconds:.1f} s): "
                   f"changed {result.changed()}")

    def run(self) -> tuple[x509.Certificate, x509.Certificate]:
        """(old root, new root) once both phases are through."""
        old_root = load_certs(self.dep.pki.root)[0]
        self._playbook("start")
        new_root = load_certs(self.dep.pki.root)[0]
        assert new_root != old_root, "rotate-ca.yml made no new root"
        stale = [a.name for a in self.dep.appliances.values() if not chains_to(a, new_root)]
        assert not stale, f"identities not chained to the new root after the start: {stale}"
        self.bundles["start"] = self._bundles()
        self._playbook("finish", "-e", "isthmus_rotation=finish")
        self.bundles["finish"] = self._bundles()
        return old_root, new_root
