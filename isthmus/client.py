"""A small synchronous client for the control API, used by the CLI.

Where the CLI finds the API and its token, first match wins:
1. `--api URL` / `--token-file FILE`;
2. `--config FILE`: the appliance's own `api.listen` and `api.token_file`;
3. `$ISTHMUS_API` / `$ISTHMUS_TOKEN` (the token itself);
4. `$ISTHMUS_CONFIG`, read like `--config`;
5. `http://127.0.0.1:15000`, and the token of `isthmus run` with no config
   (`~/.local/state/isthmus/api-token`), then `/etc/isthmus/api-token`.
Every refusal of a token names the source it came from.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discovery.addresses import join_host_port, split_host_port
from isthmus.config import state_dir

DEFAULT_API = "http://127.0.0.1:15000"
TOKEN_ENV = "ISTHMUS_TOKEN"
API_ENV = "ISTHMUS_API"
CONFIG_ENV = "ISTHMUS_CONFIG"


class ClientError(Exception):
    """One clear line for the operator."""


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    source: str  # said when the API refuses it


@dataclass(frozen=True, slots=True)
class Target:
    api: str
    token: Token


def default_token_files() -> list[Path]:
    return [state_dir() / "api-token", Path("/etc/isthmus/api-token")]


def read_token_file(path: str | os.PathLike[str], source: str) -> Token:
    try:
        value = Path(path).read_text().strip()
    except OSError as e:
        raise ClientError(f"cannot read token file {path} ({source}): {e.strerror}") from None
    if not value:
        raise ClientError(f"token file {path} ({source}) is empty")
    return Token(value, f"{path}, {source}")


def resolve_token(token_file: str | None) -> str:
    """The token alone, from `--token-file`, `$ISTHMUS_TOKEN` or the default files."""
    return _token(token_file, None, None).value


def api_from_listen(listen: str) -> str:
    """The URL a client on this host uses for an `api.listen` address."""
    host, port = split_host_port(listen)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{join_host_port(host, port)}"


def _config(path: str, source: str) -> tuple[str, str]:
    """(api URL, token file) from an appliance config."""
    from isthmus import config as configmod

    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as e:
        raise ClientError(f"{source} {path}: " + "; ".join(e.problems)) from None
    return api_from_listen(cfg.api.listen), cfg.api.token_file


def _token(token_file: str | None, config: tuple[str, str] | None,
           env_config: tuple[str, str] | None) -> Token:  # fmt: skip
    if token_file:
        return read_token_file(token_file, "--token-file")
    if config is not None:
        return read_token_file(config[1], "api.token_file of --config")
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return Token(env, f"${TOKEN_ENV}")
    if env_config is not None:
        return read_token_file(env_config[1], f"api.token_file of ${CONFIG_ENV}")
    for p in default_token_files():
        try:
            value = p.read_text().strip()
        except OSError:
            continue
        if value:
            return Token(value, f"{p}, the default token file")
    raise ClientError(
        f"no API token: pass --config FILE or --token-file FILE, or set {TOKEN_ENV} "
        f"(looked in {', '.join(str(p) for p in default_token_files())})"
    )


def resolve(api: str | None, token_file: str | None, config: str | None) -> Target:
    """Where to send requests, and with which token (first match wins, see the module)."""
    from_config = _config(config, "--config") if config else None
    env_path = os.environ.get(CONFIG_ENV, "").strip()
    from_env_config = (
        _config(env_path, f"${CONFIG_ENV}") if env_path and not config else None
    )
    url = (
        api
        or (from_config[0] if from_config else None)
        or os.environ.get(API_ENV, "").strip()
        or (from_env_config[0] if from_env_config else None)
        or DEFAULT_API
    )
    return Target(url, _token(token_file, from_config, from_env_config))


class ApiClient:
    def __init__(self, base: str, token: str | Token, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.token = token if isinstance(token, Token) else Token(token, "the given token")
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token.value}")
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
            if e.code in (401, 403):
                msg += f" (token from {self.token.source}; API {self.base})"
            raise ClientError(f"{method} {path}: {e.code} {msg}") from None
        except urllib.error.URLError as e:
            raise ClientError(f"cannot reach the API at {self.base}: {e.reason}") from None
        except (TimeoutError, ConnectionError) as e:
            raise ClientError(f"cannot reach the API at {self.base}: {e}") from None
        return json.loads(raw) if raw else None
