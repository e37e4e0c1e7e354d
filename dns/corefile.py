"""The Corefile: CoreDNS's configuration language, parsed into server blocks.

    [dns://]ZONE [ZONE...][:PORT] {
        PLUGIN ARGS... [{ SUB-DIRECTIVES }]
    }

Directives end at a newline or `;` (so `global:53 { global; cache 30 }` works on one line),
`#` starts a comment, `"..."` quotes a token, `(name) { ... }` defines a snippet that
`import name` pastes in (`import` also takes file globs), and `{$VAR}` / `{$VAR:default}`
substitute environment variables. Every error names the line and column it refers to.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from discovery.addresses import AddressError, split_host_port
from dns.errors import CorefileError
from dns.wire import text_to_wire

WORD, LBRACE, RBRACE, SEP, EOF = "word", "{", "}", "sep", "eof"
MAX_IMPORT_DEPTH = 10
_ENV_RE = re.compile(r"\{\$([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    line: int
    column: int
    source: str = "Corefile"

    def error(self, message: str) -> CorefileError:
        return CorefileError(message, self.line, self.column, self.source)


@dataclass(frozen=True, slots=True)
class Directive:
    """One plugin line: its name, arguments and optional sub-block."""

    token: Token
    args: tuple[Token, ...]
    block: tuple[Directive, ...] | None = None

    @property
    def name(self) -> str:
        return self.token.text

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(t.text for t in self.args)

    def error(self, message: str) -> CorefileError:
        return self.token.error(f"{self.name}: {message}")


@dataclass(frozen=True, slots=True)
class ZoneKey:
    zone: str  # lowercase, fully qualified ("." for the root)
    port: int | None
    token: Token

    @property
    def wire(self) -> bytes:
        return text_to_wire(self.zone)


@dataclass(frozen=True, slots=True)
class ServerBlock:
    keys: tuple[ZoneKey, ...]
    directives: tuple[Directive, ...]

    def directive(self, name: str) -> tuple[Directive, ...]:
        return tuple(d for d in self.directives if d.name == name)


def tokenize(text: str, source: str, env: Mapping[str, str]) -> list[Token]:
    tokens: list[Token] = []
    i, line, col = 0, 1, 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            tokens.append(Token(SEP, "\n", line, col, source))
            i, line, col = i + 1, line + 1, 1
            continue
        if c in " \t\r":
            i, col = i + 1, col + 1
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c == ";":
            tokens.append(Token(SEP, ";", line, col, source))
            i, col = i + 1, col + 1
            continue
        start_line, start_col = line, col
        if c == '"':
            buf: list[str] = []
            i, col = i + 1, col + 1
            while True:
                if i >= n:
                    raise CorefileError("unterminated quoted string", start_line, start_col, source)
                ch = text[i]
                if ch == "\\" and i + 1 < n and text[i + 1] in '"\\':
                    buf.append(text[i + 1])
                    i, col = i + 2, col + 2
                    continue
                if ch == '"':
                    i, col = i + 1, col + 1
                    break
                if ch == "\n":
                    line, col = line + 1, 0
                buf.append(ch)
                i, col = i + 1, col + 1
            word = _substitute("".join(buf), env, start_line, start_col, source)
            tokens.append(Token(WORD, word, start_line, start_col, source))
            continue
        j = i
        while j < n and text[j] not in " \t\r\n;":
            j += 1
        raw = text[i:j]
        col += j - i
        i = j
        if raw in ("{", "}"):
            tokens.append(Token(raw, raw, start_line, start_col, source))
        else:
            word = _substitute(raw, env, start_line, start_col, source)
            tokens.append(Token(WORD, word, start_line, start_col, source))
    tokens.append(Token(EOF, "", line, col, source))
    return tokens


def _substitute(word: str, env: Mapping[str, str], line: int, col: int, source: str) -> str:
    def repl(m: re.Match[str]) -> str:
        value = env.get(m.group(1))
        if value is None:
            if m.group(2) is not None:
                return m.group(2)
            raise CorefileError(
                f"environment variable {m.group(1)} is not set (use {{${m.group(1)}:default}})",
                line,
                col + m.start(),
                source,
            )
        return value

    return _ENV_RE.sub(repl, word)


class _Parser:
    def __init__(
        self,
        tokens: list[Token],
        snippets: dict[str, list[Token]],
        env: Mapping[str, str],
        base_dir: Path | None,
        stack: tuple[str, ...] = (),
    ) -> None:
        self.toks = tokens
        self.pos = 0
        self.snippets = snippets
        self.env = env
        self.base_dir = base_dir
        self.stack = stack

    def peek(self) -> Token:
        return self.toks[self.pos]

    def take(self) -> Token:
        tok = self.toks[self.pos]
        if tok.kind != EOF:
            self.pos += 1
        return tok

    def skip_seps(self) -> None:
        while self.peek().kind == SEP:
            self.pos += 1

    def line_words(self) -> list[Token]:
        out = []
        while self.peek().kind == WORD:
            out.append(self.take())
        return out

    # -- top level ---------------------------------------------------------------------
    def server_blocks(self) -> list[tuple[list[Token], tuple[Directive, ...]]]:
        blocks: list[tuple[list[Token], tuple[Directive, ...]]] = []
        while True:
            self.skip_seps()
            tok = self.peek()
            if tok.kind == EOF:
                return blocks
            if tok.kind != WORD:
                raise tok.error(f"unexpected '{tok.text}', expected a zone or a snippet")
            if tok.text.startswith("(") and tok.text.endswith(")") and len(tok.text) > 2:
                self.define_snippet()
                continue
            if tok.text == "import":
                self.take()
                for arg in self.import_args(tok):
                    for sub in self.expand(arg):
                        blocks.extend(sub.server_blocks())
                continue
            keys = []
            while self.peek().kind == WORD:
                keys.extend(self._split_keys(self.take()))
            brace = self.take()
            if brace.kind != LBRACE:
                raise brace.error(
                    f"expected '{{' to open the server block for {keys[-1].text!r}"
                    if keys
                    else "expected a zone"
                )
            blocks.append((keys, self.directives(brace)))

    @staticmethod
    def _split_keys(tok: Token) -> list[Token]:
        parts = [p for p in tok.text.split(",") if p]
        return [Token(WORD, p, tok.line, tok.column, tok.source) for p in parts]

    def define_snippet(self) -> None:
        name_tok = self.take()
        name = name_tok.text[1:-1]
        if name in self.snippets:
            raise name_tok.error(f"snippet {name!r} defined twice")
        brace = self.take()
        if brace.kind != LBRACE:
            raise brace.error(f"expected '{{' after snippet ({name})")
        depth, body = 1, []
        while True:
            tok = self.take()
            if tok.kind == EOF:
                raise brace.error(f"snippet ({name}): '{{' is never closed")
            if tok.kind == LBRACE:
                depth += 1
            elif tok.kind == RBRACE:
                depth -= 1
                if depth == 0:
                    break
            body.append(tok)
        self.snippets[name] = body

    def import_args(self, tok: Token) -> list[Token]:
        args = self.line_words()
        if not args:
            raise tok.error("import: expected a snippet name or a file pattern")
        if self.peek().kind in (LBRACE,):
            raise self.peek().error("import: unexpected '{'")
        return args

    def expand(self, arg: Token) -> list[_Parser]:
        key = arg.text
        if key in self.stack or len(self.stack) >= MAX_IMPORT_DEPTH:
            raise arg.error(f"import {key}: import cycle ({' -> '.join((*self.stack, key))})")
        stack = (*self.stack, key)
        if key in self.snippets:
            body = [*self.snippets[key], Token(EOF, "", arg.line, arg.column, arg.source)]
            return [_Parser(body, self.snippets, self.env, self.base_dir, stack)]
        pattern = key if os.path.isabs(key) or self.base_dir is None else str(self.base_dir / key)
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise arg.error(f"import {key}: no snippet of that name and no file matches")
        out = []
        for path in paths:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise arg.error(f"import {key}: {e.strerror}: {path}") from None
            toks = tokenize(text, path, self.env)
            out.append(_Parser(toks, self.snippets, self.env, Path(path).parent, stack))
        return out

    # -- inside a block ----------------------------------------------------------------
    def directives(self, opener: Token | None) -> tuple[Directive, ...]:
        """Directives up to the '}' matching `opener` (or to the end for a snippet body)."""
        out: list[Directive] = []
        while True:
            self.skip_seps()
            tok = self.take()
            if tok.kind == RBRACE:
                if opener is None:
                    raise tok.error("unexpected '}'")
                return tuple(out)
            if tok.kind == EOF:
                if opener is not None:
                    raise opener.error("'{' is never closed")
                return tuple(out)
            if tok.kind == LBRACE:
                raise tok.error("unexpected '{', expected a plugin name")
            args = self.line_words()
            if tok.text == "import":
                if not args:
                    raise tok.error("import: expected a snippet name or a file pattern")
                for arg in args:
                    for sub in self.expand(arg):
                        out.extend(sub.directives(None))
                continue
            block = None
            if self.peek().kind == LBRACE:
                block = self.directives(self.take())
            out.append(Directive(tok, tuple(args), block))


def parse_zone_key(tok: Token) -> ZoneKey:
    text = tok.text
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() != "dns":
            raise tok.error(f"unsupported scheme {scheme}:// (only dns:// is served)")
    port: int | None = None
    host = text
    if ":" in text:
        try:
            host, port = split_host_port(text)
        except AddressError as e:
            raise tok.error(f"bad zone address {tok.text!r}: {e}") from None
    if host in ("", "."):
        return ZoneKey(".", port, tok)
    if "/" in host:
        return ZoneKey(_reverse_zone(host, tok), port, tok)
    zone = host.lower().rstrip(".") + "."
    try:
        text_to_wire(zone)
    except ValueError as e:
        raise tok.error(f"invalid zone: {e}") from None
    return ZoneKey(zone, port, tok)


def _reverse_zone(cidr: str, tok: Token) -> str:
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise tok.error(f"invalid network: {e}") from None
    step = 8 if net.version == 4 else 4
    if net.prefixlen % step:
        raise tok.error(f"network {cidr}: prefix length must be a multiple of {step}")
    labels = net.network_address.reverse_pointer.split(".")
    keep = net.prefixlen // step
    total = 4 if net.version == 4 else 32
    return ".".join(labels[total - keep :]) + "."


def parse_corefile(
    text: str,
    source: str = "Corefile",
    env: Mapping[str, str] | None = None,
    base_dir: str | Path | None = None,
) -> tuple[ServerBlock, ...]:
    """Parse a Corefile into server blocks; raises CorefileError naming line and column."""
    env = os.environ if env is None else env
    parser = _Parser(
        tokenize(text, source, env), {}, env, Path(base_dir) if base_dir is not None else None
    )
    blocks: list[ServerBlock] = []
    seen: dict[tuple[str, int | None], Token] = {}
    for key_tokens, directives in parser.server_blocks():
        keys = tuple(parse_zone_key(t) for t in key_tokens)
        for k in keys:
            first = seen.get((k.zone, k.port))
            if first is not None:
                port = "" if k.port is None else f":{k.port}"
                raise k.token.error(
                    f"zone {k.zone}{port} is already served by the block at line {first.line}"
                )
            seen[(k.zone, k.port)] = k.token
        blocks.append(ServerBlock(keys, directives))
    if not blocks:
        raise CorefileError("no server blocks", 0, 0, source)
    return tuple(blocks)
