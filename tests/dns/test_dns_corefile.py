"""Corefile parsing: blocks, zones, snippets, imports, env, and errors with positions."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dns.corefile import parse_corefile
from dns.errors import CorefileError
from dns.server import DnsServer
from federation.routing import TableHolder


def test_blocks_zones_ports_and_one_line_blocks() -> None:
    blocks = parse_corefile(
        "dns://Global:53 example.org, example.net { global; cache 30 }\n"
        ".:5353 {\n  forward . 9.9.9.9 {\n    except foo.com  # comment\n  }\n}\n"
        ":53 { errors }\n10.1.0.0/16 { errors }\n"
    )
    zones = [[(k.zone, k.port) for k in b.keys] for b in blocks]
    assert zones == [
        [("global.", 53), ("example.org.", None), ("example.net.", None)],
        [(".", 5353)],
        [(".", 53)],
        [("1.10.in-addr.arpa.", None)],
    ]
    assert [d.name for d in blocks[0].directives] == ["global", "cache"]
    fwd = blocks[1].directives[0]
    assert fwd.values == (".", "9.9.9.9")
    assert fwd.block is not None and fwd.block[0].values == ("foo.com",)


def test_snippets_imports_env_and_quotes(tmp_path: Path) -> None:
    (tmp_path / "extra.conf").write_text("extra.test {\n  errors\n}\n")
    blocks = parse_corefile(
        '(base) {\n  errors\n  log . "{type} {name}"\n}\n'
        "{$ZONE} {\n  import base\n  cache {$TTL:15}\n}\n"
        "import extra.conf\n",
        env={"ZONE": "global"},
        base_dir=tmp_path,
    )
    assert [k.zone for b in blocks for k in b.keys] == ["global.", "extra.test."]
    assert [(d.name, d.values) for d in blocks[0].directives] == [
        ("errors", ()),
        ("log", (".", "{type} {name}")),
        ("cache", ("15",)),
    ]
    # Positions of imported directives point at the snippet's definition.
    assert blocks[0].directives[0].token.line == 2


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ("global {\n  cache 30\n", 1, 8, "never closed"),
        ("global\n  cache 30\n}", 1, 7, "expected '{'"),
        ("global {\n  cache 30\n}\n}\n", 4, 1, "unexpected '}'"),
        ("global {\n  import nothere\n}", 2, 10, "no snippet"),
        ("(a) {\n import a\n}\nx { import a }", 2, 9, "import cycle"),
        ("{$NOPE} { errors }", 1, 1, "NOPE is not set"),
        ('global {\n  log "open\n}', 2, 7, "unterminated"),
        ("tls://global { errors }", 1, 1, "unsupported scheme"),
        ("global:99999 { errors }", 1, 1, "port"),
        ("global { errors }\nglobal { errors }", 2, 1, "already served"),
        ("global {\n  { errors }\n}", 2, 3, "unexpected '{'"),
        ("a..b { errors }", 1, 1, "invalid zone"),
    ],
)
def test_syntax_errors_name_line_and_column(
    text: str, line: int, column: int, fragment: str
) -> None:
    with pytest.raises(CorefileError) as info:
        parse_corefile(text, env={})
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"Corefile:{line}:{column}: ")


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ("global {\n  globl\n}", 2, 3, "unknown plugin 'globl'"),
        ("global {\n  cache 30\n  cache 10\n}", 3, 3, "already configured at line 2"),
        ("global {\n  cache 30 a..b\n}", 2, 12, "invalid zone"),
        ("global {\n  cache {\n    success 0\n  }\n}", 3, 13, "capacity from 1"),
        (". {\n  forward . nowhere.example\n}", 2, 13, "neither an IP address nor a file"),
        (". {\n  forward . 1.1.1.1 {\n    policy fastest\n  }\n}", 3, 12, "policy must be"),
        (". {\n  forward . 1.1.1.1 {\n    max_concurrent 0\n  }\n}", 3, 20, "from 1"),
        (". {\n  forward .\n}", 2, 3, "expected at least 2 arguments"),
        ("global {\n  global {\n    ttl -1\n  }\n}", 3, 9, "TTL"),
        ("global {\n  hosts {\n    not-an-ip x.y\n  }\n}", 3, 5, "neither an IP address"),
        ("global {\n  rewrite type A AAAA\n}", 2, 11, "only 'name' rules"),
        ("global {\n  health :99999\n}", 2, 10, "port"),
        ("global {\n  log {\n    class loud\n  }\n}", 3, 11, "unknown class"),
    ],
)
def test_plugin_errors_name_line_and_column(
    text: str, line: int, column: int, fragment: str
) -> None:
    with pytest.raises(CorefileError) as info:
        DnsServer(text, "127.0.0.1:0", TableHolder())
    err = info.value
    assert fragment in str(err), str(err)
    assert (err.line, err.column) == (line, column), str(err)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab.:{}; \n#"$()\\/0123456789import')), max_size=80))
def test_any_text_parses_or_fails_with_a_position(text: str) -> None:
    try:
        parse_corefile(text, env={})
    except CorefileError as e:
        assert e.line >= 0 and e.column >= 0
