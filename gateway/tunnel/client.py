"""The egress side of multiplexed tunnels: a few mutual-TLS connections per remote ingress.

`TunnelClient.open` returns a stream to a service port of a remote cluster, accepted by its
ingress (which connected an endpoint first, so a refusal or a dead endpoint is a connect
failure the caller can retry elsewhere). Up to `MuxConfig.connections` connections are kept
per gateway, dialled on first use (`tlsclient.dial_gateway`: the reserved SNI
`tunnel.<cluster>.<td>`, TLS session resumption, strict verification of the ingress
identity); a stream goes to the one with the fewest streams. Several connections spread the
streams over the ingress' worker processes (`SO_REUSEPORT`) and keep one lost connection
from taking every stream with it.

When the node's credentials change, connections made with the old identity take no new
streams and close once their streams are done. Connections without streams for `idle_close`
seconds are closed by the sweeper; a gateway that fails its probe is dropped at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.errors import ConnectFailed, StreamReset
from gateway.metrics import Outcome
from gateway.proto.sni import tunnel_sni
from gateway.tlsclient import ClientContexts, dial_gateway
from gateway.tunnel.transport import MuxConfig, MuxConnection, MuxStream

__all__ = ["TunnelClient"]

log = logging.getLogger(__name__)


class TunnelClient:
    def __init__(
        self,
        config: MuxConfig,
        contexts: ClientContexts,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.config = config
        self.contexts = contexts
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self._conns: dict[str, list[MuxConnection]] = {}
        self._dialing: dict[str, asyncio.Task[MuxConnection]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.dials = 0
        self.streams_opened = 0

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._dialing.values())
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conns in self._conns.values():
            for conn in conns:
                conn.abort()
        self._conns.clear()

    def connections(self, gateway: str) -> list[MuxConnection]:
        return [c for c in self._conns.get(gateway, ()) if not c.lost]

    # --- streams ----------------------------------------------------------------------------

    async def open(self, gateway: str, cluster: str, trust_domain: str, target: str) -> MuxStream:
        """A stream to `target` (a service SNI) through `gateway`, accepted by the ingress.

        Raises ConnectFailed with the outcome to count."""
        if self._closed:
            raise ConnectFailed("the egress is shutting down")
        conn = await self._connection(gateway, cluster, trust_domain)
        try:
            stream = conn.open(target)
        except StreamReset as err:  # lost between the pick and now
            raise ConnectFailed(f"{gateway}: {err}") from err
        accepted = stream.accepted
        assert accepted is not None
        try:
            async with asyncio.timeout(self.config.open_timeout):
                await accepted
        except TimeoutError as exc:
            stream.reset("open_timeout", "no answer to OPEN in time")
            raise ConnectFailed(f"{gateway}: no answer to OPEN", Outcome.CONNECT_TIMEOUT) from exc
        except StreamReset as err:
            outcome = (
                Outcome.CONNECT_TIMEOUT
                if err.reason in ("connect_timeout", "tunnel_silent")
                else (Outcome.CONNECT_ERROR)
            )
            raise ConnectFailed(f"{gateway}: {err}", outcome) from err
        except BaseException:
            stream.reset("cancelled")
            raise
        if stream.is_closing():  # ACCEPT and RESET came together (or the tunnel went)
            raise ConnectFailed(f"{gateway}: stream ended right after it was accepted")
        self.streams_opened += 1
        return stream

    async def _connection(self, gateway: str, cluster: str, trust_domain: str) -> MuxConnection:
        generation = self.contexts.credentials.generation
        conns = self._conns.get(gateway)
        live: list[MuxConnection] = []
        if conns:
            for conn in conns:
                if conn.generation != generation and not conn.going_away:
                    conn.goaway("new identity")  # finishes its streams, takes no new ones
                if conn.usable and conn.generation == generation:
                    live.append(conn)
            if len(live) != len(conns):
                self._conns[gateway] = [c for c in conns if not c.lost]
        if len(live) < self.config.connections and gateway not in self._dialing:
            task = asyncio.get_running_loop().create_task(
                self._dial(gateway, cluster, trust_domain)
            )
            self._dialing[gateway] = task
            task.add_done_callback(lambda t, g=gateway: self._dialed(g, t))
        if live:
            return min(live, key=_load)
        if any(c.suspect and not c.lost for c in conns or ()):
            # The peer answers nothing on the connections we have: fail now, so that the
            # caller retries another target, rather than wait for a dial that hangs as well.
            raise ConnectFailed(
                f"{gateway}: tunnel silent, no connection takes streams", Outcome.CONNECT_TIMEOUT
            )
        return await asyncio.shield(self._dialing[gateway])

    async def _dial(self, gateway: str, cluster: str, trust_domain: str) -> MuxConnection:
        self.dials += 1
        gw = await dial_gateway(
            self.contexts, gateway, tunnel_sni(cluster, trust_domain), cluster,
            self.connect_timeout, self.handshake_timeout,
        )  # fmt: skip
        conn = MuxConnection(self.config, server=False, generation=gw.generation, label=gateway)
        gw.protocol.on_lost = None
        gw.transport.set_protocol(conn)
        conn.connection_made(gw.transport)
        if not gw.alive:
            conn.connection_lost(None)
            raise ConnectFailed(f"{gateway}: closed right after the handshake")
        self._conns.setdefault(gateway, []).append(conn)
        log.info("tunnel connected", extra={"gateway": gateway, "peer": str(gw.peer),
                                            "resumed": gw.resumed})  # fmt: skip
        return conn

    def _dialed(self, gateway: str, task: asyncio.Task[MuxConnection]) -> None:
        if self._dialing.get(gateway) is task:
            del self._dialing[gateway]
        if not task.cancelled() and task.exception() is not None:
            log.warning("tunnel dial failed",
                        extra={"gateway": gateway, "error": str(task.exception())})  # fmt: skip

    # --- upkeep -----------------------------------------------------------------------------

    def drop_gateway(self, gateway: str) -> None:
        """`gateway` failed its probe: close its connections (their streams break)."""
        for conn in self._conns.pop(gateway, []):
            conn.abort()

    def retain(self, gateways: set[str]) -> None:
        """Close connections to gateways no longer in the routing table (after their streams)."""
        for gateway in [g for g in self._conns if g not in gateways]:
            for conn in self._conns.pop(gateway):
                conn.goaway("gateway left the routing table")

    def sweep(self) -> None:
        now = time.monotonic()
        idle_close = self.config.idle_close
        for gateway, conns in list(self._conns.items()):
            kept = []
            for conn in conns:
                if conn.lost:
                    continue
                if not conn.streams and now - conn.idle_since > idle_close:
                    conn.close()
                    continue
                kept.append(conn)
            if kept:
                self._conns[gateway] = kept
            else:
                del self._conns[gateway]

    async def _sweep_loop(self) -> None:
        period = max(0.5, min(self.config.idle_close / 4, 15.0))
        while True:
            await asyncio.sleep(period)
            self.sweep()


def _load(conn: MuxConnection) -> int:
    return len(conn.streams)
