"""The node's place in the shared root of trust: its cluster CA (control nodes), its identity,
and the renewal task that keeps that identity fresh."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from federation.trust import (
    CertificateAuthority,
    Identity,
    IdentityIssuer,
    IdentityManager,
    LocalRenewer,
    RemoteRenewer,
    TlsCredentials,
    TrustBundle,
    TrustError,
    create_cluster_ca,
    create_root,
    generate_key,
    issue_identity,
    request_identity,
)
from federation.trust.pemfiles import (
    load_bundle,
    load_ca,
    load_identity,
    write_bundle,
    write_certs,
    write_identity,
    write_key,
)
from federation.trust.renewal import IdentityFiles
from federation.trust.spiffe import Kind
from isthmus.config import Config

log = logging.getLogger(__name__)


class IdentityError(Exception):
    pass


@dataclass
class NodeTrust:
    credentials: TlsCredentials
    manager: IdentityManager
    authority: CertificateAuthority | None  # the cluster CA, on nodes that hold its key
    issuer: IdentityIssuer | None = None  # the control listener's, which signs with `authority`

    def reload_authority(self, cfg: Config) -> bool:
        """Re-read trust.ca_cert/ca_key (a root rotation installs a cluster CA re-issued under
        the new root); True if it changed and was swapped in for renewals and issuance."""
        if self.authority is None:
            return False
        try:
            ca = load_ca(Path(cfg.trust.ca_cert), Path(cfg.trust.ca_key))
        except TrustError as e:
            raise IdentityError(f"trust.ca_cert/ca_key: {e}") from None
        if ca.cert == self.authority.cert:
            return False
        if ca.spiffe_id != self.authority.spiffe_id:
            raise IdentityError(
                f"trust.ca_cert: the CA is {ca.spiffe_id}, this node's cluster CA is "
                f"{self.authority.spiffe_id}"
            )
        self.authority = ca
        self.manager.renewer = LocalRenewer(ca)
        if self.issuer is not None:
            self.issuer.authority = ca
        log.info("cluster CA reloaded", extra={
            "issuer": ca.cert.issuer.rfc4514_string(),
            "not_after": ca.cert.not_valid_after_utc.isoformat()})
        return True

    async def refresh(self, cfg: Config) -> list[str]:
        """SIGHUP: re-read the bundle and the cluster CA, then renew this node's identity at
        once - a leaf rotation on demand, and after a new cluster CA an identity chained to it.
        Returns the problems (logged by the caller); a failed renewal keeps the current
        identity, and the half-life renewal retries as usual."""
        problems = []
        try:
            self.manager.reload_bundle()
        except TrustError as e:
            problems.append(f"trust.bundle: {e}")
        try:
            self.reload_authority(cfg)
        except IdentityError as e:
            problems.append(str(e))
        try:
            await self.manager.renew_now()
        except (TrustError, OSError) as e:
            problems.append(f"identity renewal: {e}")
        return problems


def ensure_local_pki(cfg: Config) -> None:
    """For the built-in default only: a root and a cluster CA of its own under data_dir/pki,
    so `isthmus run` with no config has working mTLS. Never touches existing files."""
    bundle = Path(cfg.trust.bundle)
    if bundle.exists():
        return
    pki = bundle.parent
    root = create_root(cfg.trust_domain)
    ca = create_cluster_ca(root, cfg.cluster)
    write_key(pki / "root-ca.key", root.key)
    write_certs(pki / "root-ca.pem", [root.cert])
    write_key(Path(cfg.trust.ca_key), ca.key)
    write_certs(Path(cfg.trust.ca_cert), [ca.cert])
    write_bundle(bundle, TrustBundle.of([root.cert]))
    log.info("created a local PKI for the built-in default", extra={"dir": str(pki)})


def _usable(identity: Identity, cfg: Config, kind: Kind, now: dt.datetime) -> str | None:
    """Why the identity on disk cannot be used as this node's, or None."""
    sid = identity.spiffe_id
    if sid.trust_domain != cfg.trust_domain or sid.cluster != cfg.cluster:
        return f"it is {sid}, not an identity of cluster {cfg.cluster} in {cfg.trust_domain}"
    if sid.node != cfg.node or sid.kind is not kind:
        return f"it is {sid}, not {kind.value} {cfg.node}"
    if identity.not_after <= now:
        return f"it expired at {identity.not_after.isoformat()}"
    return None


def _stale_issuer(identity: Identity, authority: CertificateAuthority | None) -> str:
    """Why a node holding its cluster CA must reissue its own identity: the CA certificate was
    replaced (re-signed under a new root in a root rotation), so the identity on disk still
    chains to the old one; "" when it was issued under the current CA certificate."""
    if authority is None or identity.chain[1:2] == (authority.cert,):
        return ""
    return "it was issued under another certificate of the cluster CA"


