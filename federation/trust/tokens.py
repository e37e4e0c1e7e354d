"""One-time bootstrap tokens for an agent's first identity.

Stored hashed (SHA-256 of a 256-bit random token: nothing on disk can be replayed) in a 0600
JSON file under the data dir; single use; expiring. An exclusive `flock` on a side file keeps
concurrent writers (API handlers in worker threads, another process) from losing updates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from federation.trust.errors import PkiError
from federation.trust.pemfiles import KEY_MODE, write_file

log = logging.getLogger(__name__)

FILENAME = "bootstrap-tokens.json"
TOKEN_PREFIX = "isthmus-bt-"
MAX_TTL = dt.timedelta(days=30)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class BootstrapTokens:
    def __init__(
        self,
        data_dir: Path,
        *,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.path = Path(data_dir) / FILENAME
        self._lock_path = Path(data_dir) / f".{FILENAME}.lock"
        self._thread_lock = threading.Lock()
        self._clock = clock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        """The live entries {digest: expiry ISO}, rewritten on exit if changed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, KEY_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                entries = self._read()
                before = dict(entries)
                now = self._clock()
                for digest, expiry in list(entries.items()):
                    if dt.datetime.fromisoformat(expiry) <= now:
                        del entries[digest]
                yield entries
                if entries != before:
                    data = json.dumps({"tokens": entries}, indent=1, sort_keys=True).encode()
                    write_file(self.path, data, KEY_MODE, force=True)
            finally:
                os.close(fd)

    def _read(self) -> dict[str, str]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise PkiError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            tokens = json.loads(raw)["tokens"]
            if not isinstance(tokens, dict):
                raise TypeError("tokens is not an object")
            return {str(k): str(v) for k, v in tokens.items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise PkiError(f"{self.path} is corrupt: {exc}") from None

    def create(self, ttl: float | dt.timedelta) -> tuple[str, dt.datetime]:
        """A new token valid for `ttl` (seconds or timedelta), and when it expires."""
        ttl = ttl if isinstance(ttl, dt.timedelta) else dt.timedelta(seconds=ttl)
        if ttl <= dt.timedelta(0) or ttl > MAX_TTL:
            raise ValueError(f"token ttl must be positive and at most {MAX_TTL.days} days")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = (self._clock() + ttl).replace(microsecond=0)
        with self._locked() as entries:
            entries[_digest(token)] = expires.isoformat()
        log.info(
            "bootstrap token created expires=%s",
            expires.isoformat(),
            extra={"expires": expires.isoformat()},
        )
        return token, expires

    def consume(self, token: str) -> bool:
        """True exactly once for a token that exists and has not expired."""
        if not token.startswith(TOKEN_PREFIX):
            return False
        with self._locked() as entries:
            ok = entries.pop(_digest(token), None) is not None
        log.info("bootstrap token consumed ok=%s", ok, extra={"ok": ok})
        return ok

    def count(self) -> int:
        """Tokens that are still usable."""
        with self._locked() as entries:
            return len(entries)
