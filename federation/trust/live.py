"""Which identities of this cluster are live, so that a bootstrap token never mints one again.

An identity (a SPIFFE ID) is live when
- it names the control node's own node (whatever the kind): the control node is a gateway,
  and peers serve their export feeds to this cluster's gateways;
- an agent channel with it is connected to this control node right now;
- this control node issued it (bootstrap or renewal) and that certificate has not expired.
  These records survive a restart: `issued-identities.json` (0600) in the data dir.

A token bound to the node (`isthmus token create --node NAME`) may replace an identity that
is live only by the third rule (a rebuilt VM whose key is gone); nothing replaces the first two.
Identities made offline with `isthmus ca issue` are not known here: bind gateway tokens to
their node.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from federation.trust.errors import PkiError
from federation.trust.pemfiles import KEY_MODE, write_file
from federation.trust.spiffe import SpiffeId

log = logging.getLogger(__name__)

ISSUED_FILENAME = "issued-identities.json"


class LiveIdentities:
    def __init__(
        self,
        path: Path | None,
        *,
        reserved_nodes: Iterable[str] = (),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        """`path`: where issued identities are kept (None: in memory only)."""
        self.path = None if path is None else Path(path)
        self.reserved_nodes = set(reserved_nodes)
        self._clock = clock
        self._lock = threading.Lock()
        self._connected: collections.Counter[SpiffeId] = collections.Counter()
        self._issued: dict[str, dt.datetime] | None = None  # loaded on first use

    # --- connected agent channels -----------------------------------------------------------
    @contextlib.contextmanager
    def connected(self, sid: SpiffeId) -> Iterator[None]:
        """Mark `sid` live while an agent channel with it is open."""
        with self._lock:
            self._connected[sid] += 1
        try:
            yield
        finally:
            with self._lock:
                self._connected[sid] -= 1
                if self._connected[sid] <= 0:
                    del self._connected[sid]

    # --- issued identities ------------------------------------------------------------------
    def record(self, sid: SpiffeId, expires: dt.datetime) -> None:
        """This control node signed `sid`, valid until `expires`."""
        with self._lock:
            issued = self._load()
            key = str(sid)
            if key in issued and issued[key] >= expires:
                return
            issued[key] = expires
            self._save(issued)

    def issued_until(self, sid: SpiffeId) -> dt.datetime | None:
        with self._lock:
            return self._load().get(str(sid))

    def _load(self) -> dict[str, dt.datetime]:
        if self._issued is None:
            self._issued = self._read()
        now = self._clock()
        for key in [k for k, until in self._issued.items() if until <= now]:
            del self._issued[key]
        return self._issued

    def _read(self) -> dict[str, dt.datetime]:
        if self.path is None:
            return {}
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise PkiError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            records = json.loads(raw)["identities"]
            out = {str(SpiffeId.parse(k)): dt.datetime.fromisoformat(v) for k, v in records.items()}
            if any(v.tzinfo is None for v in out.values()):
                raise ValueError("an expiry without a time zone")
            return out
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, PkiError) as exc:
            # fail closed: without it a token could mint an identity that is still in use
            raise PkiError(
                f"{self.path} is corrupt ({exc}); identities cannot be bootstrapped until it is "
                "fixed or removed (removing it forgets which issued identities are unexpired)"
            ) from None

    def _save(self, issued: dict[str, dt.datetime]) -> None:
        if self.path is None:
            return
        records = {k: v.isoformat() for k, v in sorted(issued.items())}
        data = json.dumps({"identities": records}, indent=1).encode()
        try:
            write_file(self.path, data, KEY_MODE, force=True)
        except OSError as exc:
            raise PkiError(f"cannot write {self.path}: {exc.strerror}") from None

    # --- the rule ---------------------------------------------------------------------------
    def refusal(self, sid: SpiffeId, *, bound: bool) -> str | None:
        """Why a bootstrap token may not mint `sid` (None: it may). `bound`: the token names
        this node, which allows replacing an identity that is live only as issued."""
        if sid.node in self.reserved_nodes:
            return f"{sid.node} is the control node's own node name"
        with self._lock:
            if self._connected.get(sid):
                return f"{sid} has an agent channel connected to this control node"
        until = self.issued_until(sid)
        if until is not None and not bound:
            return (
                f"{sid} was issued by this control node and is valid until "
                f"{until.isoformat()}; to replace it (e.g. a rebuilt VM), create a token "
                f"bound to the node: isthmus token create --node {sid.node}"
            )
        return None
