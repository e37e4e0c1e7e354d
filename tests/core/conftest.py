"""Fixtures for the appliance core: real servers on their own loopback addresses."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from isthmus import config as configmod
from isthmus.appliance import Appliance

_hosts = itertools.count(1)


def loopback_host() -> str:
    """A fresh 127.77.x.y per call (and per xdist worker), so tests never fight over ports."""
    n = next(_hosts) + 200 * (os.getpid() % 250)
    return f"127.77.{(n // 250) % 250}.{n % 250 + 1}"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


TRUST_FILES = {"bundle": "bundle.pem", "ca_cert": "cluster-ca.pem", "ca_key": "cluster-ca.key",
               "cert": "node.pem", "key": "node.key"}


def make_config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    host = loopback_host()
    raw: dict[str, Any] = {
        "cluster": "east",
        "trust_domain": "mesh.example.org",
        "node": "east-gw-1",
        "roles": ["control"],
        "data_dir": str(tmp / "data"),
        "api": {"listen": f"{host}:{free_port(host)}", "token_file": str(tmp / "api-token")},
        "metrics": {"listen": f"{host}:{free_port(host)}"},
        "log": {"format": "json", "level": "info"},
        # tests check every few hundred milliseconds: below the 1 s floor of a real appliance
        "discovery": {"min_check_interval": "100ms"},
        # never the machine's /etc/isthmus: every test has its own (possibly empty) PKI dir
        "trust": {k: str(tmp / "pki" / f) for k, f in TRUST_FILES.items()},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    return raw


class ApiSession:
    """An aiohttp client bound to one appliance's API with its admin token."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token
        self.http = aiohttp.ClientSession()

    async def call(
        self, method: str, path: str, json: Any = None, token: str | None = None, **kw: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = kw.pop("headers", {})
        tok = self.token if token is None else token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        async with self.http.request(
            method, self.base + path, json=json, headers=headers, **kw
        ) as r:
            text = await r.text()
            body = None
            if text:
                try:
                    body = await r.json(content_type=None)
                except ValueError:
                    body = text
            return r.status, body, r

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def appliance(tmp_path: Path) -> AsyncIterator[Appliance]:
    cfg = configmod.validate(make_config(tmp_path))
    app = Appliance(cfg)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
async def api(appliance: Appliance) -> AsyncIterator[ApiSession]:
    token = Path(appliance.config.api.token_file).read_text().strip()
    s = ApiSession(appliance.api_url, token)
    try:
        yield s
    finally:
        await s.close()


class ApplianceProcess:
    """`isthmus run --config FILE` as a real process."""

    def __init__(self, tmp: Path, raw: dict[str, Any]) -> None:
        self.tmp = tmp
        self.raw = raw
        self.config_path = tmp / "isthmus.yaml"
        self.config_path.write_text(yaml.safe_dump(raw))
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = tmp / "appliance.log"

    @property
    def api_url(self) -> str:
        return f"http://{self.raw['api']['listen']}"

    @property
    def token_file(self) -> str:
        return str(self.raw["api"]["token_file"])

    def launch(self, preexec_fn: Callable[[], None] | None = None) -> None:
        """Start the process without waiting for it to serve."""
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "isthmus.cli", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=preexec_fn,
            )

    def start(self, timeout: float = 20.0, preexec_fn: Callable[[], None] | None = None) -> None:
        self.launch(preexec_fn)
        assert self.proc is not None
        host, port = configmod.split_host_port(self.raw["api"]["listen"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"appliance exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection((host, port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("appliance did not start in time")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "isthmus.cli",
                *args,
                "--api",
                self.api_url,
                "--token-file",
                self.token_file,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )


@pytest.fixture
def appliance_process(tmp_path: Path) -> Iterator[ApplianceProcess]:
    p = ApplianceProcess(tmp_path, make_config(tmp_path))
    try:
        yield p
    finally:
        p.stop()
