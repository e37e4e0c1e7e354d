#!/usr/bin/python
# Copyright: Isthmus maintainers
# Apache License 2.0 (see the repository's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: workload
short_description: Register or deregister a workload with an Isthmus control node
version_added: "0.1.0"
description:
  - Registers (or replaces) and deregisters a workload through the operators' control API of an
    Isthmus appliance (C(PUT)/C(DELETE) C(/v1/workloads/{id})), as C(isthmus register) and
    C(isthmus deregister) do.
  - Idempotent - the module reads the workload first (C(GET /v1/workloads/{id})) and writes only
    when what is stored differs from what the task asks for. Durations are compared by value, so
    C(60s) and C(1m) are the same.
  - Run it where the API is reachable; the API listens on C(127.0.0.1:15000) by default, so
    delegate the task to the control node (C(delegate_to)) and read its token file there.
  - A workload registered by a VM agent or by the appliance's own config file belongs to them;
    the API refuses to replace it (HTTP 409) and the task fails saying so.
author:
  - Isthmus maintainers
extends_documentation_fragment:
  - isthmus.appliance.api
options:
  id:
    description: The workload's ID, unique in its cluster.
    type: str
    required: true
  state:
    description: C(present) registers or updates the workload, C(absent) deregisters it.
    type: str
    choices: [present, absent]
    default: present
  service:
    description:
      - The service the workload serves, C(name) or C(name.namespace).
      - Required with I(state=present).
    type: str
  namespace:
    description: The service's namespace, when I(service) does not name it.
    type: str
    default: default
  address:
    description: The address the workload is reached at. Required with I(state=present).
    type: str
  ports:
    description:
      - "Port name to port number, e.g. C({http: 9080}). The name says the protocol (C(http*),
        C(grpc*) are HTTP-aware; anything else is relayed at L4). Required with I(state=present)."
    type: dict
  labels:
    description: Labels, name to value.
    type: dict
    default: {}
  locality:
    description: Where the workload runs.
    type: dict
    suboptions:
      region:
        description: Region.
        type: str
        default: ""
      zone:
        description: Zone.
        type: str
        default: ""
  weight:
    description: The workload's share among the service's endpoints in its cluster.
    type: int
    default: 1
  check:
    description:
      - Its health check, one of I(http), I(tcp) or I(ttl). Without it the workload is passing.
    type: dict
    suboptions:
      http:
        description: URL whose 2xx answer means passing.
        type: str
      tcp:
        description: C(HOST:PORT) that must accept a connection.
        type: str
      ttl:
        description: The workload heartbeats itself within this duration.
        type: str
      interval:
        description: How often the check runs (not with I(ttl)).
        type: str
        default: 10s
      timeout:
        description: How long one check may take (not with I(ttl)).
        type: str
        default: 2s
      success_threshold:
        description: Passes in a row before the workload turns passing.
        type: int
        default: 1
      failure_threshold:
        description: Failures in a row before the workload turns critical.
        type: int
        default: 1
      deregister_after:
        description: Deregister the workload once it has been critical this long.
        type: str
attributes:
  check_mode:
    support: full
    description: Reads the workload and reports what it would change, without writing.
  diff_mode:
    support: full
    description: Shows the stored and the wanted workload.
notes:
  - The API's token needs the C(workloads) or C(admin) scope.
seealso:
  - module: isthmus.appliance.traffic
"""

EXAMPLES = r"""
- name: Register the reviews backend on db-3, checked over HTTP every 5 s
  isthmus.appliance.workload:
    id: db-3-reviews
    service: reviews
    address: 10.0.3.17
    ports:
      http: 9080
    labels:
      version: v2
    check:
      http: http://10.0.3.17:9080/healthz
      interval: 5s
      timeout: 1s
  delegate_to: east-edge

- name: A workload that heartbeats itself (PUT /v1/workloads/batch-1/heartbeat)
  isthmus.appliance.workload:
    id: batch-1
    service: batch.jobs
    address: 10.0.3.40
    ports:
      tcp: 7000
    check:
      ttl: 30s
  delegate_to: east-edge

- name: Deregister it
  isthmus.appliance.workload:
    id: db-3-reviews
    state: absent
  delegate_to: east-edge

- name: Through an API that is not on the control node's loopback
  isthmus.appliance.workload:
    id: db-3-reviews
    service: reviews
    address: 10.0.3.17
    ports:
      http: 9080
    api_url: http://10.0.0.2:15000
    token: "{{ vault_isthmus_api_token }}"
"""

RETURN = r"""
workload:
  description: The workload as the control node stores it (absent after I(state=absent)).
  returned: success, when the workload exists after the task
  type: dict
  sample:
    id: db-3-reviews
    service: reviews
    namespace: default
    address: 10.0.3.17
    ports:
      http: 9080
    labels:
      version: v2
    locality:
      region: ""
      zone: ""
    weight: 1
    cluster: east
    health: passing
    check:
      http: http://10.0.3.17:9080/healthz
      interval: 5s
      timeout: 1s
