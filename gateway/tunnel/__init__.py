"""Multiplexed tunnels between gateways: many streams over one mutual-TLS connection.

The frames and the stream state machine are sans-IO (`gateway.proto.mux`); `transport` is
the asyncio glue (a stream is an asyncio Transport); `client` keeps the egress's tunnels."""

from gateway.tunnel.client import TunnelClient
from gateway.tunnel.transport import MuxConfig, MuxConnection, MuxStream, OpenHandler

__all__ = ["MuxConfig", "MuxConnection", "MuxStream", "OpenHandler", "TunnelClient"]
