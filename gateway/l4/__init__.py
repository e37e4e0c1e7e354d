"""Relaying bytes at L4: the relays between two connections, and the warm pool of gateway
connections used when tunnels are off (`egress.multiplex: false`)."""
