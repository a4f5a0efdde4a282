"""The outbox's files: private whatever the umask, and a foreign database left untouched."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.outbox import Outbox, OutboxError
from tests.test_outbox import ROOT, make_turn

SUFFIXES = ("", "-wal", "-shm")


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run the test under umask 022 (a terminal's; systemd's units set 077)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    """Permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
class TestPrivateFiles:
    def test_database_wal_and_shm_are_private(self, tmp_path: Path) -> None:
        """The WAL holds the queued transcripts: 0600 like the database, in a 0700 folder.

        It was created 0644 (the database was made 0600 only after SQLite had made its WAL
        and shared-memory files from its then mode), in a 0755 state folder.
        """
        path = tmp_path / "state" / "outbox.sqlite3"
        box = Outbox(path)
        try:
            box.queue("hook").put(make_turn(1))
            modes = {suffix: mode(path.with_name(path.name + suffix)) for suffix in SUFFIXES}
            assert modes == dict.fromkeys(SUFFIXES, 0o600)
            assert mode(path.parent) == 0o700
        finally:
            box.close()

    def test_files_an_older_version_left_open_are_made_private(self, tmp_path: Path) -> None:
        """A WAL left 0644 by a crash (of an older version) is 0600 once the outbox opens."""
        path = tmp_path / "outbox.sqlite3"
        crash = ("import os, sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
                 "db.execute('PRAGMA journal_mode=WAL'); "
                 "db.execute('CREATE TABLE outbox (sink TEXT NOT NULL, seq INTEGER NOT NULL, "
                 "record_id TEXT NOT NULL, body TEXT NOT NULL, queued_at REAL NOT NULL, "
                 "PRIMARY KEY (sink, seq)) WITHOUT ROWID'); db.commit(); os._exit(0)")
        subprocess.run([sys.executable, "-c", crash, str(path)], check=True, cwd=ROOT,
                       timeout=30)
        assert mode(path.with_name(path.name + "-wal")) == 0o644
        box = Outbox(path)
        try:
            assert {suffix: mode(path.with_name(path.name + suffix)) for suffix in SUFFIXES} \
                == dict.fromkeys(SUFFIXES, 0o600)
        finally:
            box.close()


class TestForeignDatabase:
    @pytest.mark.parametrize("schema", [
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY, payload BLOB)",
        "CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)",
    ])
    def test_another_programs_database_is_refused_untouched(self, tmp_path: Path,
                                                            schema: str) -> None:
        """An SQLite file that is not an outbox: one line saying so, and the file unchanged.

        One with another ``outbox`` table said ``no such column: sink``; one without got an
        ``outbox`` table (and WAL mode) added to it.
        """
        path = tmp_path / "outbox.sqlite3"
        db = sqlite3.connect(path)
        db.execute(schema)
        db.commit()
        db.close()
        before = path.read_bytes()
        with pytest.raises(OutboxError) as info:
            Outbox(path)
        message = str(info.value)
        assert message.startswith(f"{path}: not a transcribed outbox database (")
        assert "move it aside" in message
        assert "\n" not in message
        assert path.read_bytes() == before
        assert not path.with_name(path.name + "-wal").exists()

    def test_an_empty_file_becomes_an_outbox(self, tmp_path: Path) -> None:
        """An empty file (or a database without tables) is made an outbox, as before."""
        path = tmp_path / "outbox.sqlite3"
        path.touch()
        box = Outbox(path)
        try:
            box.queue("hook").put(make_turn(1))
            assert box.depth("hook") == 1
        finally:
            box.close()
