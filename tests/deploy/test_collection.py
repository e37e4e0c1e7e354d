"""The collection as a published one: it builds with ansible-galaxy, installs, documents its
modules and roles from the installed copy, its playbooks parse by their FQCN there, and
ansible-lint's production profile passes on ansible/."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .ansible_run import ANSIBLE_DIR, VENV_BIN, missing_tools

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _tools() -> None:
    reason = missing_tools()
    if reason and "ansible" in reason:
        pytest.skip(reason)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           **kw.pop("env", {})}  # type: ignore[dict-item]
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env,
                          check=False, **kw)  # type: ignore[call-overload]


def test_the_collection_builds_installs_and_documents_itself(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    built = run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path",
                 str(out), str(ANSIBLE_DIR)])
    assert built.returncode == 0, built.stderr
    [tarball] = out.glob("isthmus-appliance-*.tar.gz")
    listing = subprocess.run(["tar", "tzf", str(tarball)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "plugins/modules/workload.py" in listing
    assert "roles/pki/meta/argument_specs.yml" in listing
    # nothing of a deployment travels with it: no wheels, no root key, no link to itself
    assert not [n for n in listing if n.startswith(("wheelhouse", "pki/", "collections"))]

    dest = tmp_path / "collections"
    installed = run([str(VENV_BIN / "ansible-galaxy"), "collection", "install", "-p", str(dest),
                     str(tarball)])
    assert installed.returncode == 0, installed.stderr
    # cwd is tmp_path (no ansible.cfg there): only the installed copy can answer
    env = {"ANSIBLE_COLLECTIONS_PATH": str(dest)}
    for module in ("workload", "traffic"):
        doc = run([str(VENV_BIN / "ansible-doc"), f"isthmus.appliance.{module}"], env=env,
                  cwd=tmp_path)
        assert doc.returncode == 0 and "EXAMPLES" in doc.stdout, doc.stderr
    role = run([str(VENV_BIN / "ansible-doc"), "-t", "role", "isthmus.appliance.gateway"],
               env=env, cwd=tmp_path)
    assert role.returncode == 0 and "gateway_public_address" in role.stdout, role.stderr
    for playbook in ("site", "vm", "shift_traffic", "rotate_ca"):
        check = run([str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,",
                     f"isthmus.appliance.{playbook}"], env=env, cwd=tmp_path)
        assert check.returncode == 0, (playbook, check.stdout + check.stderr)


def test_ansible_lint_production_profile_is_clean() -> None:
    lint = run([str(VENV_BIN / "ansible-lint"), "--profile", "production", "."],
               cwd=ANSIBLE_DIR)
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]
