"""Files and defaults: private state files from the first run, durable replacements, and
listeners that say when they reach beyond loopback."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from isthmus import config as configmod
from isthmus.appliance import Appliance

from .conftest import make_config

pytestmark = pytest.mark.timeout(60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_state_files_are_private_from_the_first_run(tmp_path: Path) -> None:
    old = os.umask(0o022)  # what a shell usually gives
    try:
        app = Appliance(configmod.validate(make_config(tmp_path)))
        await app.start()
    finally:
        os.umask(old)
    try:
        data = Path(app.config.data_dir)
        files = {p.name: mode(p) for p in data.iterdir() if ".db" in p.name}
        # the WAL and shared-memory files exist while the stores are open
        assert {"catalog.db-wal", "catalog.db-shm", "federation.db-wal"} <= set(files)
        assert files == dict.fromkeys(files, 0o600)
        assert mode(data) == 0o700
    finally:
        await app.stop()


async def test_a_loose_data_dir_is_tightened_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = make_config(tmp_path)
    data = Path(raw["data_dir"])
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    app = Appliance(configmod.validate(raw))
    with caplog.at_level(logging.WARNING):
        await app.start()
    try:
        assert mode(data) == 0o700
        assert any(r.getMessage() == "data_dir mode tightened" for r in caplog.records)
    finally:
        await app.stop()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_a_replaced_token_file_is_fsynced_with_its_directory(tmp_path: Path) -> None:
    """A spent bootstrap token is forgotten by replacing the token file: without an fsync of
    the directory a power cut can bring the old file (and the spent token) back."""
    probe = subprocess.run(["strace", "-qq", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode().strip()}")
    target = tmp_path / "state" / "bootstrap-tokens.json"
    target.parent.mkdir()
    script = (
        "import sys; from pathlib import Path; from federation.trust.pemfiles import write_file;"
        f"write_file(Path({str(target)!r}), b'{{}}', 0o600, force=True)"
    )
    r = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
         sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2],
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    renamed = next(i for i, ln in enumerate(lines)
                   if "rename" in ln and str(target) in ln and "= 0" in ln)
    dir_fds = {
        m.group(1)
        for ln in lines
        if (m := re.search(rf'openat\(AT_FDCWD, "{re.escape(str(target.parent))}", '
                           r'[^)]*O_DIRECTORY[^)]*\) = (\d+)', ln))
    }
    synced = [ln for ln in lines[renamed:] if re.search(r"fsync\((\d+)\)", ln)
              and re.search(r"fsync\((\d+)\)", ln).group(1) in dir_fds]  # type: ignore[union-attr]
    assert synced, "\n".join(lines[renamed - 3:])


@pytest.mark.parametrize("listen", ["0.0.0.0:20101", "[::]:20101", "10.1.2.3:20101"])
def test_the_monitor_console_is_refused_off_loopback(tmp_path: Path, listen: str) -> None:
    raw = make_config(tmp_path, monitor={"enabled": True, "listen": listen})
    with pytest.raises(configmod.ConfigError, match=r"monitor\.listen: .*loopback"):
        configmod.validate(raw)


@pytest.mark.parametrize("listen", ["127.0.0.1:20101", "[::1]:20101", "localhost:20101"])
def test_the_monitor_console_on_loopback_is_fine(tmp_path: Path, listen: str) -> None:
    raw = make_config(tmp_path, monitor={"enabled": True, "listen": listen})
    assert configmod.validate(raw).monitor.listen == listen


def test_what_listens_beyond_loopback_is_listed(tmp_path: Path) -> None:
    raw = {"cluster": "east", "trust_domain": "mesh.example.org",
           "roles": ["control", "ingress", "egress", "dns"]}
    cfg = configmod.validate(raw)
    assert configmod.exposed_listeners(cfg) == [
        ("control.listen", "0.0.0.0:15012"),
        ("metrics.listen", "0.0.0.0:15090"),
        ("ingress.listen", "0.0.0.0:15443"),
        ("dns.listen", "0.0.0.0:53"),
    ]
    quiet = configmod.validate({**raw, "roles": ["control"], "metrics": {"enabled": False},
                                "control": {"listen": "127.0.0.1:15012"}})
    assert configmod.exposed_listeners(quiet) == []
    assert configmod.exposed_listeners(configmod.local_default(str(tmp_path))) == []
