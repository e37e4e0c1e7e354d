"""A testbed of booted machines on this host: a small internet with two clusters whose private
ranges overlap, a public segment, and a controller that reaches every machine over SSH.

    from tests.testbed import Testbed
    with Testbed.up() as tb:
        tb["east-vm"].run(["ip", "-br", "addr"])

See README.md beside this file.
"""

from .errors import (
    BootError,
    CommandError,
    PrerequisiteError,
    TeardownError,
    TestbedError,
)
from .nodes import Backend, Listener, Machine, Node, SystemState
from .prereqs import APT_PACKAGES
from .testbed import Testbed
from .topology import (
    CONTROLLER_ADDRESS,
    EDGE_PRIVATE,
    EDGE_PUBLIC,
    MGMT_ADDRESSES,
    MGMT_CIDR,
    PRIVATE_CIDR,
    PUBLIC_CIDR,
    PUBLIC_ROUTER,
    SERVICE_PRIVATE,
    VM_PRIVATE,
    Leg,
    NodeSpec,
    Segment,
    Topology,
    internet,
    single,
)

__all__ = [
    "APT_PACKAGES",
    "CONTROLLER_ADDRESS",
    "EDGE_PRIVATE",
    "EDGE_PUBLIC",
    "MGMT_ADDRESSES",
    "MGMT_CIDR",
    "PRIVATE_CIDR",
    "PUBLIC_CIDR",
    "PUBLIC_ROUTER",
    "SERVICE_PRIVATE",
    "VM_PRIVATE",
    "Backend",
    "BootError",
    "CommandError",
    "Leg",
    "Listener",
    "Machine",
    "Node",
    "NodeSpec",
    "PrerequisiteError",
    "Segment",
    "SystemState",
    "TeardownError",
    "Testbed",
    "TestbedError",
    "Topology",
    "internet",
    "single",
]
