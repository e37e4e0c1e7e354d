"""`rewrite`: ask the plugins behind it about another name, answer under the original one.

    rewrite [continue|stop] name [exact|prefix|suffix|substring|regex] FROM TO [answer auto]

Rules apply in Corefile order; `stop` (the default) ends at the first rule that matches,
`continue` lets later rules rewrite further. The reply's question is always restored; with
`answer auto` answer records owned by the rewritten name are renamed back too, so a client
that checks owner names accepts them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from dnslib import DNSLabel, DNSRecord

from dns.corefile import Directive
from dns.plugin import Plugin, Setup, Writer, register, serve_next, write_error
from dns.wire import SERVFAIL, Request, text_to_wire

log = logging.getLogger(__name__)

MATCHES = ("exact", "prefix", "suffix", "substring", "regex")


@dataclass(frozen=True, slots=True)
class NameRule:
    match: str
    source: str
    target: str
    stop: bool
    answer_auto: bool
    pattern: re.Pattern[str] | None = None

    def apply(self, name: str) -> str | None:
        """The rewritten name (lowercase, absolute) or None when the rule does not match."""
        m, src, dst = self.match, self.source, self.target
        if m == "exact":
            return dst if name == src else None
        if m == "prefix":
            return dst + name[len(src) :] if name.startswith(src) else None
        if m == "suffix":
            return name[: len(name) - len(src)] + dst if name.endswith(src) else None
        if m == "substring":
            return name.replace(src, dst, 1) if src in name else None
        assert self.pattern is not None
        found = self.pattern.fullmatch(name)
        if found is None:
            return None
        return re.sub(r"\{(\d)\}", lambda g: found.group(int(g.group(1))) or "", dst)


class _RestoringWriter:
    __slots__ = ("answer_auto", "inner", "original", "req", "rewritten")

    def __init__(self, req: Request, original: str, rewritten: str, auto: bool, inner: Writer):
        self.req = req
        self.original = original
        self.rewritten = rewritten
        self.answer_auto = auto
        self.inner = inner

    def write(self, reply: bytes) -> None:
        try:
            msg = DNSRecord.parse(reply)
        except Exception as e:
            log.warning("rewrite: unparseable reply", extra={"error": str(e)})
            write_error(self.req, self.inner, SERVFAIL)
            return
        original = DNSLabel(self.req.name)
        for q in msg.questions:
            q.qname = original
        if self.answer_auto:
            target = DNSLabel(self.rewritten)
            for rec in msg.rr:
                if rec.rname == target:
                    rec.rname = original
        self.inner.write(self.req.wire[:2] + msg.pack()[2:])


class RewritePlugin(Plugin):
    name = "rewrite"

    def __init__(self, rules: tuple[NameRule, ...]) -> None:
        super().__init__()
        self.rules = rules

    def serve(self, req: Request, w: Writer) -> int:
        original = req.name.lower()
        name = original
        auto = False
        for rule in self.rules:
            new = rule.apply(name)
            if new is None:
                continue
            name, auto = new, auto or rule.answer_auto
            if rule.stop:
                break
        if name == original:
            return serve_next(self, req, w)
        try:
            wire = text_to_wire(name)
        except ValueError:
            return SERVFAIL
        new_req = req.with_name(wire)
        return serve_next(self, new_req, _RestoringWriter(req, original, name, auto, w))


def _fqdn(text: str) -> str:
    text = text.lower()
    return text if text.endswith(".") else text + "."


def parse_rule(d: Directive) -> NameRule:
    args = list(d.args)
    stop = True
    if args and args[0].text in ("continue", "stop"):
        stop = args.pop(0).text == "stop"
    if not args or args[0].text != "name":
        where = args[0] if args else d.token
        raise where.error(
            "rewrite: only 'name' rules are supported: "
            "rewrite [continue|stop] name [MATCH] FROM TO [answer auto]"
        )
    args.pop(0)
    match = "exact"
    if args and args[0].text in MATCHES:
        match = args.pop(0).text
    if len(args) < 2:
        raise d.token.error("rewrite: expected FROM and TO")
    src_tok, dst_tok = args[0], args[1]
    rest = [t.text for t in args[2:]]
    if rest not in ([], ["answer", "auto"]):
        raise args[2].error("rewrite: expected 'answer auto' or nothing after FROM TO")
    pattern = None
    if match == "regex":
        try:
            pattern = re.compile(src_tok.text.lower())
        except re.error as e:
            raise src_tok.error(f"rewrite: bad regular expression: {e}") from None
        src, dst = src_tok.text, dst_tok.text.lower()
    elif match in ("exact", "suffix"):
        src, dst = _fqdn(src_tok.text), _fqdn(dst_tok.text)
        if match == "suffix":
            src, dst = src.rstrip("."), dst.rstrip(".")
            src, dst = src + ".", dst + "."
    else:
        src, dst = src_tok.text.lower(), dst_tok.text.lower()
    if match in ("exact",):
        try:
            text_to_wire(dst)
        except ValueError as e:
            raise dst_tok.error(f"rewrite: {e}") from None
    return NameRule(match, src, dst, stop, bool(rest), pattern)


@register("rewrite", multiple=True)
def setup(s: Setup, ds: tuple[Directive, ...]) -> RewritePlugin:
    for d in ds:
        if d.block:
            raise d.block[0].token.error("rewrite: takes no block")
    return RewritePlugin(tuple(parse_rule(d) for d in ds))
