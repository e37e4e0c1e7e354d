"""Plugins, their registry and the handler chain (modelled on CoreDNS plugin.go / plugin.cfg).

The order plugins run in is fixed here, not taken from the Corefile: a block that says
`forward ...` before `cache 30` still has the cache in front of the forwarder. Each plugin
either answers (writes a reply and returns an rcode that says so), passes the query to
`next`, or returns an error rcode without writing, in which case whoever called it writes
the error reply. A plugin that answers later (forward) returns PENDING and writes when done.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from discovery.addresses import AddressError, split_host_port
from discovery.durations import parse_duration
from dns.corefile import Directive, ServerBlock, Token
from dns.wire import FORMERR, NOTIMP, REFUSED, SERVFAIL, Request, error_reply

if TYPE_CHECKING:
    from dns.answers import Answer
    from dns.httpsvc import HttpEndpoints
    from federation.routing import TableHolder

# The chain order, first to last (CoreDNS's plugin.cfg): observers first, then the cache,
# then rewriting, then the plugins that answer, the forwarder last.
ORDER: tuple[str, ...] = (
    "prometheus",
    "errors",
    "log",
    "health",
    "ready",
    "cache",
    "rewrite",
    "hosts",
    "global",
    "forward",
)

PENDING = -1  # the reply will be written asynchronously
WRITTEN = -2  # an error reply was written on the plugin's behalf
# Returned without writing anything: the caller writes an error reply with this rcode.
CLIENT_ERRORS = frozenset({SERVFAIL, REFUSED, FORMERR, NOTIMP})


class Pass:
    """`Plugin.fast_answer`'s "not mine, ask the next plugin" (a cache miss)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PASS"


PASS: Final = Pass()

# How a plugin takes part in the UDP fast path (dns.fastpath), which answers a query from
# pre-encoded bytes without building a Request or walking the chain:
#   "opaque"       it must see every query: the fast path stops here and the full chain runs;
#   "transparent"  it does nothing to a query that is answered (errors): skipped;
#   "answers"      fast_answer() says from the lookup key alone: an Answer, PASS or None.
FAST_OPAQUE, FAST_TRANSPARENT, FAST_ANSWERS = "opaque", "transparent", "answers"


class Writer(Protocol):
    def write(self, reply: bytes) -> None: ...


class Handler(Protocol):
    name: str

    def serve(self, req: Request, w: Writer) -> int: ...


class Plugin:
    """Base class: passes queries on; override `serve` to answer or observe."""

    name: ClassVar[str] = ""
    in_chain: ClassVar[bool] = True  # False for plugins that only run a side service
    fast_role: str = FAST_OPAQUE  # a class default; an instance may narrow it (cache zones)

    def __init__(self) -> None:
        self.next: Handler | None = None

    def serve(self, req: Request, w: Writer) -> int:
        return serve_next(self, req, w)

    async def start(self) -> None:
        """Called once the server's sockets are bound."""

    async def stop(self) -> None:
        """Release tasks, sockets and files."""

    def ready(self) -> bool:
        """Readiness as reported by the `ready` plugin."""
        return True

    def fast_answer(self, key: bytes, now: float) -> Answer | Pass | None:
        """For fast_role "answers": the answer to the query with `Request.key` `key`, PASS
        when the next plugin would be asked, None when only the full chain can tell. It has
        the side effects of answering (hit counters) but not those of passing (see below)."""
        return None

    def fast_stamp(self, answer: Answer, now: float) -> object | None:
        """For fast_role "answers": what `fast_replay` needs to tell whether `answer`, just
        given, still holds byte for byte; None if it cannot be replayed."""
        return None

    def fast_replay(self, stamp: object, now: float) -> bool:
        """Whether the reply stamped `stamp` may be sent again as it was (then counted as
        an answer, as fast_answer would have)."""
        return False

    def fast_passed(self) -> None:
        """The fast path passed a query on (PASS) and a later plugin answered it: count it as
        `serve` would have (done only then, so a query the full chain ends up serving after
        all is never counted twice)."""


def write_error(req: Request, w: Writer, rcode: int) -> None:
    w.write(error_reply(req.wire, rcode, req.qend, req.edns, req.do))


def serve_next(plugin: Plugin, req: Request, w: Writer) -> int:
    """Call the next handler; an error it did not write is written here, through `w`."""
    nxt = plugin.next
    rc = SERVFAIL if nxt is None else nxt.serve(req, w)
    if rc in CLIENT_ERRORS:
        write_error(req, w, rc)
        return WRITTEN
    return rc


