"""Running commands: on the host, in a namespace, in a machine. Every call has a timeout."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from .errors import CommandError

DEFAULT_TIMEOUT = 30.0

# A machine's own environment: the host's PATH may name directories (pyenv shims) that do not
# exist in a machine, and its locale variables may name locales a machine lacks.
MACHINE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}


def run(
    argv: Sequence[str],
    *,
    where: str = "host",
    input: str | bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    env: dict[str, str] | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """Run argv to completion, capturing output. With check, a non-zero exit raises
    CommandError naming `where`, the command and the last line it printed."""
    if isinstance(input, str) and not text:
        input = input.encode()
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            timeout=timeout,
            env=env,
            text=text,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(where, list(argv), -1, "", f"timed out after {timeout:g} s") from exc
    if check and proc.returncode != 0:
        out = proc.stdout if text else proc.stdout.decode(errors="replace")
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise CommandError(where, list(argv), proc.returncode, out, err)
    return proc


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`ip [-n NETNS] ARGS...`."""
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    return run(argv, where=f"netns {netns}" if netns else "host", check=check, timeout=15)
