"""What a new user meets first: the CLI finds its appliance, says what it needs, explains
what it shows, and refuses what would silently do nothing."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from isthmus.cli import build_parser
from isthmus.render import ago, render_status

from .conftest import ApplianceProcess, make_config

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "isthmus.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def clean_env(tmp: Path) -> dict[str, str]:
    """No token or API from the outside, and an empty home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISTHMUS_")}
    env["HOME"] = str(tmp / "home")
    env.pop("XDG_STATE_HOME", None)
    return env


# --- finding the appliance --------------------------------------------------------------------


def test_client_commands_take_the_api_and_token_from_the_config(
    tmp_path: Path, appliance_process: ApplianceProcess
) -> None:
    appliance_process.start()
    env = clean_env(tmp_path)
    config = str(appliance_process.config_path)
    r = cli("status", "--config", config, env=env)
    assert r.returncode == 0, r.stderr
    assert "cluster east" in r.stdout
    r = cli("status", env={**env, "ISTHMUS_CONFIG": config})
    assert r.returncode == 0, r.stderr
    # a refused token says where it came from
    (tmp_path / "wrong").write_text("not-the-token\n")
    r = cli("status", "--config", config, "--token-file", str(tmp_path / "wrong"), env=env)
    assert r.returncode == 1
    assert "401" in r.stderr and f"{tmp_path / 'wrong'}, --token-file" in r.stderr
    r = cli("status", "--config", config, env={**env, "ISTHMUS_TOKEN": "nope"})
    assert r.returncode == 0, "--config beats $ISTHMUS_TOKEN"
    r = cli("status", env={**env, "ISTHMUS_CONFIG": config, "ISTHMUS_TOKEN": "nope"})
    assert r.returncode == 1 and "$ISTHMUS_TOKEN" in r.stderr
    r = cli("status", "--config", str(tmp_path / "missing.yaml"), env=env)
    assert r.returncode == 1 and "missing.yaml" in r.stderr and "cannot read" in r.stderr


# --- help -------------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, path: str = "isthmus"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_has_help_with_its_default_and_one_metavar_style() -> None:
    missing, no_default, style = [], [], []
    for path, parser in _parsers(build_parser()):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction | argparse._HelpAction | argparse
                          ._VersionAction):
                continue
            name = f"{path} {a.option_strings[0] if a.option_strings else a.dest}"
            if not a.help:
                missing.append(name)
                continue
            has_default = a.default not in (None, False, [], argparse.SUPPRESS)
            if has_default and "default" not in a.help:
                no_default.append(name)
            metavar = a.metavar if isinstance(a.metavar, str) else None
            if metavar and metavar != metavar.upper():
                style.append(f"{name}: {metavar}")
            if a.nargs != 0 and a.option_strings and not a.choices and not metavar:
                style.append(f"{name}: no metavar")
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help hides the default: {no_default}"
    assert not style, f"metavars not in the NAME style: {style}"


def test_retire_root_force_says_what_it_skips() -> None:
    r = cli("ca", "retire-root", "--help")
    assert "still chains" in r.stdout and "replace existing keys" not in r.stdout


def test_help_points_at_installed_docs_never_at_repository_paths() -> None:
    for args in (["--help"], ["run", "--help"], ["ca", "init", "--help"]):
        out = cli(*args).stdout
        assert "docs/" not in out, (args, out)
    assert "isthmus docs" in cli("--help").stdout


