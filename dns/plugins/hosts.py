"""`hosts`: answers A/AAAA (and PTR) from a hosts file and/or inline lines.

    hosts [FILE [ZONES...]] {
        [INLINE: ADDRESS NAME...]
        ttl SECONDS          (default 3600)
        no_reverse
        reload DURATION      (default 5s; 0 disables)
        fallthrough [ZONES...]
    }

The file is re-read when its modification time or size changes (checked every `reload`).
A name listed without the asked type is NOERROR with no answer; an unlisted name is
NXDOMAIN unless `fallthrough` covers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from pathlib import Path

from dns.answers import QNAME_PTR, Answer, authoritative, ip_rdata, rr
from dns.corefile import Directive
from dns.metrics import HOSTS_ENTRIES
from dns.plugin import (
    Plugin,
    Setup,
    Writer,
    arg_count,
    duration_arg,
    int_arg,
    register,
    serve_next,
    zone_args,
)
from dns.wire import AAAA, NOERROR, NXDOMAIN, PTR, A, Request, is_subdomain, text_to_wire

log = logging.getLogger(__name__)

DEFAULT_TTL = 3600
Entries = dict[bytes, dict[int, Answer]]


def parse_hosts(
    text: str, source: str, ttl: int, reverse: bool
) -> tuple[Entries, list[tuple[int, str]]]:
    """Encode the answers of a hosts file; returns the answers and the lines skipped."""
    addrs: dict[bytes, dict[int, list[bytes]]] = {}
    ptrs: dict[bytes, list[bytes]] = {}
    skipped: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            ip = ipaddress.ip_address(fields[0].split("%", 1)[0])
            names = [text_to_wire(n.lower()) for n in fields[1:]]
        except ValueError as e:
            skipped.append((lineno, str(e)))
            continue
        if not names:
            skipped.append((lineno, "address without names"))
            continue
        rtype = A if ip.version == 4 else AAAA
        for name in names:
            slot = addrs.setdefault(name, {}).setdefault(rtype, [])
            record = rr(QNAME_PTR, rtype, ttl, ip_rdata(ip))
            if record not in slot:
                slot.append(record)
        if reverse:
            ptrs.setdefault(text_to_wire(ip.reverse_pointer), []).append(names[0])
    entries: Entries = {}
    for name, by_type in addrs.items():
        entries[name] = {t: authoritative(NOERROR, recs, [], []) for t, recs in by_type.items()}
    for rev, targets in ptrs.items():
        recs = [rr(QNAME_PTR, PTR, ttl, t) for t in dict.fromkeys(targets)]
        entries.setdefault(rev, {})[PTR] = authoritative(NOERROR, recs, [], [])
    return entries, skipped


class HostsPlugin(Plugin):
    name = "hosts"

    def __init__(
        self,
        path: str | None,
        inline: str,
        zones: tuple[str, ...],
        ttl: int,
        reverse: bool,
        reload: float,
        fallthrough: tuple[str, ...] | None,
        server: str,
    ) -> None:
        super().__init__()
        self.path = path
        self.inline = inline
        self.zones = tuple(text_to_wire(z) for z in zones)
        self.ttl = ttl
        self.reverse = reverse
        self.reload = reload
        self.fallthrough = (
            None if fallthrough is None else tuple(text_to_wire(z) for z in fallthrough)
        )
        self.server = server
        self.entries: Entries = {}
        self._stamp: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.nodata = authoritative(NOERROR, [], [], [])
        self.nxdomain = authoritative(NXDOMAIN, [], [], [])

    def load(self) -> bool:
        """(Re)read the file if it changed; True when the answers were replaced."""
        text = self.inline
        stamp = None
        if self.path is not None:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp == self._stamp:
                    return False
                text = Path(self.path).read_text(errors="replace") + "\n" + self.inline
            except OSError as e:
                if self._stamp is not None or not self.entries:
                    log.warning(
                        "hosts file unreadable", extra={"path": self.path, "error": e.strerror}
                    )
                self._stamp = None
                if not self.inline and self.entries:
                    return False  # keep serving the last good content
        entries, skipped = parse_hosts(text, self.path or "inline", self.ttl, self.reverse)
        for lineno, why in skipped[:10]:
            log.warning(
                "hosts line skipped", extra={"path": self.path, "line": lineno, "error": why}
            )
        self.entries = entries
        self._stamp = stamp
        HOSTS_ENTRIES.labels(self.server).set(len(entries))
        log.info("hosts loaded", extra={"path": self.path, "names": len(entries)})
        return True

    async def start(self) -> None:
        self.load()
        if self.path is not None and self.reload > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload)
            try:
                self.load()
            except Exception:
                log.exception("hosts reload failed", extra={"path": self.path})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def serve(self, req: Request, w: Writer) -> int:
        q = req.qlower
        if not any(is_subdomain(q, req.labels, z) for z in self.zones):
            return serve_next(self, req, w)
        node = self.entries.get(q)
        if node is None:
            if self.fallthrough is not None and (
                not self.fallthrough
                or any(is_subdomain(q, req.labels, z) for z in self.fallthrough)
            ):
                return serve_next(self, req, w)
            answer = self.nxdomain
        else:
            answer = node.get(req.qtype)
            if answer is None:
                if self.fallthrough is not None and req.qtype not in (A, AAAA, PTR):
                    return serve_next(self, req, w)
                answer = self.nodata
        req.local = True
        w.write(answer.render(req))
        return answer.rcode


@register("hosts")
def setup(s: Setup, d: Directive) -> HostsPlugin:
    path: str | None = None
    zones = s.zones
    if d.args:
        path = d.args[0].text
        if s.base_dir is not None and not os.path.isabs(path):
            path = os.path.join(s.base_dir, path)
        zones = zone_args(d.args[1:], s.zones)
    ttl, reverse, reload = DEFAULT_TTL, True, 5.0
    fallthrough: tuple[str, ...] | None = None
    inline: list[str] = []
    for sub in d.block or ():
        if sub.name == "ttl":
            arg_count(sub, 1, 1)
            ttl = int_arg(sub.args[0], 0, 86400 * 7, "a TTL")
        elif sub.name == "no_reverse":
            arg_count(sub, 0, 0)
            reverse = False
        elif sub.name == "reload":
            arg_count(sub, 1, 1)
            reload = duration_arg(sub.args[0])
        elif sub.name == "fallthrough":
            fallthrough = zone_args(sub.args, ())
        else:
            try:
                ipaddress.ip_address(sub.name.split("%", 1)[0])
            except ValueError:
                raise sub.token.error(
                    f"hosts: {sub.name!r} is neither an IP address nor a property "
                    "(ttl, no_reverse, reload, fallthrough)"
                ) from None
            if not sub.args:
                raise sub.token.error("hosts: an inline address needs at least one name")
            for t in sub.args:
                try:
                    text_to_wire(t.text)
                except ValueError as e:
                    raise t.error(f"hosts: {e}") from None
            inline.append(" ".join((sub.name, *sub.values)))
    if path is None and not inline:
        path = "/etc/hosts"
    return HostsPlugin(path, "\n".join(inline), zones, ttl, reverse, reload, fallthrough, s.server)
