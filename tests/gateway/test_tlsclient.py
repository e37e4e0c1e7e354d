"""Client session cache: a session is read from a connection once and offered again until it
is `refresh` seconds old or a connection that was offered it did not resume (memory BIOs)."""

from __future__ import annotations

import contextlib
import ssl

from gw_topology import Pki

from federation.trust.contexts import server_context
from federation.trust.credentials import TlsCredentials
from gateway.tlsclient import ClientContexts, SessionCache


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> ssl.SSLObject:
    ci, co, si, so = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(ci, co, server_hostname="svc.test")
    server = server_ctx.wrap_bio(si, so, server_side=True)
    for _ in range(8):
        for obj in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        si.write(co.read())
        ci.write(so.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        client.read(1)  # takes in the session tickets
    return client


def test_sessions_are_read_once_and_refreshed_on_age_or_a_miss() -> None:
    pki = Pki.create()
    now = [0.0]
    contexts = ClientContexts(TlsCredentials(pki.east, pki.bundle), resumption=False)
    ctx = contexts.for_gateway("127.0.0.1:1")
    cache = SessionCache(refresh=30.0, clock=lambda: now[0])
    cache.install(ctx)
    server = server_context(pki.west, pki.bundle)

    first = handshake(ctx, server)
    assert not first.session_reused
    resumed = [handshake(ctx, server) for _ in range(3)]
    assert all(c.session_reused for c in resumed)
    assert cache.reads == 1  # read once, offered three times

    now[0] = 31.0  # old: read again from the newest connection
    assert handshake(ctx, server).session_reused
    assert cache.reads == 2

    other = server_context(pki.west, pki.bundle)  # new ticket keys: the session cannot resume
    missed = handshake(ctx, other)
    assert not missed.session_reused
    assert handshake(ctx, other).session_reused  # the miss made the cache read a fresh one
