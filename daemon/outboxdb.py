"""The outbox's file: opening and checking its SQLite database, and locking it to one process.

Two locks (``flock``): on ``<path>.lock`` (what older versions take) and on the database file
itself, so that deleting the lock file (taken for a stale one) does not let a second daemon in
to deliver every turn twice. ``flock`` and SQLite's own POSIX locks do not interact on Linux.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Final

from daemon.errors import DaemonError

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    sink      TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    record_id TEXT    NOT NULL,
    body      TEXT    NOT NULL,
    queued_at REAL    NOT NULL,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID
"""

_DAMAGED: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

_COLUMNS: Final = ["sink", "seq", "record_id", "body", "queued_at"]


class OutboxError(DaemonError):
    """The outbox cannot store a record: it is full, unreadable or locked by another process."""


@contextmanager
def sqlite_errors(path: Path, action: str) -> Iterator[None]:
    """Turn any ``sqlite3.Error`` into a one-line ``OutboxError`` naming the file."""
    try:
        yield
    except sqlite3.Error as exc:
        raise OutboxError(f"{path}: cannot {action} the outbox database: {exc}") from None


def same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        found, held = path.stat(), os.fstat(fd)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def lock(path: Path) -> tuple[int, int]:
    """Create the directory and lock the outbox: ``(lock file fd, database fd)``.

    The database file is created (0600) if missing.

    Raises:
        OutboxError: a file cannot be created, or another process holds a lock.
    """
    _mkdir(path)
    held = _flock(path.with_name(path.name + ".lock"), path, "cannot create the outbox")
    try:
        return held, lock_database(path)
    except BaseException:
        os.close(held)
        raise


def relock(path: Path, fds: tuple[int, ...]) -> tuple[int, int]:
    """Lock again what was deleted or replaced since ``lock`` returned ``fds``; the fds held now.

    The ones no longer needed (a deleted file's) are closed.

    Raises:
        OutboxError: as ``lock``; then ``fds`` are still held.
    """
    held, db = fds
    _mkdir(path)
    lock_path = path.with_name(path.name + ".lock")
    new_held = held if same_file(lock_path, held) else _flock(lock_path, path,
                                                              "cannot create the outbox")
    try:
        new_db = db if same_file(path, db) else lock_database(path)
    except BaseException:
        if new_held != held:
            os.close(new_held)
        raise
    release(tuple(fd for fd in fds if fd not in (new_held, new_db)))
    return new_held, new_db


def lock_database(path: Path) -> int:
    """Create (0600) and lock the database file itself; its fd.

    Raises:
        OutboxError: it cannot be opened, or another process holds its lock.
    """
    return _flock(path, path, "cannot open the outbox database")


def release(fds: tuple[int, ...]) -> None:
    """Close the lock fds.

    After the database connection: closing an fd of the database file while SQLite has it
    open would drop SQLite's own (POSIX) locks on it.
    """
    for fd in fds:
        with suppress(OSError):
            os.close(fd)


def _mkdir(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)     # queued transcripts
    except OSError as exc:
        lock_path = path.with_name(path.name + ".lock")
        raise OutboxError(f"{lock_path}: cannot create the outbox: {exc.strerror}") from None


def _flock(target: Path, path: Path, failing: str) -> int:
    try:
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise OutboxError(f"{target}: {failing}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutboxError(f"{path}: outbox is in use by another transcribed process") from None
    return fd


def open_database(path: Path) -> sqlite3.Connection:
    """Open (or create) the database in WAL mode and check that it is readable.

    The file is created 0600 (by ``lock``) before SQLite opens it: SQLite gives its WAL and
    shared-memory files (the WAL holds the queued transcripts) the database's mode.
    """
    try:
        db = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise OutboxError(f"{path}: cannot open the outbox database: {exc}") from None
    try:
        foreign = _foreign(db)     # before anything writes to it (WAL mode is kept in the file)
        if foreign is None:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
    except sqlite3.Error as exc:
        db.close()
        if getattr(exc, "sqlite_errorcode", None) in _DAMAGED:    # not a full disk, say
            raise OutboxError(
                f"{path}: outbox database is unreadable ({exc}); move it aside to start empty"
            ) from None
        raise OutboxError(f"{path}: cannot open the outbox database: {exc}") from None
    if foreign is not None:
        db.close()
        raise OutboxError(f"{path}: not a transcribed outbox database ({foreign}); move it "
                          f"aside or set another state_dir")
    for suffix in ("", "-wal", "-shm"):     # also what an older version (or a crash) left 0644
        with suppress(OSError):
            os.chmod(path.with_name(path.name + suffix), 0o600)
    return db


def _foreign(db: sqlite3.Connection) -> str | None:
    """What shows that ``db`` is another program's database, or None (ours, or empty)."""
    tables = sorted(str(name) for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"))
    if tables and tables != ["outbox"]:
        return "it holds the tables " + ", ".join(tables[:5])
    columns = [str(row[1]) for row in db.execute("PRAGMA table_info(outbox)")]
    if tables and columns != _COLUMNS:
        return "its outbox table has the columns " + ", ".join(columns[:8])
    return None
