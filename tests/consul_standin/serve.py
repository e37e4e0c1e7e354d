"""Run the Consul stand-in as a process of its own (for benchmarks), seeded with services.

    python3 -m tests.consul_standin.serve --host 127.78.250.1 --services 5000 \\
        --vip-prefix isthmus/bench --vip-cidr 10.96.0.0/16

Prints `READY <address>` once it listens; runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal

from tests.consul_standin.standin import ConsulStandIn, KVEntry


def seed(s: ConsulStandIn, services: int, instances: int, cluster: str, vip_prefix: str,
         vip_cidr: str) -> None:
    net = ipaddress.ip_network(vip_cidr)
    addresses = net.hosts()
    for n in range(services):
        for i in range(instances):
            s.register_entity({
                "Node": f"vm-{n % 500}-{i}", "Address": f"10.{n % 250}.{i}.{n % 200 + 1}",
                "NodeMeta": {"region": "us-east", "zone": f"us-east-{i % 3 + 1}"},
                "Service": {"ID": f"svc{n}-{i}", "Service": f"svc{n}", "Port": 8080,
                            "Meta": {"isthmus-port": "http"}},
                "Checks": [{"CheckID": f"service:svc{n}-{i}", "Name": "http",
                            "Status": "passing", "ServiceID": f"svc{n}-{i}"}],
            })
        if vip_prefix:
            for key in (f"svc{n}.default", f"svc{n}.default.{cluster}"):
                address = str(next(addresses))
                i = s.state.index = s.state.index + 1
                s.state.kv[f"{vip_prefix}/vips/{key}"] = KVEntry(
                    f"{vip_prefix}/vips/{key}", address.encode(), 0, i, i)
                s.state.kv[f"{vip_prefix}/vip-addresses/{address}"] = KVEntry(
                    f"{vip_prefix}/vip-addresses/{address}", key.encode(), 0, i, i)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--services", type=int, default=0)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--cluster", default="bench")
    p.add_argument("--vip-prefix", default="")
    p.add_argument("--vip-cidr", default="10.96.0.0/16")
    a = p.parse_args()
    s = ConsulStandIn(a.host, a.port)
    seed(s, a.services, a.instances, a.cluster, a.vip_prefix, a.vip_cidr)
    await s.start()
    print(f"READY {s.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await s.stop()


if __name__ == "__main__":
    asyncio.run(main())