def _refuse_foreign(identity: Identity, cfg: Config, kind: Kind, now: dt.datetime) -> None:
    """Never overwrite a current identity of another node: two appliances pointed at one
    trust.cert would take turns replacing each other's, and peering would fail for both."""
    sid = identity.spiffe_id
    if identity.not_after <= now:
        return
    if (sid.trust_domain, sid.cluster, sid.node, sid.kind) != (
        cfg.trust_domain, cfg.cluster, cfg.node, kind
    ):
        raise IdentityError(
            f"trust.cert: {cfg.trust.cert} holds {sid}, a current identity of another node "
            f"(this one is {kind.value} {cfg.node} of cluster {cfg.cluster} in "
            f"{cfg.trust_domain}); point trust.cert/trust.key at this node's own files (they "
            f"default to <data_dir>/pki/), or delete them to replace that identity on purpose"
        )


def load_node_trust(cfg: Config, kind: Kind = Kind.GATEWAY) -> NodeTrust:
    t = cfg.trust
    try:
        bundle = load_bundle(Path(t.bundle))
    except TrustError as e:
        raise IdentityError(
            f"trust.bundle: {e} (create a PKI with `isthmus ca init`; `isthmus docs trust` "
            "explains it)"
        ) from None
    authority = None
    if Path(t.ca_cert).exists() and Path(t.ca_key).exists():
        try:
            authority = load_ca(Path(t.ca_cert), Path(t.ca_key))
        except TrustError as e:
            raise IdentityError(f"trust.ca_cert/ca_key: {e}") from None
        if authority.spiffe_id.cluster != cfg.cluster:
            raise IdentityError(
                f"trust.ca_cert: the CA is cluster {authority.spiffe_id.cluster!r}'s, "
                f"this node is in {cfg.cluster!r}"
            )
    now = dt.datetime.now(dt.UTC)
    identity = None
    problem = "no identity in trust.cert/trust.key"
    if Path(t.cert).exists() and Path(t.key).exists():
        try:
            identity = load_identity(Path(t.cert), Path(t.key))
            problem = _usable(identity, cfg, kind, now) or _stale_issuer(identity, authority)
        except TrustError as e:
            problem = str(e)
        if problem and identity is not None:
            _refuse_foreign(identity, cfg, kind, now)
        if problem:
            identity = None
    if identity is None:
        if authority is None:
            raise IdentityError(
                f"trust.cert: {problem}, and no cluster CA key to issue one (issue it with "
                "`isthmus ca issue`, or configure trust.ca_cert/ca_key)"
            )
        identity = issue_identity(authority, kind, cfg.node)
        write_identity(Path(t.cert), Path(t.key), identity, force=True)
        log.info("issued this node's identity", extra={"spiffe_id": str(identity.spiffe_id),
                                                       "reason": problem})
    credentials = TlsCredentials(identity, bundle, trust_domain=cfg.trust_domain)
    files = IdentityFiles(Path(t.cert), Path(t.key), Path(t.bundle))
    if authority is not None:
        renewer: LocalRenewer | RemoteRenewer = LocalRenewer(authority)
    elif cfg.agent.control:
        renewer = RemoteRenewer(cfg.agent.control, lambda: credentials.bundle)
    else:
        raise IdentityError(
            "trust: this node holds no cluster CA key and has no agent.control to renew its "
            "identity from"
        )
    return NodeTrust(credentials, IdentityManager(credentials, renewer, files=files), authority)


async def bootstrap_agent(cfg: Config) -> None:
    """An agent without a usable identity gets its first one from its control node, with the
    one-time token in `agent.bootstrap_token_file`. The key is made here and never sent."""
    t = cfg.trust
    if Path(t.cert).exists() and Path(t.key).exists():
        now = dt.datetime.now(dt.UTC)
        try:
            current = load_identity(Path(t.cert), Path(t.key))
        except TrustError as e:
            problem = str(e)
        else:
            problem = _usable(current, cfg, Kind.AGENT, now)
            if problem:
                _refuse_foreign(current, cfg, Kind.AGENT, now)
        if not problem:
            return
    if not cfg.agent.control:
        raise IdentityError("agent.control: required for an agent (its control node HOST:PORT)")
    token_path = Path(cfg.agent.bootstrap_token_file)
    try:
        token = token_path.read_text().strip()
    except OSError as e:
        raise IdentityError(
            f"agent.bootstrap_token_file: cannot read {token_path} ({e.strerror}); create a "
            "token on the control node with `isthmus token create`"
        ) from None
    try:
        bundle = load_bundle(Path(t.bundle))
        issued = await request_identity(
            cfg.agent.control, cfg.node, Kind.AGENT, generate_key(), bundle=bundle,
            bootstrap_token=token, trust_domain=cfg.trust_domain, cluster=cfg.cluster,
        )
    except TrustError as e:
        raise IdentityError(f"bootstrap from {cfg.agent.control} failed: {e}") from None
    write_identity(Path(t.cert), Path(t.key), issued.identity, force=True)
    write_bundle(Path(t.bundle), issued.bundle)
    log.info("agent identity bootstrapped", extra={"spiffe_id": str(issued.identity.spiffe_id)})
