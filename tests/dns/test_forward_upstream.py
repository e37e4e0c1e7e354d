"""`forward` upstreams are read with the appliance's one HOST:PORT parser."""

from __future__ import annotations

import pytest

from dns.corefile import CorefileError, Token
from dns.plugins.forward import parse_upstream


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8.8.8.8", ("8.8.8.8", 53)), ("8.8.8.8:5353", ("8.8.8.8", 5353)),
     ("[::1]:5353", ("::1", 5353)), ("[::1]", ("::1", 53)), ("2001:db8::1", ("2001:db8::1", 53)),
     ("dns://127.0.0.1:54", ("127.0.0.1", 54))],
)  # fmt: skip
def test_upstream_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_upstream(Token("word", text, 1, 1), None) == [expected]


@pytest.mark.parametrize("text", ["1.1.1.1:0", "1.1.1.1:x", "1.1.1.1:²", "[::1]:99999", "[::1]x"])
def test_bad_upstreams_name_the_token_and_the_port_range(text: str) -> None:
    with pytest.raises(CorefileError) as err:
        parse_upstream(Token("word", text, 1, 1), None)
    assert text in str(err.value)
