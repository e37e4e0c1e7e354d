"""Data plane: ingress and egress listeners, tunnels, load balancing."""
