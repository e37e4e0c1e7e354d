"""What the testbed builds, as values: segments (bridges, each in its own namespace) and nodes
(booted machines or bare namespaces) with legs on them.

`internet()` is the default: a public segment, two clusters whose private ranges overlap, a
management segment with the controller, and five machines. Tests and drills read addresses
from here (or from `Testbed`) instead of spelling them out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .errors import TestbedError

# Ranges chosen to stay clear of the host's own interfaces (eth0 sits in 192.0.2.0/24 on these
# hosts, and an address from a host range on a veth would break its default route). None of them
# is ever configured in the host's main namespace: every address lives in a testbed namespace.
PUBLIC_CIDR = "198.51.100.0/24"  # TEST-NET-2, the "internet" between the clusters
PUBLIC_ROUTER = "198.51.100.1"  # the public segment's own address: a dead end, no uplink
PRIVATE_CIDR = "10.0.0.0/24"  # each cluster's private range: east and west overlap on purpose
MGMT_CIDR = "172.31.254.0/24"  # management: the controller reaches every machine's sshd here
CONTROLLER_ADDRESS = "172.31.254.1"

# Interface names inside a node, by the kind of segment the leg is on.
PUBLIC_IF = "pub0"
PRIVATE_IF = "priv0"
MGMT_IF = "mgmt0"

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,14}$")  # also a bridge port name: at most 15 characters


@dataclass(frozen=True)
class Segment:
    """An L2 segment: a bridge `br0` alone in its own network namespace.

    `address` is the segment's own address on the bridge (the public segment's "router", which
    routes nowhere), or None for a pure switch.
    """

    name: str
    cidr: str
    address: str | None = None
    # Machines' ports isolated from each other: they reach only the bare nodes' ports (the
    # management segment: the controller reaches every machine, machines do not reach each
    # other through it, so it is no side channel between the clusters).
    isolate_machines: bool = False


@dataclass(frozen=True)
class Leg:
    """A node's interface `ifname` on `segment` with `address` (in the segment's range)."""

    segment: str
    address: str
    ifname: str


@dataclass(frozen=True)
class NodeSpec:
    """A node: a booted machine (`boot=True`) or a bare network namespace running host
    programs (the controller, probes and hostile hosts of the drills)."""

    name: str
    legs: tuple[Leg, ...]
    gateway: str | None = None  # default route via this address (on one of the legs)
    boot: bool = True
    cluster: str | None = None
    role: str | None = None  # edge | service | vm | controller | whatever a drill says

    def leg(self, segment: str) -> Leg:
        for leg in self.legs:
            if leg.segment == segment:
                return leg
        raise TestbedError(f"node {self.name!r} has no leg on segment {segment!r}")

    def has_leg(self, segment: str) -> bool:
        return any(leg.segment == segment for leg in self.legs)


@dataclass(frozen=True)
class Topology:
    segments: tuple[Segment, ...]
    nodes: tuple[NodeSpec, ...]
    name: str = "custom"
    clusters: tuple[str, ...] = field(default=())

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise TestbedError(f"topology {self.name!r} has no segment {name!r}")

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise TestbedError(f"topology {self.name!r} has no node {name!r}")

    def with_node(self, node: NodeSpec) -> Topology:
        topo = Topology(self.segments, (*self.nodes, node), self.name, self.clusters)
        topo.validate()
        return topo

    def validate(self) -> None:
        """Raise TestbedError naming the first problem: a bad name, a duplicate, an address
        outside its segment or taken twice, a gateway not on any leg."""
        seen: set[str] = set()
        for seg in self.segments:
            _check_name("segment", seg.name)
            if seg.name in seen:
                raise TestbedError(f"segment {seg.name!r} is defined twice")
            seen.add(seg.name)
            net = ipaddress.ip_network(seg.cidr)
            if seg.address is not None and ipaddress.ip_address(seg.address) not in net:
                raise TestbedError(f"segment {seg.name!r}: address {seg.address} not in {net}")
        names: set[str] = set()
        taken: dict[str, set[str]] = {
            seg.name: ({seg.address} if seg.address else set()) for seg in self.segments
        }
        for node in self.nodes:
            _check_name("node", node.name)
            if node.name in names:
                raise TestbedError(f"node {node.name!r} is defined twice")
            names.add(node.name)
            ifnames: set[str] = set()
            for leg in node.legs:
                seg = self.segment(leg.segment)
                if ipaddress.ip_address(leg.address) not in ipaddress.ip_network(seg.cidr):
                    raise TestbedError(
                        f"node {node.name!r}: address {leg.address} is not in segment "
                        f"{seg.name!r} ({seg.cidr})"
                    )
                if leg.address in taken[seg.name]:
                    raise TestbedError(
                        f"node {node.name!r}: address {leg.address} is already taken on "
                        f"segment {seg.name!r}"
                    )
                taken[seg.name].add(leg.address)
                if not _NAME.match(leg.ifname) or leg.ifname in ifnames or leg.ifname == "lo":
                    raise TestbedError(f"node {node.name!r}: bad or repeated ifname {leg.ifname!r}")
                ifnames.add(leg.ifname)
            if node.gateway is not None and not any(
                ipaddress.ip_address(node.gateway)
                in ipaddress.ip_network(self.segment(leg.segment).cidr)
                for leg in node.legs
            ):
                raise TestbedError(
                    f"node {node.name!r}: gateway {node.gateway} is on none of its legs"
                )


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise TestbedError(
            f"{kind} name {name!r}: expected a lowercase letter, then up to 14 of "
            "[a-z0-9-] (it also names a bridge port)"
        )


# Addresses of the default topology, by node: (public, private, management).
EDGE_PRIVATE = "10.0.0.2"
SERVICE_PRIVATE = "10.0.0.10"
VM_PRIVATE = "10.0.0.20"
EDGE_PUBLIC = {"east": "198.51.100.10", "west": "198.51.100.20"}
MGMT_ADDRESSES = {
    "east-edge": "172.31.254.11",
    "east-service": "172.31.254.12",
    "east-vm": "172.31.254.13",
    "west-edge": "172.31.254.21",
    "west-service": "172.31.254.22",
}


def internet() -> Topology:
    """The small internet of the deployment tests and the drills (see README.md's diagram)."""
    segments = (
        Segment("public", PUBLIC_CIDR, PUBLIC_ROUTER),
        Segment("east", PRIVATE_CIDR),
        Segment("west", PRIVATE_CIDR),
        Segment("mgmt", MGMT_CIDR, isolate_machines=True),
    )
    nodes: list[NodeSpec] = [
        NodeSpec(
            "controller",
            (Leg("mgmt", CONTROLLER_ADDRESS, MGMT_IF),),
            boot=False,
            role="controller",
        )
    ]
    for cluster in ("east", "west"):
        nodes.append(
            NodeSpec(
                f"{cluster}-edge",
                (
                    Leg("public", EDGE_PUBLIC[cluster], PUBLIC_IF),
                    Leg(cluster, EDGE_PRIVATE, PRIVATE_IF),
                    Leg("mgmt", MGMT_ADDRESSES[f"{cluster}-edge"], MGMT_IF),
                ),
                gateway=PUBLIC_ROUTER,
                cluster=cluster,
                role="edge",
            )
        )
        nodes.append(
            NodeSpec(
                f"{cluster}-service",
                (
                    Leg(cluster, SERVICE_PRIVATE, PRIVATE_IF),
                    Leg("mgmt", MGMT_ADDRESSES[f"{cluster}-service"], MGMT_IF),
                ),
                gateway=EDGE_PRIVATE,
                cluster=cluster,
                role="service",
            )
        )
    nodes.append(
        NodeSpec(
            "east-vm",
            (
                Leg("east", VM_PRIVATE, PRIVATE_IF),
                Leg("mgmt", MGMT_ADDRESSES["east-vm"], MGMT_IF),
            ),
            gateway=EDGE_PRIVATE,
            cluster="east",
            role="vm",
        )
    )
    topo = Topology(tuple(segments), tuple(nodes), "internet", ("east", "west"))
    topo.validate()
    return topo


def single() -> Topology:
    """One machine and the controller on the management segment: for testing the testbed's
    own machinery (boot, reboot, teardown, leftovers) quickly."""
    topo = Topology(
        (Segment("mgmt", MGMT_CIDR, isolate_machines=True),),
        (
            NodeSpec("controller", (Leg("mgmt", CONTROLLER_ADDRESS, MGMT_IF),), boot=False,
                     role="controller"),
            NodeSpec("solo", (Leg("mgmt", "172.31.254.50", MGMT_IF),), role="service"),
        ),
        "single",
    )
    topo.validate()
    return topo


TOPOLOGIES = {"internet": internet, "single": single}
