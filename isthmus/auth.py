"""Bearer tokens for the control API: a generated admin token plus optional scoped ones."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

SCOPES = ("admin", "read", "workloads", "traffic", "tokens")


class TokenFileError(Exception):
    pass


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def write_secret(path: Path, value: str) -> None:
    """Create `path` 0600 from the start (never chmod after the secret is on disk)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise TokenFileError(f"cannot read token file {path}: {e.strerror}") from None
    if not token:
        raise TokenFileError(f"token file {path} is empty")
    return token


def ensure_admin_token(path: Path) -> str:
    """The admin token from `path`; generated (0600) on first start if absent."""
    if not path.exists():
        try:
            write_secret(path, secrets.token_urlsafe(32))
        except FileExistsError:
            pass
        except OSError as e:
            raise TokenFileError(f"cannot create token file {path}: {e.strerror}") from None
    return read_token(path)


@dataclass(frozen=True, slots=True)
class Grant:
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class TokenRegistry:
    """Maps token digests to grants; compared in constant time."""

    def __init__(self) -> None:
        self._grants: list[tuple[bytes, Grant]] = []

    def add(self, token: str, scopes: frozenset[str]) -> None:
        self._grants.append((_digest(token), Grant(scopes)))

    def lookup(self, token: str) -> Grant | None:
        d = _digest(token)
        found = None
        for digest, grant in self._grants:
            if hmac.compare_digest(digest, d):
                found = grant
        return found
