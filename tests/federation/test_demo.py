"""`isthmus demo` runs the whole story in one command and stops cleanly on Ctrl-C."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed")
def get(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=10).read().decode()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url}: {e.code} {e.read().decode()!r}") from None


def test_demo_story(tmp_path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "isthmus.cli", "demo", "--dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(lines)
        assert "Ctrl-C stops everything" in text, text
        vip = re.search(r"the VIP: (\S+)", text).group(1)
        dig = subprocess.run(
            ["dig", "@127.10.0.100", "-p", "15053", "+short", "reviews.default.global"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert dig.stdout.strip() == vip
        body = get(f"http://{vip}:9080/")
        assert body.startswith("reviews v1 from east")  # locality first
        ratings = subprocess.run(
            ["dig", "@127.10.0.100", "-p", "15053", "+short", "ratings.default.global"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        body = get(f"http://{ratings}:9080/")
        assert body.startswith("ratings v1 from west")  # across clusters, through mTLS
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