previous:
  description: The workload before the task, when it existed.
  returned: changed
  type: dict
"""

import copy

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.isthmus.appliance.plugins.module_utils.isthmus_api import (
    API_ARGUMENT_SPEC,
    IsthmusApi,
    IsthmusApiError,
    duration_seconds,
)

_STATE_FIELDS = ("health", "health_output", "cluster", "id")


def _desired(params):
    service, namespace = params["service"], params["namespace"]
    if "." in service:
        service, namespace = service.split(".", 1)
    body = {
        "service": service,
        "namespace": namespace,
        "address": params["address"],
        "ports": dict((str(k), int(v)) for k, v in params["ports"].items()),
        "labels": dict((str(k), str(v)) for k, v in (params["labels"] or {}).items()),
        "locality": {"region": "", "zone": ""},
        "weight": params["weight"],
    }
    if params["locality"]:
        body["locality"] = {"region": params["locality"]["region"] or "",
                            "zone": params["locality"]["zone"] or ""}
    check = params["check"]
    if check:
        kinds = [k for k in ("http", "tcp", "ttl") if check.get(k)]
        if len(kinds) != 1:
            raise ValueError("check: give exactly one of http, tcp or ttl (got %s)"
                             % (", ".join(kinds) or "none"))
        out = {kinds[0]: check[kinds[0]]}
        if kinds[0] != "ttl":
            out["interval"] = check["interval"]
            out["timeout"] = check["timeout"]
        if check["success_threshold"] != 1:
            out["success_threshold"] = check["success_threshold"]
        if check["failure_threshold"] != 1:
            out["failure_threshold"] = check["failure_threshold"]
        if check.get("deregister_after"):
            out["deregister_after"] = check["deregister_after"]
        body["check"] = out
    return body


def _comparable(workload):
    """What decides whether a write is needed: the stored fields, durations as seconds."""
    w = dict((k, v) for k, v in workload.items() if k not in _STATE_FIELDS)
    w.setdefault("labels", {})
    w.setdefault("weight", 1)
    w["locality"] = dict({"region": "", "zone": ""}, **(w.get("locality") or {}))
    check = copy.deepcopy(w.get("check"))
    if check:
        for key in ("interval", "timeout", "ttl", "deregister_after"):
            if key in check:
                check[key] = duration_seconds(check[key])
        check.setdefault("success_threshold", 1)
        check.setdefault("failure_threshold", 1)
        if "ttl" not in check:
            check.setdefault("interval", 10.0)
            check.setdefault("timeout", 2.0)
        w["check"] = check
    else:
        w.pop("check", None)
    return w


def main():
    argument_spec = dict(
        id=dict(type="str", required=True),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        service=dict(type="str"),
        namespace=dict(type="str", default="default"),
        address=dict(type="str"),
        ports=dict(type="dict"),
        labels=dict(type="dict", default={}),
        locality=dict(type="dict", options=dict(
            region=dict(type="str", default=""),
            zone=dict(type="str", default=""),
        )),
        weight=dict(type="int", default=1),
        check=dict(type="dict", options=dict(
            http=dict(type="str"),
            tcp=dict(type="str"),
            ttl=dict(type="str"),
            interval=dict(type="str", default="10s"),
            timeout=dict(type="str", default="2s"),
            success_threshold=dict(type="int", default=1),
            failure_threshold=dict(type="int", default=1),
            deregister_after=dict(type="str"),
        )),
    )
    argument_spec.update(API_ARGUMENT_SPEC)
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_if=[("state", "present", ("service", "address", "ports"))],
    )
    api = IsthmusApi(module)
    wid = module.params["id"]
    path = "/v1/workloads/%s" % wid
    try:
        _, current = api.request("GET", path)
        if module.params["state"] == "absent":
            result = dict(changed=current is not None)
            if current is not None:
                result["previous"] = current
                result["diff"] = dict(before=current, after={})
                if not module.check_mode:
                    api.request("DELETE", path)
            module.exit_json(**result)

        try:
            desired = _desired(module.params)
            wanted = _comparable(desired)
        except ValueError as e:
            module.fail_json(msg=str(e))
        if current is not None and _comparable(current) == wanted:
            module.exit_json(changed=False, workload=current)
        result = dict(changed=True,
                      diff=dict(before=_comparable(current) if current else {}, after=wanted))
        if current is not None:
            result["previous"] = current
        if module.check_mode:
            result["workload"] = dict(desired, id=wid)
        else:
            _, stored = api.request("PUT", path, desired)
            result["workload"] = stored
        module.exit_json(**result)
    except IsthmusApiError as e:
        module.fail_json(msg=e.message, status=e.status, field=e.field)


if __name__ == "__main__":
    main()