def test_isthmus_docs_lists_and_prints_the_guides() -> None:
    r = cli("docs")
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines() if line and " " in line][:-1]
    assert {"configuration", "trust", "operations", "architecture"} <= set(names), r.stdout
    r = cli("docs", "trust")
    assert r.returncode == 0 and r.stdout.startswith("# Trust")
    r = cli("docs", "nosuch")
    assert r.returncode == 1 and "there are:" in r.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_guides(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=300, capture_output=True,
    )
    [wheel] = tmp_path.glob("isthmus-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for doc in ("trust.md", "configuration.md", "architecture.md", "openapi.yaml"):
        assert any(n.endswith(f".data/data/share/doc/isthmus/{doc}") for n in names), doc


def test_the_product_docs_stand_alone() -> None:
    # the text docs (docs/img/ holds the console's screenshots)
    docs = sorted(p for p in (ROOT / "docs").glob("*") if p.suffix in (".md", ".yaml"))
    for path in [ROOT / "README.md", *docs]:
        text = path.read_text()
        assert "../shared" not in text, path
        assert not re.search(r"DESIGN(\.md)? ?§", text), path


# --- status ----------------------------------------------------------------------------------


def test_status_explains_what_it_shows() -> None:
    now = time.time()
    status = {
        "cluster": "east", "node": "east-gw-1", "trust_domain": "mesh.test",
        "roles": ["control", "ingress"], "version": "0.1.0", "uptime_seconds": 75,
        "catalog": {"backend": "EmbeddedCatalog", "index": 9, "services": 1, "workloads": 1,
                    "health": {"passing": 0, "critical": 1, "unknown": 0}},
        "services": [
            {"name": "reviews", "namespace": "default", "vip": "127.240.0.5",
             "ports": {"http": 9080}, "clusters": {"east": {"healthy": 0, "total": 1}}},
            {"name": "ratings", "namespace": "default", "vip": "127.240.0.6",
             "ports": {"http": 9080}, "clusters": {"west": {"healthy": 1, "total": 1}}},
        ],
        "peers": [{"cluster": "west", "address": "198.51.100.2:15443", "state": "stale",
                   "last_sync": time.strftime("%Y-%m-%dT%H:%M:%S+00:00",
                                              time.gmtime(now - 12)),
                   "services": ["ratings.default"], "error": "peer closed the feed"}],
        "agents": [{"id": "spiffe://mesh.test/cluster/east/agent/vm-17", "node": "vm-17",
                    "address": "10.0.0.17", "state": "disconnected", "since": now - 130,
                    "workloads": 1, "held": "agent disconnected"}],
    }
    workloads = [{"id": "vm-1", "service": "reviews", "namespace": "default",
                  "address": "10.0.0.5", "check": {"http": "http://10.0.0.5:9080/"},
                  "health": "critical",
                  "health_output": "HTTP GET http://10.0.0.5:9080/:\n connection refused"}]
    text = render_status(status, workloads, now)
    assert "services: 2 (1 registered here, 1 only from peers)" in text
    assert "12 s ago" in text and "2 min ago" in text
    assert re.search(r"vm-17\s+agent\s+disconnected", text)
    assert "east-gw-1  gateway  this node" in text
    row = next(line for line in text.splitlines() if line.startswith("vm-1 "))
    assert row.endswith("critical  HTTP GET http://10.0.0.5:9080/: connection refused")
    assert "T" not in ago(now - 5, now)
    assert "problem" not in text
    status["catalog"]["quarantined"] = [{"table": "workloads", "key": "w-9", "reason": "ports: "
                                         "expected an object", "at": "2026-11-30T00:00:00Z"}]
    status["limits"] = {"egress_listeners": {"budget": 256, "wanted": 300, "open": 256,
                                             "skipped": 44}}
    text = render_status(status, workloads, now)
    assert "problem: 1 row(s) of catalog.db quarantined at start-up, e.g. workloads w-9" in text
    assert "problem: 44 VIP listener(s) not opened: the egress budget is 256" in text


def test_status_watch_redraws_until_interrupted(appliance_process: ApplianceProcess) -> None:
    appliance_process.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "isthmus.cli", "status", "--watch", "0.3", "--config",
         str(appliance_process.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.count("cluster east") >= 2 and "Ctrl-C stops" in out


# --- silent acceptance -------------------------------------------------------------------------


def test_traffic_for_an_unknown_service_is_refused_unless_forced(
    tmp_path: Path, appliance_process: ApplianceProcess
) -> None:
    appliance_process.start()
    config = str(appliance_process.config_path)
    r = cli("traffic", "set", "nosuch.default", "east=1", "--config", config)
    assert r.returncode == 1 and "no service nosuch.default" in r.stderr and "--force" in r.stderr
    r = cli("traffic", "show", "nosuch.default", "--config", config)
    assert "no traffic policy" in r.stdout  # nothing was stored
    r = cli("traffic", "set", "nosuch.default", "east=1", "--force", "--config", config)
    assert r.returncode == 0, r.stderr
    assert "warning: service nosuch.default is not registered" in r.stderr


def test_a_workload_address_must_be_an_ip(appliance_process: ApplianceProcess) -> None:
    appliance_process.start()
    r = appliance_process.cli("register", "w", "--service", "web", "--address", "not-an-ip",
                              "--port", "http=80")
    assert r.returncode == 1 and "address: expected the workload's IPv4 or IPv6" in r.stderr
    assert "w " not in appliance_process.cli("status").stdout


def test_dns_corefile_may_be_a_path(tmp_path: Path) -> None:
    raw = make_config(tmp_path, roles=["control", "dns"])
    raw["dns"] = {"listen": "127.0.0.1:0", "corefile": "Corefile"}
    path = tmp_path / "isthmus.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = cli("config", "check", str(path))
    assert r.returncode == 2
    assert "dns.corefile: expected a Corefile's text" in r.stderr
    assert str(tmp_path / "Corefile") in r.stderr and "No such file" in r.stderr
    (tmp_path / "Corefile").write_text("global:53 { global }\n")
    r = cli("config", "check", str(path))
    assert r.returncode == 0, r.stderr
    (tmp_path / "Corefile").write_text("global:53 { nosuchplugin }\n")
    r = cli("config", "check", str(path))
    assert r.returncode == 2 and "nosuchplugin" in r.stderr


# --- everyday flags ------------------------------------------------------------------------------


def test_config_check(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(make_config(tmp_path)))
    r = cli("config", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{good}: ok") and "api.listen" in r.stdout
    assert not (tmp_path / "data").exists()  # nothing started, nothing created
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: East\ntrust_domain: x.y\nroles: [ingress]\napi: {colour: red}\n")
    r = cli("config", "check", str(bad))
    assert r.returncode == 2
    assert "cluster: expected a DNS label" in r.stderr and "api.colour: unknown field" in r.stderr
    roles = tmp_path / "roles.yaml"
    roles.write_text("cluster: east\ntrust_domain: x.y\nroles: [ingress]\n")
    r = cli("config", "check", str(roles))
    assert r.returncode == 2 and "need 'control'" in r.stderr


def _run_until_started(config: Path, *flags: str) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-m", "isthmus.cli", "run", "--config", str(config), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if " running; " in line or not line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    return "".join(lines)


def test_run_log_flags(tmp_path: Path) -> None:
    raw = make_config(tmp_path)
    del raw["log"]  # the flags decide
    config = tmp_path / "isthmus.yaml"
    config.write_text(yaml.safe_dump(raw))
    text = _run_until_started(config, "--log-format", "text", "--log-level", "info")
    assert "info    isthmus.appliance: appliance started cluster=east" in text, text
    assert '{"ts"' not in text
    text = _run_until_started(config, "--log-format", "json", "--log-level", "error")
    assert text.splitlines()[0].startswith("isthmus: cluster east running"), text
    # without flags, and stderr not a terminal: JSON
    text = _run_until_started(config)
    assert '"event": "appliance started"' in text, text


def test_version_and_completion(tmp_path: Path) -> None:
    r = cli("version")
    assert r.returncode == 0 and r.stdout.startswith("isthmus ") and "python 3." in r.stdout
    script = cli("completion", "bash").stdout
    (tmp_path / "c.bash").write_text(script)
    out = subprocess.run(
        ["bash", "-c", f"source {tmp_path}/c.bash; COMP_WORDS=(isthmus traffic s); "
         'COMP_CWORD=2; _isthmus; echo "${COMPREPLY[@]}"; '
         "COMP_WORDS=(isthmus register x --chec); COMP_CWORD=3; _isthmus; "
         'echo "${COMPREPLY[@]}"'],
        capture_output=True, text=True, timeout=10,
    ).stdout.splitlines()
    assert out == ["set show", "--check-http --check-tcp"]
    assert cli("completion", "zsh").stdout.startswith("#compdef isthmus")
