"""The state files under `data_dir`: private modes, durable renames, SQLite databases that
never start silently empty, and a quarantine table for rows that do not validate.

- `data_dir` is 0700: created so, and tightened (with a log line) when found looser.

- A new database is created 0600 before SQLite sees it. SQLite gives a database's `-wal` and
  `-shm` files the database file's own mode, so they are 0600 too (opened the other way round,
  they were created 0644 under the usual umask).
- A database file of 0 bytes is refused: it is what a truncation leaves, and SQLite would
  quietly start on it empty. Starting fresh is an operator's decision (delete the file).
- Rows that do not validate at load time are moved to a `quarantine` table with the reason, so
  one bad row neither stops start-up nor is lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

from discovery.errors import StoreError

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm", "-journal")

QUARANTINE_DDL = (
    "CREATE TABLE IF NOT EXISTS quarantine (table_name TEXT NOT NULL, key TEXT NOT NULL, "
    "body TEXT NOT NULL, reason TEXT NOT NULL, at TEXT NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class QuarantinedRow:
    table: str  # where the row was: workloads, meta, vips, policies
    key: str  # its key there
    reason: str
    at: str  # when it was moved (ISO 8601, UTC)

    def to_json(self) -> dict[str, str]:
        return {"table": self.table, "key": self.key, "reason": self.reason, "at": self.at}


def secure_dir(path: Path) -> None:
    """Create `path` 0700, or tighten it to 0700 if group or others can reach it (logged)."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    found = stat.S_IMODE(path.stat().st_mode)
    if found & 0o077:
        path.chmod(DIR_MODE)
        log.warning(
            "data_dir mode tightened",
            extra={"path": str(path), "was": oct(found), "now": oct(DIR_MODE)},
        )


def fsync_dir(path: Path) -> None:
    """Make a rename or a creation in `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_db(path: Path, what: str) -> None:
    """Before SQLite opens `path`: refuse a truncated file, create a new one 0600, and bring an
    existing one and its side files to 0600. Raises StoreError naming the way out."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    try:
        st = path.stat()
    except FileNotFoundError:
        _create(path)
        return
    except OSError as e:
        raise StoreError(f"cannot read the {what} file {path}: {e.strerror}") from None
    if st.st_size == 0:
        raise StoreError(
            f"{path.name} is empty (0 bytes) at {path}: the {what} was truncated or never "
            f"finished. Restore it from a backup, or, to start with an empty {what} on "
            f"purpose, delete it (and any {path.name}-wal and {path.name}-shm) and start again"
        )
    for p in (path, *(path.with_name(path.name + s) for s in SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(p.stat().st_mode) != FILE_MODE:
                p.chmod(FILE_MODE)


def _create(path: Path) -> None:
    """A new, initialised database appears under its name at once or not at all: a crash while
    creating it leaves no 0-byte file that the next start would (rightly) refuse."""
    tmp = path.with_name(f".{path.name}.new")
    for p in (tmp, *(tmp.with_name(tmp.name + s) for s in SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    conn = sqlite3.connect(tmp)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # writes the header: the file is a database now
    finally:
        conn.close()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def quarantine(
    conn: sqlite3.Connection, store: Path, table: str, key: str, body: str, reason: str
) -> QuarantinedRow:
    """Record a bad row (inside the caller's transaction); the caller deletes the original."""
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    conn.execute("INSERT INTO quarantine VALUES (?, ?, ?, ?, ?)", (table, key, body, reason, at))
    log.error(
        "store row quarantined",
        extra={"store": str(store), "table": table, "key": key, "reason": reason},
    )
    return QuarantinedRow(table, key, reason, at)


def quarantined(conn: sqlite3.Connection) -> list[QuarantinedRow]:
    return [
        QuarantinedRow(t, k, r, a)
        for t, k, r, a in conn.execute(
            "SELECT table_name, key, reason, at FROM quarantine ORDER BY rowid"
        )
    ]
