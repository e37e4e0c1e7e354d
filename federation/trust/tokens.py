"""One-time bootstrap tokens for a node's first identity.

Stored hashed (SHA-256 of a 256-bit random token: nothing on disk can be replayed) in a 0600
JSON file under the data dir; single use; expiring. Each token is bound at creation to a kind
of identity (agent unless the operator says gateway) and, optionally, to one node name. An
exclusive `flock` on a side file keeps concurrent writers (API handlers in worker threads,
another process) from losing updates.

File format: `{"tokens": {digest: {"expires": ISO, "kind": "agent"|"gateway", "node": NAME}}}`
(`node` absent when unbound). A file written before tokens were bound maps a digest straight to
its expiry string; such a token loads as an unbound agent token.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from discovery.names import LABEL_EXPECTED, is_label
from federation.trust.errors import BootstrapTokenRefused, PkiError
from federation.trust.pemfiles import KEY_MODE, write_file
from federation.trust.spiffe import Kind

log = logging.getLogger(__name__)

FILENAME = "bootstrap-tokens.json"
TOKEN_PREFIX = "isthmus-bt-"
MAX_TTL = dt.timedelta(days=30)
T = TypeVar("T")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What one bootstrap token allows: one identity of `kind`, for `node` when bound."""

    expires: dt.datetime
    kind: Kind = Kind.AGENT
    node: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"expires": self.expires.isoformat(), "kind": self.kind.value}
        if self.node is not None:
            out["node"] = self.node
        return out

    @classmethod
    def from_json(cls, value: Any) -> TokenGrant:
        """A stored record; a bare expiry string is the old, unbound agent form."""
        if isinstance(value, str):
            return cls(_expiry(value))
        if not isinstance(value, dict):
            raise TypeError(f"a token record is not an object: {value!r}")
        node = value.get("node")
        if node is not None and not is_label(node):
            raise ValueError(f"a token record's node {node!r} is not {LABEL_EXPECTED}")
        return cls(_expiry(value["expires"]), Kind(value.get("kind", "agent")), node)


def _expiry(text: Any) -> dt.datetime:
    when = dt.datetime.fromisoformat(str(text))
    if when.tzinfo is None:
        raise ValueError(f"a token expiry without a time zone: {text!r}")
    return when


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
    def _locked(self) -> Iterator[dict[str, TokenGrant]]:
        """The live entries {digest: grant}, rewritten on a normal exit if changed; an
        exception inside leaves the file as it was."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PkiError(f"cannot create {self.path.parent}: {exc.strerror}") from None
        with self._thread_lock:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, KEY_MODE)
            except OSError as exc:
                raise PkiError(f"cannot open {self._lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                entries = self._read()
                before = dict(entries)
                now = self._clock()
                for digest, grant in list(entries.items()):
                    if grant.expires <= now:
                        del entries[digest]
                yield entries
                if entries != before:
                    tokens = {d: g.to_json() for d, g in entries.items()}
                    data = json.dumps({"tokens": tokens}, indent=1, sort_keys=True).encode()
                    try:
                        write_file(self.path, data, KEY_MODE, force=True)
                    except OSError as exc:
                        raise PkiError(f"cannot write {self.path}: {exc.strerror}") from None
            finally:
                os.close(fd)

    def _read(self) -> dict[str, TokenGrant]:
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
            return {str(k): TokenGrant.from_json(v) for k, v in tokens.items()}
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise PkiError(f"{self.path} is corrupt: {exc}") from None

    def create(
        self,
        ttl: float | dt.timedelta,
        *,
        kind: Kind | str = Kind.AGENT,
        node: str | None = None,
    ) -> tuple[str, dt.datetime]:
        """A new token valid for `ttl` (seconds or timedelta) that mints one identity of
        `kind`, for `node` only when given (a gateway token must name its node)."""
        seconds = ttl.total_seconds() if isinstance(ttl, dt.timedelta) else float(ttl)
        # compared as a float first: a huge ttl would overflow timedelta
        if not 0 < seconds <= MAX_TTL.total_seconds():  # NaN fails this too
            raise ValueError(f"token ttl must be positive and at most {MAX_TTL.days} days")
        try:
            kind = Kind(kind)
        except ValueError:
            raise ValueError(f"token kind {kind!r}: expected 'agent' or 'gateway'") from None
        if node is not None and not is_label(node):
            raise ValueError(f"token node {node!r}: expected {LABEL_EXPECTED}")
        if kind is Kind.GATEWAY and node is None:
            raise ValueError("a gateway token must name its node")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = (self._clock() + dt.timedelta(seconds=seconds)).replace(microsecond=0)
        with self._locked() as entries:
            entries[_digest(token)] = TokenGrant(expires, kind, node)
        log.info(
            "bootstrap token created expires=%s kind=%s node=%s",
            expires.isoformat(),
            kind.value,
            node,
            extra={"expires": expires.isoformat(), "kind": kind.value, "node": node},
        )
        return token, expires

    def redeem(self, token: str, use: Callable[[TokenGrant], T]) -> T:
        """Spend `token` on `use(grant)`: under the lock, so exactly one caller gets a token,
        and only if `use` returns - if it raises, the token stays for a corrected request.
        Raises BootstrapTokenRefused for a token that is unknown, used or expired."""
        refused = BootstrapTokenRefused("invalid, used or expired bootstrap token")
        if not token.startswith(TOKEN_PREFIX):
            raise refused
        digest = _digest(token)
        with self._locked() as entries:
            grant = entries.get(digest)
            if grant is None:
                log.info("bootstrap token refused", extra={"ok": False})
                raise refused
            result = use(grant)
            del entries[digest]
        log.info(
            "bootstrap token consumed kind=%s node=%s",
            grant.kind.value,
            grant.node,
            extra={"ok": True, "kind": grant.kind.value, "node": grant.node},
        )
        return result

    def consume(self, token: str) -> bool:
        """True exactly once for a token that exists and has not expired."""
        try:
            self.redeem(token, lambda _grant: None)
        except BootstrapTokenRefused:
            return False
        return True

    def count(self) -> int:
        """Tokens that are still usable."""
        with self._locked() as entries:
            return len(entries)
