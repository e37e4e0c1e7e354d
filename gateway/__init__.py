"""Data plane: the egress and ingress gateways.

    proto/    sans-IO protocol cores: bytes in, decisions out, no sockets
              clienthello (TLS ClientHello), sni (cross-cluster names), h1 (HTTP/1.1 framing),
              mux (tunnel frames and the stream state machine)
    l4/       relaying bytes: relay (splice and Protocol relays), pool (warm pool of gateway
              connections for `multiplex: false`)
    l7/       HTTP/1.1 proxying: engine (the sans-IO request engine), shell (its asyncio
              driver), upstream (keep-alive upstream connections)
    tunnel/   multiplexed tunnels between gateways: transport (streams as asyncio transports
              over one mutual-TLS connection), client (the egress side's tunnels)
    egress.py, ingress.py    the two gateways, composed of the above
    worker.py                data-plane worker processes (`workers: N`)
    balancer, retry, vips, probe, tlsclient, admission, budget, metrics, errors, listen,
    closing                  what both gateways share

Words: a *tunnel* is a multiplexed mutual-TLS connection between two gateways and carries
*streams*; a *gateway connection* is one verified mutual-TLS connection to a remote ingress
(`tlsclient.dial_gateway`), kept ready in the *warm pool* when tunnels are off; the L7
*upstream pool* keeps idle HTTP/1.1 connections; a *session* is only ever a TLS session
(resumption). `*Config` dataclasses configure the data plane; the YAML file's sections are
`isthmus.config.*Section`.
"""
