"""Shared trust, peering, traffic policy and the routing table."""
