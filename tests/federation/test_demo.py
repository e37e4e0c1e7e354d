"""`isthmus demo` runs the whole story in one command, finds free loopback addresses by
itself, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from isthmus.demo import FIRST_BASE, Layout, choose_layout


def get(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=10).read().decode()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url}: {e.code} {e.read().decode()!r}") from None


def dig(server: str, name: str) -> str:
    return subprocess.run(
        ["dig", f"@{server}", "-p", "15053", "+short", name],
        capture_output=True, text=True, timeout=10,
    ).stdout.strip()


def demo(tmp: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "isthmus.cli", "demo", "--dir", str(tmp / "demo"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def script(proc: subprocess.Popen[str]) -> str:
    lines: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    return "".join(lines)


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed")
def test_demo_story_while_its_usual_addresses_are_taken(tmp_path: Path) -> None:
    # someone else holds the first candidate's API address: the demo moves on by itself
    usual = Layout(f"127.{FIRST_BASE}")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        squatter.bind((usual.edge("east"), 15000))
        squatter.listen()
    except OSError:
        pass  # taken already, which is the point
    proc = demo(tmp_path)
    try:
        text = script(proc)
        assert "Ctrl-C stops everything" in text, text
        assert "Traceback" not in text
        vip = re.search(r"the VIP: (\S+)", text).group(1)
        agent = re.search(r"VM agent vm-1 \((\S+)\)", text).group(1)
        assert not agent.startswith(f"127.{FIRST_BASE}.")
        assert dig(agent, "reviews.default.global") == vip
        body = get(f"http://{vip}:9080/")
        assert body.startswith("reviews v1 from east")  # locality first
        ratings = dig(agent, "ratings.default.global")
        body = get(f"http://{ratings}:9080/")
        assert body.startswith("ratings v1 from west")  # across clusters, through mTLS
        # the printed status commands work as printed
        status = re.search(r"isthmus status (--config \S+east\.yaml)", text).group(1).split()
        r = subprocess.run([sys.executable, "-m", "isthmus.cli", "status", *status],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "reviews.default" in r.stdout, r.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        squatter.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_taken_base_is_one_clear_line(tmp_path: Path) -> None:
    layout = choose_layout(None)  # a free one now, which this test then takes
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((layout.edge("west"), 15443))
    squatter.listen()
    try:
        proc = demo(tmp_path, "--base", layout.base)
        out, _ = proc.communicate(timeout=30)
    finally:
        squatter.close()
    assert proc.returncode == 1
    assert out.strip().count("\n") == 0, out
    assert f"{layout.edge('west')}:15443" in out and "--base" in out and "Traceback" not in out
    proc = demo(tmp_path, "--base", "10.0")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "expected 127.N" in out
