"""The resolver's Prometheus metrics, defined once for the process (default REGISTRY).

Several servers may run in one process (tests, or an appliance with several roles), so every
metric carries the `server` label (`dns://HOST:PORT`) instead of being registered per server.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DURATION_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.024,
    2.048,
    4.096,
    8.192,
)

REQUESTS = Counter(
    "isthmus_dns_requests_total",
    "Queries received, by server block zone, transport, address family and query type.",
    ["server", "zone", "proto", "family", "type"],
)
RESPONSES = Counter(
    "isthmus_dns_responses_total", "Replies sent, by rcode.", ["server", "zone", "rcode"]
)
DURATION = Histogram(
    "isthmus_dns_request_duration_seconds",
    "Time from query parsed to reply written.",
    ["server", "zone"],
    buckets=DURATION_BUCKETS,
)
MALFORMED = Counter(
    "isthmus_dns_malformed_queries_total",
    "Messages that were not a servable query (answered FORMERR/NOTIMP/BADVERS or dropped).",
    ["server", "proto"],
)
TCP_REFUSED = Counter(
    "isthmus_dns_tcp_connections_refused_total",
    "TCP connections closed at accept: the source held its share (source), or the listener "
    "all it keeps (total).",
    ["server", "reason"],
)
PLUGIN_ERRORS = Counter(
    "isthmus_dns_plugin_errors_total", "Queries failed by a plugin error.", ["server", "zone"]
)
CACHE_HITS = Counter("isthmus_dns_cache_hits_total", "Cache hits.", ["server", "type"])
CACHE_MISSES = Counter("isthmus_dns_cache_misses_total", "Cache misses.", ["server"])
CACHE_ENTRIES = Gauge("isthmus_dns_cache_entries", "Cached replies.", ["server", "type"])
CACHE_EVICTIONS = Counter(
    "isthmus_dns_cache_evictions_total",
    "Entries evicted to stay within capacity.",
    ["server", "type"],
)
CACHE_PREFETCHES = Counter("isthmus_dns_cache_prefetch_total", "Prefetches started.", ["server"])
FORWARD_REQUESTS = Counter(
    "isthmus_dns_forward_requests_total", "Queries sent upstream.", ["server", "to", "proto"]
)
FORWARD_RESPONSES = Counter(
    "isthmus_dns_forward_responses_total", "Upstream replies by rcode.", ["server", "to", "rcode"]
)
FORWARD_FAILURES = Counter(
    "isthmus_dns_forward_failures_total",
    "Upstream attempts that failed (timeout, garbage, refused connection, endless truncation).",
    ["server", "to", "reason"],
)
FORWARD_HEALTHY = Gauge(
    "isthmus_dns_forward_upstream_healthy",
    "1 while an upstream is considered up.",
    ["server", "to"],
)
FORWARD_HEALTHCHECK_FAILURES = Counter(
    "isthmus_dns_forward_healthcheck_failures_total", "Failed health probes.", ["server", "to"]
)
FORWARD_REJECTS = Counter(
    "isthmus_dns_forward_max_concurrent_rejects_total",
    "Queries refused because max_concurrent upstream queries were in flight.",
    ["server"],
)
GLOBAL_NAMES = Gauge("isthmus_dns_global_names", "Names in the global zone.", ["server", "zone"])
GLOBAL_TABLE_VERSION = Gauge(
    "isthmus_dns_global_table_version", "Routing table version being served.", ["server", "zone"]
)
HOSTS_ENTRIES = Gauge("isthmus_dns_hosts_entries", "Names in the hosts plugin.", ["server"])
