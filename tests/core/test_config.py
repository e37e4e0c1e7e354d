"""Configuration: defaults, every problem reported with its path, YAML positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from isthmus import config as configmod
from isthmus.config import Config, ConfigError


def test_minimal_config_has_defaults_for_everything(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("cluster: east\ntrust_domain: mesh.example.org\n")
    cfg = configmod.load(p)
    assert cfg.api.listen == "127.0.0.1:15000"
    assert cfg.monitor.listen.startswith("127.0.0.1:") and not cfg.monitor.enabled
    assert cfg.egress.vip_cidr == "127.240.0.0/16"
    assert cfg.discovery.backend == "embedded"
    assert cfg.drain_timeout == 10.0


def test_the_design_example_is_valid(tmp_path: Path) -> None:
    design = Path(__file__).resolve().parents[3] / "shared" / "DESIGN.md"
    if not design.exists():
        pytest.skip("shared/DESIGN.md is not beside this checkout")
    text = design.read_text()
    block = text.split("### Configuration", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    raw = yaml.safe_load(block)
    cfg = configmod.validate(raw)
    assert cfg.federation.peers[0].cluster == "west"
    assert cfg.dns.corefile and "forward" in cfg.dns.corefile


def test_cluster_and_trust_domain_are_required() -> None:
    with pytest.raises(ConfigError) as e:
        configmod.validate({})
    assert e.value.problems == [
        "cluster: required field is missing",
        "trust_domain: required field is missing",
    ]


def test_every_problem_is_reported_with_path_value_and_expectation() -> None:
    with pytest.raises(ConfigError) as e:
        configmod.validate(
            {
                "cluster": "East",
                "trust_domain": "mesh.example.org",
                "api": {"listen": "127.0.0.1:99999", "colour": "red"},
                "egress": {"vip_cidr": "10.0.0.1/8"},
                "drain_timeout": "soon",
                "roles": ["control", "pilot"],
                "federation": {"peers": [{"cluster": "west", "address": "nowhere"}]},
                "discovery": {
                    "workloads": [
                        {"id": "a", "service": "x", "address": "1.2.3.4", "ports": {"http": 0}}
                    ]
                },
            }
        )
    text = "\n".join(e.value.problems)
    for needle in [
        "cluster: expected a DNS label",
        "(got 'East')",
        "api.listen: expected IP:PORT with a port from 0 to 65535 (got '127.0.0.1:99999')",
        "api.colour: unknown field",
        "egress.vip_cidr: expected a CIDR",
        "drain_timeout: expected a duration",
        "roles.1:",
        "federation.peers.0.address: expected HOST:PORT",
        "discovery.workloads.0.ports.http",
    ]:
        assert needle in text, (needle, text)
    assert len(e.value.problems) == 8


def test_role_combinations() -> None:
    with pytest.raises(ConfigError, match="cannot be combined"):
        configmod.validate({"cluster": "a", "trust_domain": "t", "roles": ["agent", "control"]})
    with pytest.raises(ConfigError, match="once"):
        configmod.validate({"cluster": "a", "trust_domain": "t", "roles": ["dns", "dns"]})


def test_duplicate_static_workload_ids() -> None:
    w = {"id": "a", "service": "x", "address": "1.2.3.4", "ports": {"http": 1}}
    with pytest.raises(ConfigError, match="appears more than once"):
        configmod.validate(
            {"cluster": "a", "trust_domain": "t", "discovery": {"workloads": [w, w]}}
        )


def test_yaml_errors_name_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("cluster: east\napi: {listen: [\n")
    with pytest.raises(ConfigError) as e:
        configmod.load(p)
    assert e.value.source == str(p)
    assert "line 3 column 1" in e.value.problems[0]


def test_non_mapping_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        configmod.load(p)
    with pytest.raises(ConfigError, match="cannot read"):
        configmod.load(tmp_path / "missing.yaml")


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    p = tmp_path / "etc" / "c.yaml"
    p.write_text("cluster: a\ntrust_domain: t\ndata_dir: ../state\ntrust: {bundle: pki/b.pem}\n")
    cfg = configmod.load(p)
    assert cfg.data_dir == str(tmp_path / "etc" / ".." / "state")
    assert cfg.trust.bundle == str(tmp_path / "etc" / "pki" / "b.pem")


def test_config_objects_are_immutable() -> None:
    cfg = configmod.local_default("/tmp/x")
    with pytest.raises(ValueError):
        cfg.cluster = "other"  # type: ignore[misc]


def test_local_default_listens_on_loopback_only() -> None:
    cfg = configmod.local_default("/tmp/x")
    for listen in (
        cfg.api.listen,
        cfg.metrics.listen,
        cfg.control.listen,
        cfg.dns.listen,
        cfg.ingress.listen,
        cfg.monitor.listen,
    ):
        assert listen.startswith("127.0.0.1:")


yaml_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=15)
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
section_keys = st.sampled_from([*Config.model_fields, "bogus"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(section_keys, yaml_values, max_size=6))
def test_property_any_mapping_is_a_config_or_a_clear_error(raw: dict) -> None:
    try:
        cfg = configmod.validate(raw)
    except ConfigError as e:
        assert e.problems
        assert all(isinstance(p, str) and p for p in e.problems)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_property_any_text_file_loads_or_fails_cleanly(tmp_path_factory, text: str) -> None:
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_text(text)
    try:
        configmod.load(p)
    except ConfigError as e:
        assert e.problems


def test_tunnel_settings() -> None:
    base = {"cluster": "east", "trust_domain": "mesh.test"}
    cfg = configmod.validate(base)
    assert cfg.egress.multiplex is True and cfg.egress.tunnel_connections == 2
    off = configmod.validate({**base, "egress": {"multiplex": False, "tunnel_connections": 8}})
    assert off.egress.multiplex is False and off.egress.tunnel_connections == 8
    with pytest.raises(ConfigError) as e:
        configmod.validate({**base, "egress": {"multiplex": "yes", "tunnel_connections": 0}})
    paths = [p.split(":")[0] for p in e.value.problems]
    assert paths == ["egress.multiplex", "egress.tunnel_connections"]


def test_tunnel_probe_timeout() -> None:
    base = {"cluster": "east", "trust_domain": "mesh.test"}
    assert configmod.validate(base).egress.tunnel_probe_timeout == 1.0
    cfg = configmod.validate({**base, "egress": {"tunnel_probe_timeout": "250ms"}})
    assert cfg.egress.tunnel_probe_timeout == 0.25
    for bad in ("50ms", "2m", "soon"):
        with pytest.raises(ConfigError) as e:
            configmod.validate({**base, "egress": {"tunnel_probe_timeout": bad}})
        (problem,) = e.value.problems
        assert problem.startswith("egress.tunnel_probe_timeout"), problem


def test_listener_limits() -> None:
    base = {"cluster": "east", "trust_domain": "mesh.test"}
    cfg = configmod.validate(base)
    assert (cfg.api.header_timeout, cfg.api.idle_timeout) == (10.0, 60.0)
    assert cfg.control.handshake_timeout == 10.0 and cfg.control.max_connections == 4096
    assert (cfg.ingress.client_hello_timeout, cfg.ingress.max_pending_per_source) == (2.0, 16)
    tuned = configmod.validate(
        {
            **base,
            "api": {"header_timeout": "2s", "max_connections_per_source": 8},
            "control": {"idle_timeout": "30s", "handshake_timeout": "3s"},
            "ingress": {"peer_sources": ["198.51.100.0/24", "2001:db8::7"], "max_pending": 64},
        }
    )
    assert tuned.api.header_timeout == 2.0 and tuned.api.max_connections_per_source == 8
    assert tuned.control.idle_timeout == 30.0 and tuned.control.handshake_timeout == 3.0
    assert tuned.ingress.peer_sources == ["198.51.100.0/24", "2001:db8::7"]
    with pytest.raises(ConfigError) as e:
        configmod.validate(
            {
                **base,
                "api": {"header_timeout": "0s", "handshake_timeout": "1s"},
                "control": {"max_connections_per_source": 0},
                "ingress": {"peer_sources": ["peer.example"], "reserved_pending_share": 1},
            }
        )
    paths = [p.split(":")[0] for p in e.value.problems]
    assert paths == [
        "api.header_timeout",
        "api.handshake_timeout",  # the API is plain HTTP: no handshake
        "control.max_connections_per_source",
        "ingress.reserved_pending_share",
        "ingress.peer_sources.0",
    ]
    with pytest.raises(ConfigError, match="shorter than handshake_timeout"):
        configmod.validate({**base, "ingress": {"client_hello_timeout": "10s"}})


def test_resolver_tcp_limits() -> None:
    base = {"cluster": "east", "trust_domain": "mesh.test"}
    cfg = configmod.validate(base)
    assert (cfg.dns.max_tcp_connections, cfg.dns.max_tcp_connections_per_source) == (1000, 64)
    tuned = configmod.validate({**base, "dns": {"max_tcp_connections_per_source": 8}})
    assert tuned.dns.max_tcp_connections_per_source == 8
    with pytest.raises(ConfigError) as e:
        configmod.validate(
            {**base, "dns": {"max_tcp_connections": 0, "max_tcp_connections_per_source": "64"}}
        )
    paths = [p.split(":")[0] for p in e.value.problems]
    assert paths == ["dns.max_tcp_connections", "dns.max_tcp_connections_per_source"]