@dataclass
class Setup:
    """What a plugin's setup function may use: its block, the server, shared services."""

    block: ServerBlock
    server: str  # metrics/log label of the server, e.g. "dns://127.0.0.1:5353"
    tables: TableHolder
    listen_hosts: tuple[str, ...] = ()
    http: HttpEndpoints | None = None  # None in worker processes: no health/ready listeners
    base_dir: str | None = None
    shared: dict[str, object] = field(default_factory=dict)

    @property
    def zones(self) -> tuple[str, ...]:
        return tuple(k.zone for k in self.block.keys)


# A setup function takes the block's one directive for the plugin or, for a plugin
# registered with multiple=True (rewrite), all of them in Corefile order.
SetupFunc = Callable[[Setup, Any], Plugin]


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    setup: SetupFunc
    multiple: bool = False


REGISTRY: dict[str, PluginInfo] = {}


def register(name: str, multiple: bool = False) -> Callable[[SetupFunc], SetupFunc]:
    if name not in ORDER:
        raise ValueError(f"plugin {name!r} has no place in ORDER")

    def deco(fn: SetupFunc) -> SetupFunc:
        REGISTRY[name] = PluginInfo(name, fn, multiple)
        return fn

    return deco


def build_chain(setup: Setup) -> tuple[Handler | None, list[Plugin]]:
    """Set up the block's plugins in registry order and fold them into a chain from the end.
    The built-in plugins register when `dns.plugins` is imported (dns/server.py does)."""
    by_name: dict[str, list[Directive]] = {}
    for d in setup.block.directives:
        info = REGISTRY.get(d.name)
        if info is None:
            raise d.token.error(f"unknown plugin {d.name!r} (known: {', '.join(ORDER)})")
        if d.name in by_name and not info.multiple:
            first = by_name[d.name][0].token
            raise d.token.error(f"plugin {d.name!r} already configured at line {first.line}")
        by_name.setdefault(d.name, []).append(d)
    plugins = []
    for name in ORDER:
        if name in by_name:
            info = REGISTRY[name]
            ds = by_name[name]
            plugins.append(info.setup(setup, tuple(ds) if info.multiple else ds[0]))
    head: Handler | None = None
    for p in reversed(plugins):
        if p.in_chain:
            p.next = head
            head = p
    return head, plugins


# -- argument helpers shared by the plugins' setup functions -----------------------------


def arg_count(d: Directive, lo: int, hi: int | None = None) -> None:
    n = len(d.args)
    if n < lo or (hi is not None and n > hi):
        want = f"{lo}" if hi == lo else f"{lo} to {hi}" if hi is not None else f"at least {lo}"
        where = d.args[hi] if hi is not None and n > hi else d.token
        raise where.error(f"{d.name}: expected {want} arguments, got {n}")


def int_arg(tok: Token, lo: int, hi: int, what: str = "a number") -> int:
    try:
        value = int(tok.text)
    except ValueError:
        raise tok.error(f"expected {what} from {lo} to {hi}, got {tok.text!r}") from None
    if not lo <= value <= hi:
        raise tok.error(f"expected {what} from {lo} to {hi}, got {value}")
    return value


def duration_arg(tok: Token, lo: float = 0.0) -> float:
    try:
        value = parse_duration(tok.text)
    except ValueError as e:
        raise tok.error(str(e)) from None
    if value < lo:
        raise tok.error(f"duration must be at least {lo}s, got {tok.text}")
    return value


def zone_args(tokens: tuple[Token, ...] | list[Token], default: tuple[str, ...]) -> tuple[str, ...]:
    from dns.corefile import parse_zone_key

    if not tokens:
        return default
    out = []
    for t in tokens:
        key = parse_zone_key(t)
        if key.port is not None:
            raise t.error("a plugin zone takes no port")
        out.append(key.zone)
    return tuple(out)


def address_arg(tok: Token, default_port: int) -> tuple[str, int]:
    """HOST:PORT, :PORT or [V6]:PORT."""
    try:
        host, port = split_host_port(tok.text, default_port=default_port)
    except AddressError as e:
        raise tok.error(str(e)) from None
    host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise tok.error(f"expected an IP address, got {host!r}") from None
    return host, port
