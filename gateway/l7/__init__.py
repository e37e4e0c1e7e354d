"""HTTP/1.1 at L7 on the egress's HTTP VIP ports: a sans-IO engine per client connection
(`engine`), its asyncio shell (`shell`) and the keep-alive upstream connections
(`upstream`)."""
