"""The built-in plugins; importing this package registers them (see dns.plugin.ORDER)."""

from dns.plugins import (  # noqa: F401
    cache,
    errors,
    forward,
    globalzone,
    health,
    hosts,
    log,
    metrics,
    ready,
    rewrite,
)
