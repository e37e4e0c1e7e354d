"""Peering sessions: each control node pulls every peer's export feed over mutual TLS.

The connection goes to the peer's public ingress address with the reserved SNI
`federation.<peer>.<trust_domain>`; the peer's ingress terminates TLS, checks our gateway
identity and hands the stream to its `FeedServer`. Both directions run, so each side pulls
the other's feed. A link that breaks keeps the last state it had (`stale`) and reconnects with
jittered exponential back-off, resuming from the last (epoch, version) it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from discovery.addresses import split_host_port
from discovery.backoff import Backoff
from federation.feed import (
    ExportFeed,
    FeedError,
    FeedState,
    MessageDecoder,
    apply_message,
    encode_frame,
)
from federation.trust import TlsCredentials, TrustError, VerifiedConnection, tls_connect
from federation.trust.spiffe import Kind

log = logging.getLogger(__name__)

HEARTBEAT = 5.0
READ_CHUNK = 256 * 1024
# A peer whose link has been down this long shows as `unreachable` rather than `stale`: longer
# than a restart or a reboot of its edge takes (docs/configuration.md,
# federation.peer_unreachable_after).
UNREACHABLE_AFTER = 300.0

PEER_UP = Gauge("isthmus_peer_connected", "1 when the peering session is up", ["cluster", "peer"])
FEED_MESSAGES = Counter(
    "isthmus_peer_feed_messages_total", "Feed messages received", ["cluster", "peer", "type"]
)
FEED_ERRORS = Counter(
    "isthmus_peer_feed_errors_total",
    "Peering sessions ended by an error",
    ["cluster", "peer", "reason"],
)


class PeerStatus(enum.StrEnum):
    CONNECTED = "connected"
    STALE = "stale"  # down now, last-known exports kept
    # never synced since this node started, or down for longer than the bound (its last-known
    # exports are still kept: the data plane's health checks decide where traffic goes)
    UNREACHABLE = "unreachable"


@dataclass
class PeerState:
    cluster: str
    address: str
    status: PeerStatus = PeerStatus.UNREACHABLE
    last_sync: dt.datetime | None = None
    feed: FeedState | None = None
    epoch: str | None = None
    version: int = 0
    error: str | None = None
    down_since: dt.datetime | None = None  # when a synced link was lost; None while connected

    def to_json(self) -> dict[str, object]:
        return {
            "cluster": self.cluster,
            "address": self.address,
            "state": self.status.value,
            "last_sync": self.last_sync.isoformat() if self.last_sync else None,
            "down_since": self.down_since.isoformat() if self.down_since else None,
            "services": sorted(self.feed.services) if self.feed else [],
            "gateways": self.feed.gateways if self.feed else [],
            "locality": self.feed.locality if self.feed else {},
            "feed_version": self.version,
            "error": self.error,
        }


async def _read_messages(
    reader: asyncio.StreamReader, decoder: MessageDecoder, timeout: float
) -> list[dict]:
    while True:
        async with asyncio.timeout(timeout):
            data = await reader.read(READ_CHUNK)
        if not data:
            raise ConnectionError("peer closed the feed")
        msgs = decoder.feed(data)
        if msgs:
            return msgs


class PeerRefused(ConnectionError):
    """The peer closed the feed before its first message: it refused us."""


class FeedServer:
    """Serves our export feed to peers that pass the identity check."""

    def __init__(
        self, feed: ExportFeed, cluster: str, allowed: Callable[[], Collection[str]]
    ) -> None:
        self.feed = feed
        self.cluster = cluster
        self.allowed = allowed
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, conn: VerifiedConnection) -> None:
        peer = conn.peer
        writer = conn.writer
        if peer.kind is not Kind.GATEWAY or peer.cluster not in self.allowed():
            log.warning(
                "feed refused: not a gateway of a configured peer",
                extra={"cluster": self.cluster, "peer_identity": str(peer)},
            )
            writer.transport.abort()
            return
        task = asyncio.current_task()
        if task:
            self._tasks.add(task)
        try:
            await self._serve(conn, peer.cluster)
        except (ConnectionError, TimeoutError, FeedError, OSError) as e:
            log.info("feed subscriber left", extra={"peer": peer.cluster, "reason": str(e)})
        finally:
            if task:
                self._tasks.discard(task)
            writer.transport.abort() if writer.transport.is_closing() else writer.close()

    async def _serve(self, conn: VerifiedConnection, peer: str) -> None:
        decoder = MessageDecoder(max_frame=64 * 1024)
        (hello, *_) = await _read_messages(conn.reader, decoder, 10.0)
        if hello.get("type") != "subscribe" or not isinstance(hello.get("version", 0), int):
            raise FeedError("expected a subscribe message first")
        epoch = hello.get("epoch") if isinstance(hello.get("epoch"), str) else None
        sent = -1
        msg = self.feed.since(epoch, int(hello.get("version", 0)))
        eof = asyncio.ensure_future(conn.reader.read(1))  # the subscriber never sends more
        try:
            while True:
                conn.writer.write(encode_frame(msg))
                await conn.writer.drain()
                sent = int(msg["version"])
                waiter = asyncio.ensure_future(self.feed.wait(sent, HEARTBEAT))
                done, _ = await asyncio.wait({waiter, eof}, return_when=asyncio.FIRST_COMPLETED)
                if eof in done:
                    waiter.cancel()
                    raise ConnectionError("subscriber closed")
                if self.feed.version > sent:
                    msg = self.feed.since(self.feed.epoch, sent)
                else:
                    msg = {"type": "heartbeat", "epoch": self.feed.epoch, "version": sent}
        finally:
            eof.cancel()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


UpdateHandler = Callable[[PeerState, dict], Awaitable[None]]
# Told when a peer's status changes: (its state, now changed, and the status it had before).
StatusHandler = Callable[[PeerState, PeerStatus], None]


class PeerLink:
    """Keeps one peer's feed in `state`, reconnecting forever until closed.

    A link that was synced and is lost turns `stale` (the last-known exports stay), and
    `unreachable` once it has been down for `unreachable_after` seconds (None: never)."""

    def __init__(
        self,
        cluster: str,
        peer: str,
        address: str,
        credentials: TlsCredentials,
        on_update: UpdateHandler,
        *,
        backoff_min: float = 0.2,
        backoff_max: float = 15.0,
        rng: random.Random | None = None,
        on_status: StatusHandler | None = None,
        unreachable_after: float | None = UNREACHABLE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.state = PeerState(peer, address)
        self.on_status = on_status
        self.credentials = credentials
        self.on_update = on_update
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.unreachable_after = unreachable_after
        self._clock = clock
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._logged: tuple[str, str] | None = None  # the last failure logged at warning
        self._lost_at: float | None = None  # clock() when a synced link was lost
        self._expiry: asyncio.TimerHandle | None = None  # turns stale into unreachable

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"peer-{self.state.cluster}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.transport.abort()
        if self.state.status is PeerStatus.CONNECTED:
            self._down("closed", "peering stopped on this node")
        self._cancel_expiry()

    def _down_status(self) -> PeerStatus:
        """What a link that is down shows: stale while its last-known exports are recent."""
        if self.state.feed is None or self._lost_at is None:
            return PeerStatus.UNREACHABLE
        bound = self.unreachable_after
        if bound is not None and self._clock() - self._lost_at >= bound:
            return PeerStatus.UNREACHABLE
        return PeerStatus.STALE

    def _down(self, reason: str, detail: str) -> None:
        was = self.state.status
        if was is PeerStatus.CONNECTED:  # just lost: stale from now, unreachable past the bound
            self._lost_at = self._clock()
            self.state.down_since = dt.datetime.now(dt.UTC)
            self._schedule_expiry()
        self.state.status = self._down_status()
        self.state.error = detail
        PEER_UP.labels(self.cluster, self.state.cluster).set(0)
        FEED_ERRORS.labels(self.cluster, self.state.cluster, reason).inc()
        if was is not self.state.status:
            self._status_changed(was)
        # Every change of cause is worth a line (a peering that never comes up must say why);
        # the same failure again on each retry is not.
        changed = was is PeerStatus.CONNECTED or self._logged != (reason, detail)
        self._logged = (reason, detail)
        # A peer that is simply not up yet (peers start in any order) is not worth a warning;
        # a refusal, a bad identity or a lost link is.
        quiet = (reason in ("connect", "timeout") and was is not PeerStatus.CONNECTED) or (
            reason == "closed"  # our own stop
        )
        level = logging.DEBUG if not changed else logging.INFO if quiet else logging.WARNING
        log.log(
            level,
            "peer link down",
            extra={
                "peer": self.state.cluster,
                "reason": reason,
                "detail": detail,
                "state": self.state.status.value,
            },
        )

    def _schedule_expiry(self) -> None:
        """A timer for the moment the bound passes, so the change is logged when it happens."""
        self._cancel_expiry()
        if self.unreachable_after is None or self._lost_at is None:
            return
        left = max(0.0, self._lost_at + self.unreachable_after - self._clock())
        with contextlib.suppress(RuntimeError):  # no running loop: _down_status still applies
            self._expiry = asyncio.get_running_loop().call_later(left, self._expire)

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _expire(self) -> None:
        """The bound passed with the link still down: say so once, at that moment."""
        self._expiry = None
        if self.state.status is not PeerStatus.STALE:
            return
        if self._down_status() is PeerStatus.STALE:  # the timer ran early: look again
            self._schedule_expiry()
            return
        self.state.status = PeerStatus.UNREACHABLE
        self._status_changed(PeerStatus.STALE)
        log.warning(
            "peer unreachable",
            extra={
                "peer": self.state.cluster,
                "down_since": self.state.down_since.isoformat() if self.state.down_since else None,
                "after": self.unreachable_after,
                "error": self.state.error,
            },
        )

    async def _run(self) -> None:
        backoff = Backoff(self.backoff_min, self.backoff_max, self._rng)
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except TrustError as e:
                self._down("identity", str(e))
            except PeerRefused as e:
                self._down("refused", str(e))
            except FeedError as e:
                self._down("malformed_feed", str(e))
            except TimeoutError:
                self._down("timeout", "no feed message within the heartbeat window")
            except (OSError, ConnectionError) as e:
                self._down("connect", str(e) or type(e).__name__)
            else:
                backoff.reset()
            if self.state.status is PeerStatus.CONNECTED:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    async def _session(self) -> None:
        host, port = split_host_port(self.state.address)
        td = self.credentials.trust_domain
        conn = await tls_connect(
            host,
            port,
            self.credentials,
            server_hostname=f"federation.{self.state.cluster}.{td}",
            expected_cluster=self.state.cluster,
        )
        if conn.peer.kind is not Kind.GATEWAY:
            conn.writer.transport.abort()
            raise TrustError(f"peer presented {conn.peer}, not a gateway identity")
        self._writer = conn.writer
        try:
            conn.writer.write(
                encode_frame(
                    {
                        "type": "subscribe",
                        "cluster": self.cluster,
                        "epoch": self.state.epoch,
                        "version": self.state.version,
                    }
                )
            )
            await conn.writer.drain()
            decoder = MessageDecoder()
            try:
                first = await _read_messages(conn.reader, decoder, HEARTBEAT * 3)
            except ConnectionError:
                # TLS 1.3: the server checks our certificate after our side of the handshake is
                # done, so a refusal arrives as a closed connection. Say so, and where to look.
                raise PeerRefused(
                    f"{self.state.address} closed the connection right after the TLS handshake: "
                    f"it most likely refused this node's certificate "
                    f"({self.credentials.spiffe_id}), or does not list cluster {self.cluster} "
                    f"as a peer; its log says why ('tls handshake refused' or 'feed refused')"
                ) from None
            for msg in first:
                await self._apply(msg)
            while True:
                for msg in await _read_messages(conn.reader, decoder, HEARTBEAT * 3):
                    await self._apply(msg)
        finally:
            self._writer = None
            conn.writer.transport.abort()

    async def _apply(self, msg: dict) -> None:
        kind = msg.get("type")
        FEED_MESSAGES.labels(self.cluster, self.state.cluster, str(kind)[:16]).inc()
        if kind == "heartbeat":
            self._mark_up()
            return
        new = apply_message(self.state.feed, msg)
        if new.cluster != self.state.cluster:
            raise FeedError(f"feed says it is cluster {new.cluster!r}")
        version = msg.get("version")
        if not isinstance(version, int) or not isinstance(msg.get("epoch"), str):
            raise FeedError("feed message without epoch and version")
        self.state.feed = new
        self.state.epoch, self.state.version = msg["epoch"], version
        self._mark_up()
        await self.on_update(self.state, msg)

    def _mark_up(self) -> None:
        was = self.state.status
        if was is not PeerStatus.CONNECTED:
            log.info("peer link up", extra={"peer": self.state.cluster})
        self.state.status = PeerStatus.CONNECTED
        self.state.error = None
        self.state.down_since = None
        self._lost_at = None
        self._cancel_expiry()
        self._logged = None
        self.state.last_sync = dt.datetime.now(dt.UTC)
        PEER_UP.labels(self.cluster, self.state.cluster).set(1)
        if was is not PeerStatus.CONNECTED:
            self._status_changed(was)

    def _status_changed(self, was: PeerStatus) -> None:
        if self.on_status is None:
            return
        try:
            self.on_status(self.state, was)
        except Exception:  # an observer's bug must not break the link
            log.exception("peer status listener failed", extra={"peer": self.state.cluster})


async def aclose_all(items: list[PeerLink]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.gather(*(i.close() for i in items))
