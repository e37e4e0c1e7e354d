"""CoreDNS-style resolver: Corefile parser, server, plugin chain."""
