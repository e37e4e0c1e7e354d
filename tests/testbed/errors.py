"""The testbed's errors: one small hierarchy, so a caller can catch them all at once."""

from __future__ import annotations


class TestbedError(Exception):
    """Something the testbed could not build, run or tear down; the message says what."""

    __test__ = False  # not a pytest test class, whatever its name


class PrerequisiteError(TestbedError):
    """The host lacks root, a package or a kernel feature the testbed needs."""


class CommandError(TestbedError):
    """A command the testbed ran (on the host, in a namespace or in a machine) failed."""

    def __init__(self, where: str, argv: list, returncode: int, stdout: str, stderr: str):
        self.where = where
        self.argv = [str(a) for a in argv]
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr or stdout).strip().splitlines()
        tail = detail[-1] if detail else ""
        super().__init__(f"{where}: {' '.join(self.argv)!r} exited {returncode}: {tail}")


class BootError(TestbedError):
    """A machine did not boot, or did not reach a running state in time."""


class TeardownError(TestbedError):
    """Teardown finished but left something behind; the message lists what."""
