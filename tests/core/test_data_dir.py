"""One appliance per data_dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from isthmus import config as configmod
from isthmus.appliance import Appliance, StartupError

from .conftest import ApplianceProcess, make_config


def test_a_second_appliance_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = ApplianceProcess(tmp_path, make_config(tmp_path))
    first.start()
    try:
        assert first.proc is not None
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        raw = make_config(second_dir, data_dir=str(tmp_path / "data"))  # other ports, same dir
        config = second_dir / "isthmus.yaml"
        import yaml

        config.write_text(yaml.safe_dump(raw))
        done = subprocess.run(
            [sys.executable, "-m", "isthmus.cli", "run", "--config", str(config)],
            capture_output=True, text=True, timeout=30,
        )
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert f"pid {first.proc.pid}" in lines[0] and str(tmp_path / "data") in lines[0]
        assert first.proc.poll() is None  # the first one runs on
    finally:
        first.stop()


async def test_the_lock_goes_with_the_appliance(tmp_path: Path) -> None:
    cfg = configmod.validate(make_config(tmp_path))
    app = Appliance(cfg)
    await app.start()
    again = Appliance(configmod.validate(make_config(tmp_path)))
    try:
        await again.start()
    except StartupError as e:
        assert "in use by another isthmus" in str(e)
    else:
        raise AssertionError("a second appliance started on the same data_dir")
    finally:
        await again.stop()
        await app.stop()
    third = Appliance(configmod.validate(make_config(tmp_path)))  # free again after stop
    await third.start()
    await third.stop()
