"""A small synchronous client for the control API, used by the CLI."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from isthmus.config import state_dir

DEFAULT_API = "http://127.0.0.1:15000"
TOKEN_ENV = "ISTHMUS_TOKEN"


class ClientError(Exception):
    """One clear line for the operator."""


def default_token_files() -> list[Path]:
    return [state_dir() / "api-token", Path("/etc/isthmus/api-token")]


def resolve_token(token_file: str | None) -> str:
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ClientError(f"cannot read token file {token_file}: {e.strerror}") from None
        if not token:
            raise ClientError(f"token file {token_file} is empty")
        return token
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    for p in default_token_files():
        try:
            token = p.read_text().strip()
        except OSError:
            continue
        if token:
            return token
    raise ClientError(
        f"no API token: pass --token-file FILE or set {TOKEN_ENV} "
        f"(looked in {', '.join(str(p) for p in default_token_files())})"
    )


class ApiClient:
    def __init__(self, base: str, token: str, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
                msg = err.get("error", raw.decode(errors="replace"))
                if err.get("field"):
                    msg = f"{err['field']}: {msg}" if not msg.startswith(err["field"]) else msg
            except ValueError:
                msg = raw.decode(errors="replace").strip() or e.reason
            raise ClientError(f"{method} {path}: {e.code} {msg}") from None
        except urllib.error.URLError as e:
            raise ClientError(f"cannot reach the API at {self.base}: {e.reason}") from None
        except (TimeoutError, ConnectionError) as e:
            raise ClientError(f"cannot reach the API at {self.base}: {e}") from None
        return json.loads(raw) if raw else None
