"""`discovery.consul` in the config: validated with every problem named, the token file kept
private, and `backend: consul` accepted at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from discovery.consul.store import ConsulCatalog
from discovery.errors import StoreError
from discovery.model import Health
from isthmus import config as configmod
from isthmus.catalogs import consul_options, make_catalog
from isthmus.configcheck import deeper_problems, summary


def cfg(tmp_path: Path, consul: dict[str, Any] | None = None, **discovery: Any):
    return configmod.validate({
        "cluster": "east", "trust_domain": "mesh.test", "data_dir": str(tmp_path / "data"),
        "discovery": {"backend": "consul", "consul": consul or {}, **discovery},
    })


def problems(tmp_path: Path, consul: dict[str, Any]) -> list[str]:
    with pytest.raises(configmod.ConfigError) as e:
        cfg(tmp_path, consul)
    return e.value.problems


def test_defaults_and_the_options_they_give(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    assert configmod.role_problems(c) == []  # no longer refused
    o = consul_options(c.discovery.consul, "east")
    assert (o.address, o.token, o.wait, o.max_connections) == (
        "http://127.0.0.1:8500", None, 300.0, 192)
    assert o.prefix() == "isthmus/east"
    assert o.rules.warning_is is Health.PASSING and o.rules.cluster == "east"
    assert isinstance(make_catalog(c), ConsulCatalog)


@pytest.mark.parametrize(("consul", "key", "expected"), [
    ({"address": "127.0.0.1:8500"}, "discovery.consul.address", "http://HOST:PORT"),
    ({"address": "ftp://127.0.0.1:8500"}, "discovery.consul.address", "http://HOST:PORT"),
    ({"address": "http://127.0.0.1:8500/v1"}, "discovery.consul.address", "no path"),
    ({"namespace_meta_key": "consul-ns"}, "discovery.consul.namespace_meta_key", "consul-"),
    ({"port_meta_prefix": "a b"}, "discovery.consul.port_meta_prefix", "meta key"),
    ({"warning_is": "maybe"}, "discovery.consul.warning_is", "passing"),
    ({"wait": "20m"}, "discovery.consul.wait", "at most 10m"),
    ({"max_connections": 4}, "discovery.consul.max_connections", "16"),
    ({"tls": {"cert_file": "/x.pem"}}, "discovery.consul.tls", "both or neither"),
    ({"port_name_meta_key": "isthmus-port-main"}, "discovery.consul", "port_meta_prefix"),
    ({"datacenter": "dc 1"}, "discovery.consul.datacenter", "datacenter"),
    ({"colour": "blue"}, "discovery.consul.colour", "unknown field"),
])
def test_bad_values_are_named(tmp_path: Path, consul: dict[str, Any], key: str, expected: str
                              ) -> None:
    found = problems(tmp_path, consul)
    assert any(p.startswith(key) and expected in p for p in found), found


def test_tls_and_token_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "isthmus.yaml"
    path.parent.mkdir()
    path.write_text(
        "cluster: east\ntrust_domain: mesh.test\ndiscovery:\n  backend: consul\n  consul:\n"
        "    token_file: consul-token\n    tls: {ca_file: ca.pem, cert_file: c.pem, "
        "key_file: c.key}\n")
    c = configmod.load(path).discovery.consul
    assert c.token_file == str(path.parent / "consul-token")
    assert (c.tls.ca_file, c.tls.key_file) == (str(path.parent / "ca.pem"),
                                               str(path.parent / "c.key"))


def test_the_token_file_must_be_private_and_not_empty(tmp_path: Path) -> None:
    token = tmp_path / "consul-token"
    token.write_text("secret-value\n")
    token.chmod(0o644)
    c = cfg(tmp_path, {"token_file": str(token)})
    with pytest.raises(StoreError, match=r"token_file: .* readable by others \(mode 0644\)"):
        make_catalog(c)
    assert any("chmod 600" in p for p in deeper_problems(c))
    token.chmod(0o600)
    assert make_catalog(c).options.token == "secret-value"
    assert not any("token_file" in p for p in deeper_problems(c))
    token.write_text("\n")
    with pytest.raises(StoreError, match="is empty"):
        make_catalog(c)
    token.unlink()
    with pytest.raises(StoreError, match="cannot read"):
        make_catalog(c)
    assert all("secret-value" not in line for line in summary(c))


def test_config_check_warns_of_tls_settings_on_plain_http(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    c = cfg(tmp_path, {"tls": {"ca_file": str(ca)}})
    assert any("is not https://" in p for p in deeper_problems(c))
    assert any("catalog: consul at http://127.0.0.1:8500" in line for line in summary(c))
