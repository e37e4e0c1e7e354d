"""`forward`: send queries to upstream resolvers, failing over between them.

    forward FROM TO... {
        except IGNORED_NAMES...
        force_tcp
        prefer_udp
        max_fails INTEGER          (default 2; 0 disables health checking)
        health_check DURATION      (default 0.5s)
        policy random|round_robin|sequential   (default random)
        max_concurrent INTEGER     (default 1000)
        timeout DURATION           (per upstream attempt, default 2s)
    }

TO is `IP[:PORT]`, `dns://IP[:PORT]`, `[IPv6]:PORT`, or a resolv.conf-style file. An upstream
that fails `max_fails` times in a row is marked down and probed (`. IN NS`) every
`health_check` until it answers; queries go to upstreams that are up (all of them, if none
is). More than `max_concurrent` queries in flight are answered REFUSED at once, so a slow
upstream costs bounded memory and tasks. A truncated UDP reply is retried over TCP; a reply
still truncated over TCP is a failure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import random
from pathlib import Path

from discovery.addresses import AddressError, split_host_port
from dns.corefile import Directive, Token
from dns.defaults import resolv_conf_nameservers
from dns.errors import UpstreamError
from dns.metrics import FORWARD_REJECTS
from dns.plugin import (
    PENDING,
    Plugin,
    Setup,
    Writer,
    arg_count,
    duration_arg,
    int_arg,
    register,
    serve_next,
    write_error,
    zone_args,
)
from dns.upstream import Upstream
from dns.wire import (
    HEADER_LEN,
    REFUSED,
    SERVFAIL,
    Request,
    is_subdomain,
    skip_name,
    text_to_wire,
)

log = logging.getLogger(__name__)

POLICIES = ("random", "round_robin", "sequential")
DEFAULT_TIMEOUT = 2.0
OVERALL_TIMEOUT = 5.0  # all attempts of one query together


class ForwardPlugin(Plugin):
    name = "forward"

    def __init__(
        self,
        zone: str,
        upstreams: list[Upstream],
        *,
        excepts: tuple[str, ...] = (),
        policy: str = "random",
        max_concurrent: int = 1000,
        timeout: float = DEFAULT_TIMEOUT,
        prefer_udp: bool = False,
        server: str = "",
    ) -> None:
        super().__init__()
        self.zone = text_to_wire(zone)
        self.upstreams = upstreams
        self.excepts = tuple(text_to_wire(z) for z in excepts)
        self.policy = policy
        self.max_concurrent = max_concurrent
        self.timeout = timeout
        self.prefer_udp = prefer_udp
        self.server = server
        self.inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._rr = itertools.count()
        self._rng = random.Random()

    async def start(self) -> None:
        self._rejects = FORWARD_REJECTS.labels(self.server)
        for u in self.upstreams:
            u.bind_metrics()

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for u in self.upstreams:
            await u.close()

    def ready(self) -> bool:
        return any(not u.down for u in self.upstreams)

    def serve(self, req: Request, w: Writer) -> int:
        if not is_subdomain(req.qlower, req.labels, self.zone) or any(
            is_subdomain(req.qlower, req.labels, z) for z in self.excepts
        ):
            return serve_next(self, req, w)
        if self.inflight >= self.max_concurrent:
            self._rejects.inc()
            return REFUSED
        self.inflight += 1
        task = asyncio.get_running_loop().create_task(self._resolve(req, w))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return PENDING

    def order(self) -> list[Upstream]:
        ups = list(self.upstreams)
        if self.policy == "random":
            self._rng.shuffle(ups)
        elif self.policy == "round_robin":
            k = next(self._rr) % len(ups)
            ups = ups[k:] + ups[:k]
        up = [u for u in ups if not u.down]
        return up or ups  # when every upstream is down, still try them all

    async def _resolve(self, req: Request, w: Writer) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OVERALL_TIMEOUT
        last: Exception | None = None
        tcp = req.proto == "tcp" and not self.prefer_udp
        try:
            for u in self.order():
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    reply = await u.exchange(
                        req.wire, min(self.timeout, left), tcp, self.prefer_udp
                    )
                except UpstreamError as e:
                    u.failed(e)
                    last = e
                    continue
                u.succeeded()
                w.write(_for_client(reply, req))
                return
            exc = UpstreamError(f"no upstream answered: {last}")
            if req.report_error is not None:
                req.report_error(req, exc)
            write_error(req, w, SERVFAIL)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if req.report_error is not None:
                req.report_error(req, e)
            else:
                log.exception("dns forward failed", extra={"server": self.server})
            write_error(req, w, SERVFAIL)
        finally:
            self.inflight -= 1


def _for_client(reply: bytes, req: Request) -> bytes:
    """The upstream reply with the client's ID and the client's spelling of the question."""
    try:
        qend = skip_name(reply, HEADER_LEN) + 4
    except Exception:
        qend = 0
    if qend - HEADER_LEN == len(req.question):
        return req.wire[:2] + reply[2:HEADER_LEN] + req.question + reply[qend:]
    return req.wire[:2] + reply[2:]


def parse_upstream(tok: Token, base_dir: str | None) -> list[tuple[str, int]]:
    text = tok.text
    if text.startswith("dns://"):
        text = text[len("dns://") :]
    elif "://" in text:
        raise tok.error(f"forward: unsupported upstream scheme in {tok.text!r} (use dns://)")
    if text.count(":") > 1 and not text.startswith("["):
        host, port = text, 53  # a bare IPv6 address
    else:
        try:
            host, port = split_host_port(text, default_port=53, min_port=1)
        except AddressError as e:
            raise tok.error(f"forward: bad upstream {tok.text!r}: {e}") from None
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        path = Path(host) if base_dir is None or Path(host).is_absolute() else Path(base_dir) / host
        if path.is_file():
            servers = resolv_conf_nameservers(str(path))
            if not servers:
                raise tok.error(f"forward: no nameserver in {path}") from None
            return [(s, 53) for s in servers]
        raise tok.error(f"forward: {tok.text!r} is neither an IP address nor a file") from None
    return [(host, port)]


@register("forward")
def setup(s: Setup, d: Directive) -> ForwardPlugin:
    arg_count(d, 2)
    zone = zone_args([d.args[0]], (".",))[0]
    addrs: list[tuple[str, int]] = []
    for tok in d.args[1:]:
        addrs.extend(parse_upstream(tok, s.base_dir))
    excepts: list[str] = []
    opts: dict[str, object] = {}
    max_fails, health_check, force_tcp = 2, 0.5, False
    for sub in d.block or ():
        if sub.name == "except":
            arg_count(sub, 1)
            excepts.extend(zone_args(sub.args, ()))
        elif sub.name == "force_tcp":
            arg_count(sub, 0, 0)
            force_tcp = True
        elif sub.name == "prefer_udp":
            arg_count(sub, 0, 0)
            opts["prefer_udp"] = True
        elif sub.name == "max_fails":
            arg_count(sub, 1, 1)
            max_fails = int_arg(sub.args[0], 0, 1000)
        elif sub.name == "health_check":
            arg_count(sub, 1, 1)
            health_check = duration_arg(sub.args[0], 0.01)
        elif sub.name == "policy":
            arg_count(sub, 1, 1)
            if sub.args[0].text not in POLICIES:
                raise sub.args[0].error(f"forward: policy must be one of {', '.join(POLICIES)}")
            opts["policy"] = sub.args[0].text
        elif sub.name == "max_concurrent":
            arg_count(sub, 1, 1)
            opts["max_concurrent"] = int_arg(sub.args[0], 1, 20000)
        elif sub.name == "timeout":
            arg_count(sub, 1, 1)
            opts["timeout"] = duration_arg(sub.args[0], 0.01)
        else:
            raise sub.token.error(
                f"forward: unknown property {sub.name!r} (known: except, force_tcp, prefer_udp, "
                "max_fails, health_check, policy, max_concurrent, timeout)"
            )
    if force_tcp and opts.get("prefer_udp"):
        raise d.token.error("forward: force_tcp and prefer_udp exclude each other")
    ups = [
        Upstream(
            h, p, s.server, max_fails=max_fails, health_check=health_check, force_tcp=force_tcp
        )
        for h, p in addrs
    ]
    return ForwardPlugin(zone, ups, excepts=tuple(excepts), server=s.server, **opts)  # type: ignore[arg-type]
