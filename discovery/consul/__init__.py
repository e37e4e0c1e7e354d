"""Consul as the catalog: the mapping and the blocking-query logic (sans-IO), and the store
that drives them through py-consul's asyncio client (`discovery.consul.store`)."""
