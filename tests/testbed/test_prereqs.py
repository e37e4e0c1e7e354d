"""The testbed's prerequisite check: what it reports when something is missing. Runs as any
user (no machine is built)."""

from __future__ import annotations

import os

from tests.testbed import prereqs


def test_missing_commands_name_their_debian_package_and_the_install_command(tmp_path) -> None:
    reason = prereqs.skip_reason(search_path=str(tmp_path))  # an empty directory: nothing found
    assert reason is not None
    assert "systemd-nspawn not found (Debian package systemd-container)" in reason
    assert "sshd not found (Debian package openssh-server)" in reason
    assert reason.endswith(f"install with: {prereqs.INSTALL_HINT}")
    result = prereqs.check(search_path=str(tmp_path))
    assert {"systemd-container", "openssh-server", "iproute2"} <= set(result.missing_packages)
    assert set(result.missing_packages) <= set(prereqs.APT_PACKAGES)


def test_every_package_the_commands_need_is_in_the_list() -> None:
    needed = set(prereqs.COMMANDS.values()) | set(prereqs.MACHINE_FILES.values())
    assert needed <= set(prereqs.APT_PACKAGES)


def test_not_root_is_a_reason_of_its_own() -> None:
    reason = prereqs.skip_reason()
    if os.geteuid() == 0:
        assert reason is None or "needs root" not in reason
    else:
        assert reason is not None and "needs root" in reason
