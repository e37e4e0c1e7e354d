#!/usr/bin/python
# Copyright: Isthmus maintainers
# Apache License 2.0 (see the repository's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: traffic
short_description: Set or reset a service's traffic weights and failover across clusters
version_added: "0.1.0"
description:
  - Sets (C(PUT)) or resets (C(DELETE)) the traffic policy of a service through the control API
    of any cluster of the federation (C(/v1/services/{namespace}/{name}/traffic)), as
    C(isthmus traffic set) and C(isthmus traffic reset) do. A policy is federation-wide - it is
    replicated to every peer, and the last writer wins.
  - Idempotent - the module reads the policy first and writes only when the weights or the
    failover setting differ.
  - Run it where the API is reachable (C(delegate_to) a control node, or C(run_once) on one).
author:
  - Isthmus maintainers
extends_documentation_fragment:
  - isthmus.appliance.api
options:
  service:
    description: The service, C(name) or C(name.namespace) (namespace C(default) when omitted).
    type: str
    required: true
  state:
    description:
      - C(present) sets the policy, C(absent) resets the service to the default (locality
        routing - local cluster first, then the same region, then the rest).
    type: str
    choices: [present, absent]
    default: present
  weights:
    description:
      - Cluster name to an integer weight of at least 0; at least one above 0. Every cluster must
        be known to the federation. Required with I(state=present).
    type: dict
  failover:
    description:
      - Whether the share of a cluster with no healthy capacity goes to the others (C(true)) or
        fails (C(false)).
    type: bool
    default: true
attributes:
  check_mode:
    support: full
    description: Reads the policy and reports what it would change, without writing.
  diff_mode:
    support: full
    description: Shows the stored and the wanted weights and failover.
notes:
  - The API's token needs the C(traffic) or C(admin) scope.
seealso:
  - module: isthmus.appliance.workload
"""

EXAMPLES = r"""
- name: Send a fifth of reviews' traffic to east and the rest to west
  isthmus.appliance.traffic:
    service: reviews.default
    weights:
      east: 20
      west: 80
  delegate_to: east-edge
  run_once: true

- name: Drain west entirely, and fail rather than fail over while it is gone
  isthmus.appliance.traffic:
    service: reviews
    weights:
      east: 100
      west: 0
    failover: false
  delegate_to: east-edge
  run_once: true

- name: Back to locality routing
  isthmus.appliance.traffic:
    service: reviews
    state: absent
  delegate_to: east-edge
  run_once: true
"""

RETURN = r"""
policy:
  description: The stored policy (absent after I(state=absent)).
  returned: success, when a policy exists after the task
  type: dict
  sample:
    service: reviews
    namespace: default
    weights:
      east: 20
      west: 80
    failover: true
    version: "1733000000000.0.east"
previous:
  description: The policy before the task, when there was one.
  returned: changed
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.isthmus.appliance.plugins.module_utils.isthmus_api import (
    API_ARGUMENT_SPEC,
    IsthmusApi,
    IsthmusApiError,
)


def _comparable(policy):
    weights = policy.get("weights")
    return {
        "weights": None if weights is None else dict((str(k), int(v)) for k, v in weights.items()),
        "failover": bool(policy.get("failover", True)),
    }


def main():
    argument_spec = dict(
        service=dict(type="str", required=True),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        weights=dict(type="dict"),
        failover=dict(type="bool", default=True),
    )
    argument_spec.update(API_ARGUMENT_SPEC)
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_if=[("state", "present", ("weights",))],
    )
    name, _, namespace = module.params["service"].partition(".")
    path = "/v1/services/%s/%s/traffic" % (namespace or "default", name)
    api = IsthmusApi(module)
    try:
        _, current = api.request("GET", path)
        if module.params["state"] == "absent":
            result = dict(changed=current is not None)
            if current is not None:
                result["previous"] = current
                result["diff"] = dict(before=_comparable(current), after={})
                if not module.check_mode:
                    api.request("DELETE", path)
            module.exit_json(**result)

        weights = module.params["weights"]
        try:
            body = {"weights": dict((str(k), int(v)) for k, v in weights.items()),
                    "failover": module.params["failover"]}
        except (TypeError, ValueError):
            module.fail_json(msg="weights: expected cluster names to integers, got %r" % (weights,))
        bad = sorted(k for k, v in body["weights"].items() if v < 0)
        if bad:
            module.fail_json(msg="weights: must be 0 or more (%s)" % ", ".join(bad))
        if not any(body["weights"].values()):
            module.fail_json(msg="weights: at least one cluster needs a weight above 0")
        if current is not None and _comparable(current) == body:
            module.exit_json(changed=False, policy=current)
        result = dict(changed=True,
                      diff=dict(before=_comparable(current) if current else {}, after=body))
        if current is not None:
            result["previous"] = current
        if module.check_mode:
            result["policy"] = dict(body, service=name, namespace=namespace or "default")
            module.exit_json(**result)
        _, stored = api.request("PUT", path, body)
        for warning in (stored or {}).pop("warnings", []):
            module.warn(warning)
        result["policy"] = stored
        module.exit_json(**result)
    except IsthmusApiError as e:
        module.fail_json(msg=e.message, status=e.status, field=e.field)


if __name__ == "__main__":
    main()
