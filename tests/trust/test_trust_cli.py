"""`isthmus ca ...` through the parser the entry point will use, and as `python -m`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from federation.trust.layout import PkiLayout
from federation.trust.pemfiles import load_bundle, load_certs, load_identity
from federation.trust.spiffe import SpiffeId
from federation.trust.verify import verify_chain
from isthmus.cli_ca import add_parsers

pytestmark = pytest.mark.timeout(60)


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="isthmus")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ca", *argv])
    return args.func(args)


def build(d: Path) -> PkiLayout:
    assert run("init", "--trust-domain", "mesh.test", "--dir", str(d)) == 0
    for c in ("east", "west"):
        assert run("cluster", "--cluster", c, "--dir", str(d)) == 0
        assert run("issue", "--cluster", c, "--node", f"{c}-gw-1", "--dir", str(d)) == 0
    assert (
        run(
            "issue",
            "--cluster",
            "east",
            "--node",
            "vm-1",
            "--kind",
            "agent",
            "--ttl",
            "2h",
            "--dir",
            str(d),
        )
        == 0
    )
    return PkiLayout(d)


def test_operator_builds_root_two_clusters_and_identities(tmp_path, capsys) -> None:
    layout = build(tmp_path)
    for key in [
        layout.root_key,
        layout.cluster_ca_key("east"),
        layout.identity_key("west", "gateway", "west-gw-1"),
    ]:
        assert (key.stat().st_mode & 0o777) == 0o600
    bundle = load_bundle(layout.bundle)
    ident = load_identity(
        layout.identity_cert("east", "agent", "vm-1"), layout.identity_key("east", "agent", "vm-1")
    )
    assert verify_chain(ident.chain, bundle, "mesh.test") == SpiffeId.parse(
        "spiffe://mesh.test/cluster/east/agent/vm-1"
    )
    lifetime = ident.not_after - ident.not_before
    assert 7200 <= lifetime.total_seconds() <= 7200 + 720
    capsys.readouterr()
    assert run("show", str(layout.identity_cert("west", "gateway", "west-gw-1"))) == 0
    out = capsys.readouterr().out
    assert "identity:    spiffe://mesh.test/cluster/west/gateway/west-gw-1" in out
    assert "issuer:      CN=west,OU=isthmus cluster CA,O=mesh.test" in out
    assert "(valid)" in out and "CA (path length 0)" in out


def test_existing_keys_need_force(tmp_path, capsys) -> None:
    layout = build(tmp_path)
    before = layout.cluster_ca_key("east").read_bytes()
    capsys.readouterr()
    assert run("cluster", "--cluster", "east", "--dir", str(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --force" in err[0]
    assert layout.cluster_ca_key("east").read_bytes() == before
    assert run("init", "--trust-domain", "mesh.test", "--dir", str(tmp_path)) == 1
    assert run("cluster", "--cluster", "east", "--dir", str(tmp_path), "--force") == 0
    assert layout.cluster_ca_key("east").read_bytes() != before
    assert (layout.cluster_ca_key("east").stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cluster", "--cluster", "east"], "run `isthmus ca init` first"),
        (["issue", "--cluster", "nowhere", "--node", "n1"], "run `isthmus ca cluster` first"),
        (["cluster", "--cluster", "Bad_Name"], "is not a DNS label"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, argv: list[str], message: str) -> None:
    if argv[0] == "issue" or "Bad_Name" in argv:
        run("init", "--trust-domain", "mesh.test", "--dir", str(tmp_path))
        capsys.readouterr()
    assert run(*argv, "--dir", str(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_show_missing_file(capsys, tmp_path) -> None:
    assert run("show", str(tmp_path / "nope.pem")) == 1
    assert "cannot read" in capsys.readouterr().err


def test_root_rotation_commands(tmp_path, capsys) -> None:
    layout = build(tmp_path)
    old_root = load_certs(layout.root_cert)[0]
    assert run("rotate-root", "--dir", str(tmp_path)) == 0
    bundle = load_bundle(layout.bundle)
    assert len(bundle.roots) == 2 and old_root in bundle.roots
    # Old identities still verify against the two-root bundle.
    old = load_identity(
        layout.identity_cert("east", "gateway", "east-gw-1"),
        layout.identity_key("east", "gateway", "east-gw-1"),
    )
    verify_chain(old.chain, bundle, "mesh.test")
    capsys.readouterr()
    assert run("retire-root", "--dir", str(tmp_path)) == 1
    assert "east, west" in capsys.readouterr().err
    for c in ("east", "west"):
        assert run("cluster", "--cluster", c, "--dir", str(tmp_path), "--force") == 0
    assert run("retire-root", "--dir", str(tmp_path)) == 0
    bundle = load_bundle(layout.bundle)
    assert bundle.roots == (load_certs(layout.root_cert)[0],)
    assert len(list(layout.retired_dir.glob("*.key"))) == 1


def test_python_dash_m(tmp_path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "isthmus.cli_ca",
        "init",
        "--trust-domain",
        "m.test",
        "--dir",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bundle.pem").is_file()
