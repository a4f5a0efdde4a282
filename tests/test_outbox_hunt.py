"""The outbox against a damaged state dir: a lost lock file, hand-edited rows, no dead letters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.dispatch import Dispatcher
from daemon.outbox import Outbox, OutboxError
from tests.test_outbox import make_turn, null_runner, read_dead_letters


def test_a_deleted_lock_file_does_not_let_a_second_process_in(tmp_path: Path) -> None:
    """Someone removes ``outbox.sqlite3.lock`` (a "stale" lock) while a daemon runs: a second
    daemon on that state dir is still refused (it opened, delivered every queued turn a second
    time and had its appends refused: ``UNIQUE constraint failed``, the turns dead-lettered)."""
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    try:
        box.queue("hook").put(make_turn(1))
        path.with_name(path.name + ".lock").unlink()
        with pytest.raises(OutboxError, match="in use by another transcribed process"):
            Outbox(path).close()
        box.queue("hook").put(make_turn(2))         # the first one goes on as before
        assert box.depth("hook") == 2
    finally:
        box.close()
    again = Outbox(path)                            # released at close
    try:
        assert again.depth("hook") == 2
    finally:
        again.close()


def test_a_replaced_database_is_refused_not_written_into_a_deleted_file(tmp_path: Path) -> None:
    """All of the outbox's files deleted and a second daemon started on the state dir: the
    first one saw a file at the path and went on writing into its own deleted one (every turn
    acknowledged, and gone at exit), beside a second daemon delivering. Its appends are
    refused now, naming why (the dispatcher then dead-letters those turns)."""
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    try:
        box.queue("hook").put(make_turn(1))
        for leftover in tmp_path.iterdir():
            leftover.unlink()
        second = Outbox(path)
        try:
            with pytest.raises(OutboxError, match="replaced while the daemon ran"):
                box.queue("hook").put(make_turn(2))
            with pytest.raises(OutboxError, match="replaced while the daemon ran"), box.batch():
                pass
            assert second.depth("hook") == 0
        finally:
            second.close()
    finally:
        with capture_logs() as logs:
            box.close()
    [stranded] = [e for e in logs if e["event"] == "outbox.stranded"]
    assert stranded["records"] == 1         # what it held went to the dead letters, not away
    [entry] = read_dead_letters(tmp_path / "dead-letter" / "hook.jsonl")
    assert json.loads(entry["body"])["session_id"] == "sess"


def test_records_of_a_deleted_database_are_not_lost_at_exit(tmp_path: Path) -> None:
    """The outbox deleted and the daemon stopped before another turn made it again: its
    records went with the deleted file. They go to the dead-letter files now."""
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    box.queue("hook").put(make_turn(1))
    path.unlink()
    box.close()
    [entry] = read_dead_letters(tmp_path / "dead-letter" / "hook.jsonl")
    assert "deleted or replaced" in entry["error"]


@pytest.mark.parametrize(("field", "value"), [
    ("started_at", "1795000000"),       # a number, not an ISO time: AttributeError
    ("started_at", "null"),
    ("turn_order", "1e999"),            # infinity: OverflowError
])
async def test_a_hand_edited_record_is_dead_lettered_not_a_crash(tmp_path: Path, field: str,
                                                                 value: str) -> None:
    """A row that decodes as JSON but not as a record (a hand edit, another version's schema)
    goes to the dead-letter file like any unreadable row. It raised out of ``get``: the sink's
    worker crashed with a traceback, and the row stayed to crash it again at every start."""
    box = Outbox(tmp_path / "outbox.sqlite3")
    try:
        queue = box.queue("hook")
        queue.put(make_turn(1))
        queue.put(make_turn(2))
        body = json.dumps(make_turn(1).to_dict()).replace(
            f'"{field}": {json.dumps(make_turn(1).to_dict()[field])}', f'"{field}": {value}')
        assert body != make_turn(1).to_json()
        box._db.execute("UPDATE outbox SET body = ? WHERE seq = 1", (body,))
        with capture_logs() as logs:
            delivery = await queue.get()
        assert delivery is not None and delivery.record.turn_order == 2
        assert [e["event"] for e in logs] == ["outbox.record_unreadable"]
        [entry] = read_dead_letters(tmp_path / "dead-letter" / "hook.jsonl")
        assert entry["body"] == body
        assert box.depth("hook") == 1
    finally:
        box.close()


async def test_an_unreadable_record_is_kept_when_it_cannot_be_dead_lettered(
        tmp_path: Path) -> None:
    """The dead-letter folder cannot be written (here a file is in its place; also a full disk,
    a read-only folder): an unreadable row stays in the outbox, and the line says so. It was
    deleted anyway: gone, with only its sequence number in the log."""
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    (tmp_path / "dead-letter").write_text("not a folder")
    try:
        queue = box.queue("hook")
        queue.put(make_turn(1))
        queue.put(make_turn(2))
        box._db.execute("UPDATE outbox SET body = 'garbage' WHERE seq = 1")
        with capture_logs() as logs:
            delivery = await queue.get()
        assert delivery is not None and delivery.record.turn_order == 2
        queue.ack(delivery)
        [failed] = [e for e in logs if e["event"] == "sink.dead_letter_failed"]
        assert failed["path"] == str(tmp_path / "dead-letter" / "hook.jsonl")
        [unreadable] = [e for e in logs if e["event"] == "outbox.record_unreadable"]
        assert unreadable["kept_in"] == str(path)
        assert box.depth("hook") == 1                   # still on disk
    finally:
        box.close()
    (tmp_path / "dead-letter").unlink()
    box = Outbox(path)                  # the next start: the folder can be written now
    try:
        queue = box.queue("hook")
        queue.close()
        assert await queue.get() is None
        [entry] = read_dead_letters(tmp_path / "dead-letter" / "hook.jsonl")
        assert entry["body"] == "garbage"
        assert box.depth("hook") == 0
    finally:
        box.close()


def test_a_turn_that_cannot_be_dead_lettered_is_named(tmp_path: Path) -> None:
    """A full disk: the outbox refuses the turn and so does its dead-letter file. The failure
    line names the turn that is lost (it named only the file: with several sinks and turns
    failing together, which turn was gone was left to guess)."""
    box = Outbox(tmp_path / "outbox.sqlite3", max_records=0)
    (tmp_path / "dead").write_text("not a folder")
    try:
        dispatcher = Dispatcher([null_runner("hook", box.queue("hook"))],
                                dead_letter_dir=tmp_path / "dead")
        with capture_logs() as logs:
            dispatcher.dispatch(make_turn(7))
        [failed] = [e for e in logs if e["event"] == "sink.dead_letter_failed"]
        assert failed["record_id"] == "sess:7"
        assert failed["path"] == str(tmp_path / "dead" / "hook.jsonl")
    finally:
        box.close()
