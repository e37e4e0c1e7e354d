"""`isthmus ca ...`: an operator's offline CA (DESIGN §7). File layout: federation.trust.layout.

isthmus ca init --trust-domain TD --dir DIR          root CA + bundle
isthmus ca cluster --cluster NAME --dir DIR          a cluster's intermediate CA
isthmus ca issue --cluster NAME --node NODE [--kind gateway|agent] --dir DIR
isthmus ca show FILE                                 what a certificate says
isthmus ca rotate-root --dir DIR                     new root, both roots in the bundle
isthmus ca retire-root --dir DIR                     bundle back to the current root only
isthmus ca csr --cluster NAME --trust-domain TD --key FILE --out FILE
                                                     a cluster CA key (made here) and its CSR
isthmus ca sign-cluster --csr FILE --dir DIR         the root signs a cluster CA's CSR
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from discovery.durations import parse_duration
from federation.trust.bundle import TrustBundle
from federation.trust.ca import (
    CLUSTER_CA_LIFETIME,
    IDENTITY_LIFETIME,
    ROOT_LIFETIME,
    CertificateAuthority,
    cluster_of_csr,
    create_cluster_ca,
    create_root,
    fingerprint,
    generate_key,
    issue_identity,
    make_cluster_csr,
    sign_cluster_csr,
    utcnow,
)
from federation.trust.errors import KeyExists, TrustError
from federation.trust.layout import PkiLayout
from federation.trust.pemfiles import (
    load_bundle,
    load_ca,
    load_certs,
    load_csr,
    load_key,
    write_bundle,
    write_certs,
    write_csr,
    write_identity,
    write_key,
)
from federation.trust.spiffe import Kind
from federation.trust.x509util import uri_sans


class CliError(Exception):
    pass


def _days(value: str) -> dt.timedelta:
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {value!r}") from None
    if days <= 0:
        raise argparse.ArgumentTypeError("days must be positive")
    return dt.timedelta(days=days)


def _ttl(value: str) -> dt.timedelta:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the ttl must be positive")
    return dt.timedelta(seconds=seconds)


def _write_ca(cert_path: Path, key_path: Path, ca: CertificateAuthority, force: bool) -> None:
    write_key(key_path, ca.key, force=force)
    write_certs(cert_path, [ca.cert], force=force)


def _root(layout: PkiLayout) -> CertificateAuthority:
    if not layout.root_cert.exists():
        raise CliError(f"no root CA in {layout.root}; run `isthmus ca init` first")
    return load_ca(layout.root_cert, layout.root_key)


def cmd_init(args: argparse.Namespace) -> int:
    layout = PkiLayout(Path(args.dir))
    if not args.force and (layout.root_key.exists() or layout.root_cert.exists()):
        raise KeyExists(f"{layout.root_key} exists; pass --force to replace the root")
    root = create_root(args.trust_domain, lifetime=args.days)
    _write_ca(layout.root_cert, layout.root_key, root, args.force)
    write_bundle(layout.bundle, TrustBundle.of([root.cert]))
    print(f"root CA   {layout.root_cert} (key {layout.root_key}; keep it offline)")
    print(f"bundle    {layout.bundle}  -> trust.bundle")
    print(f"expires   {root.cert.not_valid_after_utc.isoformat()}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    layout = PkiLayout(Path(args.dir))
    root = _root(layout)
    cert_path, key_path = layout.cluster_ca_cert(args.cluster), layout.cluster_ca_key(args.cluster)
    ca = create_cluster_ca(
        root, args.cluster, lifetime=args.days, name_constraints=args.name_constraints
    )
    _write_ca(cert_path, key_path, ca, args.force)
    print(f"cluster CA {ca.spiffe_id}")
    print(f"cert      {cert_path}  -> trust.ca_cert")
    print(f"key       {key_path}  -> trust.ca_key")
    print(f"expires   {ca.cert.not_valid_after_utc.isoformat()}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    layout = PkiLayout(Path(args.dir))
    cert_path = layout.cluster_ca_cert(args.cluster)
    if not cert_path.exists():
        raise CliError(f"no CA for cluster {args.cluster}; run `isthmus ca cluster` first")
    ca = load_ca(cert_path, layout.cluster_ca_key(args.cluster))
    identity = issue_identity(ca, args.kind, args.node, lifetime=args.ttl)
    out_cert = layout.identity_cert(args.cluster, args.kind, args.node)
    out_key = layout.identity_key(args.cluster, args.kind, args.node)
    write_identity(out_cert, out_key, identity, force=args.force)
    print(f"identity  {identity.spiffe_id}")
    print(f"cert      {out_cert}  -> trust.cert (leaf + cluster CA)")
    print(f"key       {out_key}  -> trust.key")
    print(f"expires   {identity.not_after.isoformat()}")
    return 0


def cmd_rotate_root(args: argparse.Namespace) -> int:
    layout = PkiLayout(Path(args.dir))
    old = _root(layout)
    old_fp = fingerprint(old.cert)
    bundle = load_bundle(layout.bundle) if layout.bundle.exists() else TrustBundle.of([old.cert])
    archived_cert, archived_key = layout.retired_root(old_fp)
    _write_ca(archived_cert, archived_key, old, False)
    new = create_root(old.trust_domain, lifetime=args.days)
    _write_ca(layout.root_cert, layout.root_key, new, True)
    # New root first: peers that still have only the old root keep working until they reload.
    write_bundle(layout.bundle, TrustBundle.of([new.cert, *bundle.roots]))
    print(f"new root  {layout.root_cert} sha256 {fingerprint(new.cert)}")
    print(f"old root  {archived_cert} sha256 {old_fp} (still trusted)")
    print(f"bundle    {layout.bundle} now trusts both; distribute it before re-issuing CAs")
    return 0


def _chains_to(cert: x509.Certificate, root: x509.Certificate) -> bool:
    return bool(TrustBundle.of([root]).issuers_of(cert))


def cmd_retire_root(args: argparse.Namespace) -> int:
    layout = PkiLayout(Path(args.dir))
    root = _root(layout)
    stale = [
        c
        for c in layout.clusters()
        if not _chains_to(load_certs(layout.cluster_ca_cert(c))[0], root.cert)
    ]
    if stale and not args.force:
        raise CliError(
            f"cluster CAs not yet re-issued under the current root: {', '.join(stale)} "
            "(run `isthmus ca cluster --force` for each, or pass --force)"
        )
    bundle = load_bundle(layout.bundle)
    dropped = [fp for fp in bundle.fingerprints if fp != fingerprint(root.cert)]
    write_bundle(layout.bundle, TrustBundle.of([root.cert]))
    for fp in dropped:
        print(f"retired   sha256 {fp}")
    print(f"bundle    {layout.bundle} trusts only sha256 {fingerprint(root.cert)}")
    return 0


def cmd_csr(args: argparse.Namespace) -> int:
    """On a control node: its cluster CA key stays here; only the CSR goes to the root."""
    key_path, csr_path = Path(args.key), Path(args.out)
    if key_path.exists() and not args.force:
        key = load_key(key_path)
        made = "existing key, kept"
    else:
        key = generate_key()
        write_key(key_path, key, force=args.force)
        made = "new key, 0600"
    write_csr(csr_path, make_cluster_csr(key, args.trust_domain, args.cluster))
    print(f"key       {key_path} ({made})  -> trust.ca_key")
    print(f"csr       {csr_path}  (cluster CA spiffe://{args.trust_domain}/cluster/{args.cluster});"
          " sign it with `isthmus ca sign-cluster` where the root is")
    return 0


def cmd_sign_cluster(args: argparse.Namespace) -> int:
    """On the CA host: the root signs a cluster CA's CSR; the key never came here."""
    layout = PkiLayout(Path(args.dir))
    root = _root(layout)
    csr = load_csr(Path(args.csr))
    cluster = cluster_of_csr(csr, root.trust_domain)
    cert = sign_cluster_csr(
        root, csr, lifetime=args.days, name_constraints=args.name_constraints
    )
    # Kept beside the root (certificate only: the key is on the control node), so that
    # `retire-root` knows which root each cluster CA chains to.
    cert_path = layout.cluster_ca_cert(cluster)
    write_certs(cert_path, [cert], force=args.force)
    if args.out:
        write_certs(Path(args.out), [cert], force=True)
    print(f"cluster CA spiffe://{root.trust_domain}/cluster/{cluster}")
    print(f"cert      {args.out or cert_path}  -> trust.ca_cert (with the key the CSR came from)")
    print(f"expires   {cert.not_valid_after_utc.isoformat()}")
    return 0


