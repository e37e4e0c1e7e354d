"""Request and response examples from Consul's HTTP API documentation, cited by endpoint.

Each is copied from the "Sample Payload" or "Sample Response" of the endpoint's page in the
hashicorp/consul repository, `website/content/api-docs/` (the source of
developer.hashicorp.com/consul/api-docs). The tests check the mapping against these and check
that the stand-in, driven by py-consul, answers in the same shape.
"""

from __future__ import annotations

from typing import Any

# GET /v1/health/service/:service -- health.mdx, "List Service Instances for Service",
# Sample Response.
HEALTH_SERVICE_RESPONSE: list[dict[str, Any]] = [
    {
        "Node": {
            "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
            "Node": "foobar",
            "Address": "10.1.10.12",
            "Datacenter": "dc1",
            "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
            "Meta": {"instance_type": "t2.medium"},
        },
        "Service": {
            "ID": "redis",
            "Service": "redis",
            "Tags": ["primary"],
            "Address": "10.1.10.12",
            "TaggedAddresses": {
                "lan": {"address": "10.1.10.12", "port": 8000},
                "wan": {"address": "198.18.1.2", "port": 80},
            },
            "Meta": {"redis_version": "4.0"},
            "Port": 8000,
            "Weights": {"Passing": 10, "Warning": 1},
            "Namespace": "default",
        },
        "Checks": [
            {
                "Node": "foobar",
                "CheckID": "service:redis",
                "Name": "Service 'redis' check",
                "Status": "passing",
                "Notes": "",
                "Output": "",
                "ServiceID": "redis",
                "ServiceName": "redis",
                "ServiceTags": ["primary"],
                "Namespace": "default",
            },
            {
                "Node": "foobar",
                "CheckID": "serfHealth",
                "Name": "Serf Health Status",
                "Status": "passing",
                "Notes": "",
                "Output": "",
                "ServiceID": "",
                "ServiceName": "",
                "ServiceTags": [],
                "Namespace": "default",
            },
        ],
    }
]

# GET /v1/agent/health/service/id/:service_id -- agent/service.mdx, "Get local service health
# by ID", the critical example (web2): a check as an agent reports it, with its Definition.
AGENT_CRITICAL_CHECK: dict[str, Any] = {
    "Node": "server1",
    "CheckID": "service:web2",
    "Name": "Service 'web' check",
    "Status": "critical",
    "Notes": "",
    "Output": 'Get "http://localhost/health": dial tcp [::1]:80: connect: connection refused',
    "ServiceID": "web2",
    "ServiceName": "web",
    "ServiceTags": ["rails"],
    "Type": "",
    "Namespace": "default",
    "Definition": {
        "Interval": "0s",
        "Timeout": "0s",
        "DeregisterCriticalServiceAfter": "0s",
        "HTTP": "",
        "Header": None,
        "Method": "",
        "Body": "",
        "TLSServerName": "",
        "TLSSkipVerify": False,
        "TCP": "",
    },
    "CreateIndex": 0,
    "ModifyIndex": 0,
}

# GET /v1/catalog/services -- catalog.mdx, "List Services", Sample Response.
CATALOG_SERVICES_RESPONSE: dict[str, list[str]] = {
    "consul": [],
    "redis": [],
    "postgresql": ["primary", "secondary"],
}

# PUT /v1/catalog/register -- catalog.mdx, "Register Entity", Sample Payload.
CATALOG_REGISTER_PAYLOAD: dict[str, Any] = {
    "Datacenter": "dc1",
    "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
    "Node": "t2.320",
    "Address": "192.168.10.10",
    "TaggedAddresses": {"lan": "192.168.10.10", "wan": "10.0.10.10"},
    "NodeMeta": {"somekey": "somevalue"},
    "Service": {
        "ID": "redis1",
        "Service": "redis",
        "Tags": ["primary", "v1"],
        "Address": "127.0.0.1",
        "TaggedAddresses": {
            "lan": {"address": "127.0.0.1", "port": 8000},
            "wan": {"address": "198.18.0.1", "port": 80},
        },
        "Meta": {"redis_version": "4.0"},
        "Port": 8000,
        "Namespace": "default",
    },
    "Check": {
        "Node": "t2.320",
        "CheckID": "service:redis1",
        "Name": "Redis health check",
        "Notes": "Script based health check",
        "Status": "passing",
        "ServiceID": "redis1",
        "Definition": {
            "TCP": "localhost:8888",
            "Interval": "5s",
            "Timeout": "1s",
            "DeregisterCriticalServiceAfter": "30s",
        },
        "Namespace": "default",
    },
    "SkipNodeUpdate": False,
}

# PUT /v1/catalog/deregister -- catalog.mdx, "Deregister Entity", Sample Payloads (the third,
# without the Enterprise-only Namespace).
CATALOG_DEREGISTER_SERVICE_PAYLOAD: dict[str, Any] = {
    "Datacenter": "dc1",
    "Node": "t2.320",
    "ServiceID": "redis1",
}

# PUT /v1/agent/service/register -- agent/service.mdx, "Register Service", Sample Payload.
AGENT_SERVICE_REGISTER_PAYLOAD: dict[str, Any] = {
    "ID": "redis1",
    "Name": "redis",
    "Tags": ["primary", "v1"],
    "Address": "127.0.0.1",
    "Port": 8000,
    "Meta": {"redis_version": "4.0"},
    "EnableTagOverride": False,
    "Check": {
        "DeregisterCriticalServiceAfter": "90m",
        "Args": ["/usr/local/bin/check_redis.py"],
        "Interval": "10s",
        "Timeout": "5s",
    },
    "Weights": {"Passing": 10, "Warning": 1},
}

# GET /v1/agent/self -- agent/index.mdx, "Read Configuration", Sample Response (the stable
# `Config` part).
AGENT_SELF_CONFIG: dict[str, Any] = {
    "Datacenter": "dc1",
    "NodeName": "foobar",
    "NodeID": "9d754d17-d864-b1d3-e758-f3fe25a9874f",
    "Server": True,
    "Revision": "deadbeef",
    "Version": "1.0.0",
}

# GET /v1/kv/:key -- kv.mdx, "Read Key", Sample Response (Metadata Response).
KV_READ_RESPONSE: list[dict[str, Any]] = [
    {
        "CreateIndex": 100,
        "ModifyIndex": 200,
        "LockIndex": 200,
        "Key": "zip",
        "Flags": 0,
        "Value": "dGVzdA==",
        "Session": "adf4238a-882b-9ddc-4a9d-5b6758e4159e",
    }
]

# GET /v1/status/leader -- status.mdx, "Get Raft Leader", Sample Response.
STATUS_LEADER_RESPONSE = "10.1.10.12:8300"
