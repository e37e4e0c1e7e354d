"""The README's first steps, run exactly as printed.

They use the built-in default's fixed addresses (127.0.0.1:15000, :15053, ...), which a test
may not assume free on a shared machine: so they run in a network namespace of their own,
whose loopback is empty. Needs root and `ip` (iproute2).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
    pytest.mark.skipif(shutil.which("dig") is None or shutil.which("curl") is None,
                       reason="needs dig and curl"),
    pytest.mark.skipif(not (BIN / "isthmus").exists(), reason="isthmus is not installed here"),
]


def readme_blocks(heading: str) -> list[str]:
    """The indented code blocks of one README section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], []
    for line in section.splitlines():
        if line.startswith("    "):
            current.append(line[4:])
        elif current and line.strip():
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


@pytest.fixture
def netns():
    name = f"isthmus-readme-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        # whatever still runs in it goes with it
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_first_steps_as_printed(tmp_path: Path, netns: str) -> None:
    first, after_restart = readme_blocks("First steps")
    env = {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "LANG": "C.UTF-8",
    }
    work = tmp_path / "work"
    work.mkdir()

    def appliance() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "isthmus", "run"],
            env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if " running; " in line:
                return proc
            assert line, "isthmus run exited"
        raise AssertionError("isthmus run did not start")

    def stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0

    # The second block runs in the same shell as the first (it kills the first's `%1`), so
    # one bash runs both, waiting at a marker while the appliance restarts.
    marker = tmp_path / "restarted"
    script = (
        "set -m\n" + first
        + f"\necho '--- restart'\nwhile [ ! -e {marker} ]; do sleep 0.1; done\n"
        + after_restart + "\n"
    )
    run = appliance()
    shell = subprocess.Popen(
        ["ip", "netns", "exec", netns, "bash", "-c", script],
        env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert shell.stdout is not None
        out = []
        for line in shell.stdout:
            out.append(line)
            if line.startswith("--- restart"):
                break
        stop(run)
        run = appliance()
        marker.touch()
        rest, _ = shell.communicate(timeout=60)
        before, after = "".join(out), rest
    finally:
        if shell.poll() is None:
            shell.kill()
        stop(run)
    rounds = re.split(r"^cluster local ", before, flags=re.M)[1:]
    assert len(rounds) == 2, before
    assert re.search(r"^vm-1 .* critical .*127\.0\.0\.1:9080", rounds[0], re.M), rounds[0]
    assert re.search(r"^vm-1 .* passing", rounds[1], re.M), rounds[1]
    vip = re.search(r"^(127\.240\.\d+\.\d+)$", before, re.M)
    assert vip, before
    assert "<!DOCTYPE HTML>" in before, before  # curl reached http.server through the VIP
    later = re.split(r"^cluster local ", after, flags=re.M)[1:]
    assert len(later) == 2, after
    assert re.search(r"^vm-1 .* passing", later[0], re.M), later[0]
    assert re.search(r"^vm-1 .* critical .*refused", later[1], re.M), later[1]