def describe(cert: x509.Certificate, now: dt.datetime) -> list[str]:
    lines = []
    uris = uri_sans(cert)
    lines.append(f"identity:    {', '.join(uris) if uris else '(no URI SAN)'}")
    lines.append(f"subject:     {cert.subject.rfc4514_string()}")
    lines.append(f"issuer:      {cert.issuer.rfc4514_string()}")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    state = "valid"
    if now < start:
        state = "not yet valid"
    elif now > end:
        state = "EXPIRED"
    lines.append(f"validity:    {start.isoformat()} .. {end.isoformat()} ({state})")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        role = f"CA (path length {bc.path_length})" if bc.ca else "leaf"
    except x509.ExtensionNotFound:
        role = "leaf (no basic constraints)"
    if cert.issuer == cert.subject:
        role = f"root {role}"
    lines.append(f"role:        {role}")
    lines.append(f"serial:      {cert.serial_number:x}")
    lines.append(f"sha256:      {fingerprint(cert)}")
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    certs = load_certs(Path(args.file))
    now = utcnow()
    for i, cert in enumerate(certs):
        if len(certs) > 1:
            print(f"[{i}]")
        print("\n".join(describe(cert, now)))
    return 0


def _run(handler: object) -> object:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)  # type: ignore[operator]
        except (CliError, TrustError, OSError) as exc:
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, OSError) and exc.filename:
                msg = f"{exc.filename}: {msg}"
            print(f"isthmus ca: error: {msg}", file=sys.stderr)
            return 1

    return wrapped


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ca = sub.add_parser("ca", help="manage the CA hierarchy and identities (offline)")
    casub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, force: str = "replace existing keys") -> None:
        p.add_argument(
            "--dir", metavar="DIR", required=True,
            help="the PKI directory (`isthmus docs trust` describes its layout)",
        )
        p.add_argument("--force", action="store_true", help=f"{force} (default: refuse)")

    p = casub.add_parser("init", help="create the root CA and the trust bundle")
    p.add_argument(
        "--trust-domain", metavar="DOMAIN", required=True,
        help="the federation's SPIFFE trust domain, e.g. mesh.example.org",
    )
    p.add_argument(
        "--days", metavar="N", type=_days, default=ROOT_LIFETIME,
        help="root lifetime in days (default 3650)",
    )
    common(p)
    p.set_defaults(func=_run(cmd_init))

    p = casub.add_parser("cluster", help="create a cluster's intermediate CA")
    p.add_argument("--cluster", metavar="NAME", required=True, help="the cluster's name")
    p.add_argument(
        "--days", metavar="N", type=_days, default=CLUSTER_CA_LIFETIME,
        help="lifetime in days (default 365)",
    )
    p.add_argument(
        "--name-constraints",
        action="store_true",
        help="restrict the CA to URI SANs in the trust domain (default: no constraints)",
    )
    common(p)
    p.set_defaults(func=_run(cmd_cluster))

    p = casub.add_parser("issue", help="issue a gateway or agent identity")
    p.add_argument("--cluster", metavar="NAME", required=True, help="the cluster that issues it")
    p.add_argument("--node", metavar="NAME", required=True, help="the node it names")
    p.add_argument(
        "--kind", choices=[k.value for k in Kind], default=Kind.GATEWAY.value,
        help="what the node is (default %(default)s)",
    )
    p.add_argument(
        "--ttl", metavar="DURATION", type=_ttl, default=IDENTITY_LIFETIME,
        help="lifetime, e.g. 24h (default 24h, never past the cluster CA)",
    )
    common(p)
    p.set_defaults(func=_run(cmd_issue))

    p = casub.add_parser(
        "csr", help="on a control node: a cluster CA key (kept here) and a CSR for the root"
    )
    p.add_argument("--cluster", metavar="NAME", required=True, help="the cluster's name")
    p.add_argument(
        "--trust-domain", metavar="DOMAIN", required=True,
        help="the federation's SPIFFE trust domain",
    )
    p.add_argument(
        "--key", metavar="FILE", required=True,
        help="the cluster CA key: made 0600 when absent, else used as it is",
    )
    p.add_argument("--out", metavar="FILE", required=True, help="where to write the CSR (PEM)")
    p.add_argument(
        "--force", action="store_true", help="make a new key even if FILE exists (replaces it)"
    )
    p.set_defaults(func=_run(cmd_csr))

    p = casub.add_parser(
        "sign-cluster", help="sign a cluster CA's CSR with the root (the key stays with it)"
    )
    p.add_argument("--csr", metavar="FILE", required=True, help="the CSR from `isthmus ca csr`")
    p.add_argument(
        "--out", metavar="FILE",
        help="also write the certificate here (default: only DIR/clusters/<cluster>/ca.pem)",
    )
    p.add_argument(
        "--days", metavar="N", type=_days, default=CLUSTER_CA_LIFETIME,
        help="lifetime in days (default 365, never past the root)",
    )
    p.add_argument(
        "--name-constraints",
        action="store_true",
        help="restrict the CA to URI SANs in the trust domain (default: no constraints)",
    )
    common(p, force="replace the cluster's certificate in DIR")
    p.set_defaults(func=_run(cmd_sign_cluster))

    p = casub.add_parser("show", help="show what a certificate file says")
    p.add_argument("file", metavar="FILE", help="a PEM file with one or more certificates")
    p.set_defaults(func=_run(cmd_show))

    p = casub.add_parser("rotate-root", help="create a new root; the bundle trusts both")
    p.add_argument(
        "--days", metavar="N", type=_days, default=ROOT_LIFETIME,
        help="root lifetime in days (default 3650)",
    )
    p.add_argument(
        "--dir", metavar="DIR", required=True,
        help="the PKI directory (`isthmus docs trust` describes its layout)",
    )
    p.set_defaults(func=_run(cmd_rotate_root))

    p = casub.add_parser("retire-root", help="trust only the current root")
    common(
        p,
        force="retire the old roots even while a cluster CA still chains to one; peers "
        "holding such a CA's identities are then refused",
    )
    p.set_defaults(func=_run(cmd_retire_root))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="isthmus")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if sys.argv[1:2] == ["ca"] else ["ca", *sys.argv[1:]]))
