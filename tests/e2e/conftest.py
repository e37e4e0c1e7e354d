"""The drills' testbed: built once for the drills (not the shared `testbed`, which other tests
expect unchanged), with the appliances deployed by the Ansible collection (deploy.py), torn
down at the end."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

from tests.deploy.ansible_run import missing_tools
from tests.testbed import Testbed, prereqs
from tests.testbed.fixtures import sigterm_as_interrupt

from .deploy import Deployment
from .harness import RESULTS

# Host programs the drills run besides the testbed's own (Debian packages in brackets).
E2E_COMMANDS = {"nft": "nftables", "dig": "bind9-dnsutils", "curl": "curl"}


def e2e_skip_reason() -> str | None:
    reason = prereqs.skip_reason()
    if reason:
        return reason
    missing = [f"{cmd} ({pkg})" for cmd, pkg in E2E_COMMANDS.items()
               if shutil.which(cmd, path=prereqs.default_search_path()) is None]
    if missing:
        return "the drills need: " + ", ".join(missing)
    return missing_tools()  # ansible-playbook: the collection deploys the appliances


@pytest.fixture(scope="session")
def deployment() -> Iterator[Deployment]:
    reason = e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    with sigterm_as_interrupt():
        tb = Testbed.up()
        try:
            dep = Deployment.install(tb)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "deployment.json").write_text(json.dumps(
                {"timings_s": {k: round(v, 1) for k, v in dep.timings.items()}}, indent=2))
            yield dep
        finally:
            tb.down()
