"""Running ansible-playbook as an operator does - `cd ansible && ansible-playbook -i
inventories/example ...` - in the testbed's controller namespace, with the testbed's inventory
(connection settings) as a second -i, and reading what it reports."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.testbed import Testbed

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
EXAMPLE = ANSIBLE_DIR / "inventories" / "example"
WHEELHOUSE = ANSIBLE_DIR / "wheelhouse"
VENV_BIN = Path(sys.executable).parent
PLAYBOOK_TIMEOUT = 420.0

_RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)", re.M)


def missing_tools() -> str | None:
    """Why the deployment tests cannot run here (beyond the testbed's own prerequisites)."""
    if not (VENV_BIN / "ansible-playbook").exists():
        return (f"ansible-playbook is not installed beside {sys.executable}: "
                "pip install -e '.[deploy]'")
    if shutil.which("nft", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        return ("nft is missing (Debian package nftables): the example inventory's edges "
                "forward their cluster's range with it")
    return None


@dataclass(frozen=True)
class Result:
    rc: int
    output: str
    seconds: float

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        """Per host: ok, changed, unreachable, failed (the PLAY RECAP)."""
        return {m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
                for m in _RECAP.finditer(self.output.split("PLAY RECAP")[-1])}

    def changed(self) -> dict[str, int]:
        return {h: r["changed"] for h, r in self.recap.items()}

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])


class Ansible:
    """ansible-playbook and ansible from this venv, run in the testbed's controller."""

    def __init__(self, tb: Testbed, ca_dir: Path) -> None:
        self.tb = tb
        self.ca_dir = ca_dir
        self.log: list[tuple[str, float, int]] = []

    def env(self) -> dict[str, str]:
        return {
            **self.tb.ansible_env(),
            # `isthmus ca ...` on the CA host (the controller) is this venv's
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_DEPRECATION_WARNINGS": "0",
            "PYTHONUNBUFFERED": "1",
        }

    def _run(self, argv: list[str], what: str) -> Result:
        t = time.monotonic()
        proc = self.tb.controller.run(["env", "-C", str(ANSIBLE_DIR), *argv], env=self.env(),
                                      timeout=PLAYBOOK_TIMEOUT, check=False)
        seconds = time.monotonic() - t
        self.log.append((what, seconds, proc.returncode))
        return Result(proc.returncode, proc.stdout + proc.stderr, seconds)

    def playbook(self, playbook: str, *args: str, inventory: Path = EXAMPLE) -> Result:
        """`ansible-playbook -i <inventory> playbooks/<playbook>` (+ the testbed's inventory
        and the CA directory of this run)."""
        argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory),
                "-i", str(self.tb.inventory), "-e", f"pki_ca_dir={self.ca_dir}",
                f"playbooks/{playbook}", *args]
        return self._run(argv, " ".join([playbook, *args]))

    def module(self, host: str, module: str, args: str, *extra: str) -> Result:
        """`ansible HOST -m MODULE -a ARGS` (an operator's ad-hoc call of a module)."""
        argv = [str(VENV_BIN / "ansible"), "-i", str(EXAMPLE), "-i", str(self.tb.inventory),
                host, "-m", module, "-a", args, *extra]
        return self._run(argv, f"{module} {args}")
